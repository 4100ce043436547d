"""Concept-memory injection for diffusers UNets, through attention processors.

In each selected attn2 layer: K = W_k·[c ; P_k], V = W_v·[c ; s·P_v], Q = W_q·x, and
every projection W becomes W + s·ΔW when the patch carries a delta. Weights are
never modified: deltas are added functionally at call time.

Strength s: 0 removes the patch entirely (bit-identical to no patch); 1 is the
trained behaviour; in between the memory keys stay and their values fade (V
scales linearly, which is what ComfyUI's and A1111's context hooks can express
too), and deltas scale linearly. Several patches compose: memories concatenate
along the token axis, deltas add.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .layers import attn2_layers
from .patch import ErasurePatch, PatchError, check_compatible, model_fingerprint

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LayerInjection:
    """What one attn2 layer receives: memory tokens (k, v, strength) and weight deltas per projection."""

    memories: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)
    deltas: dict[str, list[tuple[torch.Tensor, float]]] = field(default_factory=dict)


class MemoryAttnProcessor:
    """Cross-attention over [text context ; memory tokens], with functional weight deltas."""

    def __init__(self, injection: LayerInjection) -> None:
        self.injection = injection

    def _linear(self, module: torch.nn.Linear, name: str, x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        for delta, strength in self.injection.deltas.get(name, ()):
            weight = weight + strength * delta.to(weight.device, weight.dtype)
        return F.linear(x, weight, module.bias)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb=None, **kwargs) -> torch.Tensor:
        if hidden_states.dim() != 3 or encoder_hidden_states is None:
            raise RuntimeError("concept memory applies to cross-attention on (B, N, C) hidden states only")
        residual = hidden_states
        batch = hidden_states.shape[0]
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        context_k, context_v = context, context
        if self.injection.memories:
            dev, dt = context.device, context.dtype
            mem_k = torch.cat([k.to(dev, dt) for k, _, _ in self.injection.memories])
            mem_v = torch.cat([(s * v).to(dev, dt) for _, v, s in self.injection.memories])
            context_k = torch.cat([context, mem_k.expand(batch, -1, -1)], dim=1)
            context_v = torch.cat([context, mem_v.expand(batch, -1, -1)], dim=1)
            if attention_mask is not None:  # memory tokens are always visible
                attention_mask = F.pad(attention_mask, (0, mem_k.shape[0]), value=0.0)
        q = self._linear(attn.to_q, "to_q", hidden_states)
        k = self._linear(attn.to_k, "to_k", context_k)
        v = self._linear(attn.to_v, "to_v", context_v)
        heads = attn.heads
        q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        if attention_mask is not None:
            attention_mask = attention_mask.view(batch, -1, 1, attention_mask.shape[-1]) \
                if attention_mask.dim() == 3 else attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1]).to(q.dtype)
        out = self._linear(attn.to_out[0], "to_out.0", out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def plan_injection(unet, patches: list[tuple[ErasurePatch, float]]) -> tuple[dict[str, LayerInjection], list[str]]:
    """Validate every patch against the UNet and work out each layer's injection, changing nothing.

    Returns {diffusers module path: LayerInjection} and the compatibility warnings."""
    layers = attn2_layers(unet)
    names = [layer.canonical for layer in layers]
    to_diffusers = {layer.canonical: layer.diffusers for layer in layers}
    fingerprint = model_fingerprint(unet) if any(p.base_fingerprint for p, _ in patches) else None
    modules = dict(unet.named_modules())
    shapes = {f"{layer.canonical}.{proj}": tuple(modules[f"{layer.diffusers}.{proj}"].weight.shape)
              for layer in layers for proj in PROJECTIONS}
    plan: dict[str, LayerInjection] = {}
    warnings: list[str] = []
    for patch, strength in patches:
        strength = float(strength)
        if not torch.isfinite(torch.tensor(strength)):
            raise PatchError(f"strength must be a finite number, got {strength}")
        warnings += check_compatible(patch, int(unet.config.cross_attention_dim), names, fingerprint, shapes)
        if strength == 0:
            continue
        for layer in patch.layers:
            mem = patch.memory_for(layer)
            if mem is not None:
                plan.setdefault(to_diffusers[layer], LayerInjection()).memories.append((mem.k, mem.v, strength))
        for module, delta in patch.deltas.items():
            layer, proj = module.split(".attn2.")
            entry = plan.setdefault(to_diffusers[layer + ".attn2"], LayerInjection())
            entry.deltas.setdefault(proj, []).append((delta.weight(), strength))
    return plan, warnings


class AttachedPatches:
    """Handle of patches attached to a UNet; `detach()` restores the original processors exactly."""

    def __init__(self, unet, plan: dict[str, LayerInjection], warnings: list[str]) -> None:
        self.warnings = warnings
        modules = dict(unet.named_modules())
        self._originals = {name: modules[name].processor for name in plan}
        for name, injection in plan.items():
            modules[name].set_processor(MemoryAttnProcessor(injection))
        self._modules = {name: modules[name] for name in plan}

    def detach(self) -> None:
        for name, processor in self._originals.items():
            self._modules[name].set_processor(processor)
        self._originals.clear()


def attach(unet, patches: list[tuple[ErasurePatch, float]]) -> AttachedPatches:
    """Attach patches with strengths. Validation runs first, so a bad patch leaves nothing attached."""
    plan, warnings = plan_injection(unet, patches)
    return AttachedPatches(unet, plan, warnings)


@contextmanager
def attached(unet, patches: list[tuple[ErasurePatch, float]]) -> Iterator[AttachedPatches]:
    handle = attach(unet, patches)
    try:
        yield handle
    finally:
        handle.detach()
