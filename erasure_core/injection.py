"""Concept-memory injection for diffusers UNets, through attention processors.

In each selected attn2 layer: K = W_k·[c ; P_k], V = W_v·[c ; s·P_v], Q = W_q·x, and
every projection W becomes W + s·ΔW when the patch carries a delta. Deltas of other
modules (ESD-u's, outside cross-attention) are added by a forward hook on the module:
y + s·ΔW·x. Weights are never modified: deltas are added functionally at call time.

Strength s: 0 removes the patch entirely (bit-identical to no patch); 1 is the
trained behaviour; in between the memory keys stay and their values fade (V
scales linearly, which is what ComfyUI's and A1111's context hooks can express
too), and deltas scale linearly. Several patches compose: memories concatenate
along the token axis, deltas add. Attaching on top of attached patches composes
the same way, and detaching restores exactly what was there before.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .layers import PROJECTIONS, attn2_layers, is_attn2_projection, unet_modules
from .patch import ErasurePatch, PatchError, WeightDelta, check_compatible, model_fingerprint

__all__ = ["PROJECTIONS", "LayerInjection", "InjectionPlan", "MemoryAttnProcessor", "AttachedPatches", "plan_layers",
           "plan_injection", "delta_output", "delta_hook", "attach", "attached"]


@dataclass
class LayerInjection:
    """What one attn2 layer receives: memory tokens (k, v, strength) and weight deltas per projection."""

    memories: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)
    deltas: dict[str, list[tuple[WeightDelta, float]]] = field(default_factory=dict)

    def combined(self, later: LayerInjection) -> LayerInjection:
        """This layer's injection followed by a later one: memories concatenate, deltas add."""
        deltas = {proj: list(items) for proj, items in self.deltas.items()}
        for proj, items in later.deltas.items():
            deltas.setdefault(proj, []).extend(items)
        return LayerInjection(self.memories + later.memories, deltas)


def _extend_mask(mask: torch.Tensor, extra: int, batch: int, heads: int) -> torch.Tensor:
    """Append `extra` always-visible key positions and shape the mask for scaled_dot_product_attention."""
    visible = torch.ones((), dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool \
        else torch.zeros((), dtype=mask.dtype, device=mask.device)
    if extra:
        mask = torch.cat([mask, visible.expand(*mask.shape[:-1], extra)], dim=-1)
    if mask.dim() == 2:  # (B, keys)
        return mask[:, None, None, :]
    if mask.dim() == 3:  # (B, queries or 1, keys), or diffusers' head-repeated (B*heads, ..., keys)
        return mask.unsqueeze(1) if mask.shape[0] == batch else mask.view(batch, heads, *mask.shape[1:])
    return mask


class MemoryAttnProcessor:
    """Cross-attention over [text context ; memory tokens], with functional weight deltas."""

    def __init__(self, injection: LayerInjection) -> None:
        self.injection = injection

    def _linear(self, module: torch.nn.Linear, projection: str, x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        for delta, strength in self.injection.deltas.get(projection, ()):
            weight = weight + strength * delta.weight().to(weight.device, weight.dtype)
        return F.linear(x, weight, module.bias)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        if hidden_states.dim() != 3 or encoder_hidden_states is None:
            raise RuntimeError("concept memory applies to cross-attention on (B, N, C) hidden states only")
        residual = hidden_states
        batch, heads = hidden_states.shape[0], attn.heads
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        context_k = context_v = context
        memories = self.injection.memories
        if memories:
            device, dtype = context.device, context.dtype
            mem_k = torch.cat([k.to(device, dtype) for k, _, _ in memories])
            mem_v = torch.cat([(strength * v).to(device, dtype) for _, v, strength in memories])
            context_k = torch.cat([context, mem_k.expand(batch, -1, -1)], dim=1)
            context_v = torch.cat([context, mem_v.expand(batch, -1, -1)], dim=1)
        if attention_mask is not None:  # memory tokens are always visible
            attention_mask = _extend_mask(attention_mask, context_k.shape[1] - context.shape[1], batch, heads)
        q = self._linear(attn.to_q, "to_q", hidden_states)
        k = self._linear(attn.to_k, "to_k", context_k)
        v = self._linear(attn.to_v, "to_v", context_v)
        q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1])
        out = self._linear(attn.to_out[0], "to_out.0", out)
        out = attn.to_out[1](out)  # dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _ready(tensor: torch.Tensor, ready: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Prepare frozen tensors once; trainable ones stay as they are so gradients reach them."""
    return tensor if tensor.requires_grad else ready(tensor.detach())


@dataclass
class InjectionPlan:
    """What attaching patches does: per attn2 layer, its memory and projection deltas (applied by the attention
    hook); per other module (ESD-u's deltas), the deltas a forward hook adds to its output; and the warnings."""

    layers: dict[str, LayerInjection]
    modules: dict[str, list[tuple[WeightDelta, float]]]
    warnings: list[str]


def plan_layers(patches: list[tuple[ErasurePatch, float]], layer_names: list[str], context_dim: int,
                shapes: dict[str, tuple[int, ...]], fingerprint: Callable[[], str] | None = None,
                ready: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> InjectionPlan:
    """Validate every patch against a model and work out each layer's and module's injection, changing nothing.

    Host-agnostic: every backend describes its model by canonical layer names, context dimension and the shapes
    of its weights (canonical module paths). `ready` prepares frozen tensors (e.g. moves them to the model's
    device); trainable ones are kept as they are so that gradients reach them."""
    model_fp = fingerprint() if fingerprint is not None and any(p.base_fingerprint for p, _ in patches) else None
    plan = InjectionPlan({}, {}, [])
    for patch, strength in patches:
        strength = float(strength)
        if not torch.isfinite(torch.tensor(strength)):
            raise PatchError(f"strength must be a finite number, got {strength}")
        plan.warnings.extend(check_compatible(patch, context_dim, layer_names, model_fp, shapes))
        if strength == 0:
            continue
        for layer in patch.layers:
            mem = patch.memory_for(layer)
            if mem is not None:
                plan.layers.setdefault(layer, LayerInjection()).memories.append(
                    (_ready(mem.k, ready), _ready(mem.v, ready), strength))
        for module, delta in patch.deltas.items():
            trainable = any(t is not None and t.requires_grad for t in (delta.full, delta.down, delta.up))
            prepared = delta if trainable else WeightDelta(full=ready(delta.weight().detach()))
            if is_attn2_projection(module):
                layer, projection = module.split(".attn2.")
                plan.layers.setdefault(layer + ".attn2", LayerInjection()).deltas.setdefault(projection, []).append(
                    (prepared, strength))
            else:
                plan.modules.setdefault(module, []).append((prepared, strength))
    return plan


def delta_output(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ΔW applied to x the way `module` (a linear or conv layer) applies its own weight, without the bias."""
    weight = weight.to(x.device, x.dtype)
    if weight.dim() == 4:
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight)


def delta_hook(deltas: list[tuple[WeightDelta, float]]):
    """Forward hook (register with with_kwargs=True): output + Σ s·ΔW·x, so the weight itself is never written."""
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("input")
        for delta, strength in deltas:
            output = output + delta_output(module, x, strength * delta.weight())
        return output
    return hook


def plan_injection(unet, patches: list[tuple[ErasurePatch, float]]) -> InjectionPlan:
    """plan_layers for a diffusers UNet, keyed by diffusers module paths."""
    layers = attn2_layers(unet)
    paths = unet_modules(unet)
    modules = dict(unet.named_modules())
    shapes = {name: tuple(modules[path].weight.shape) for name, path in paths.items()}
    device = next(unet.parameters()).device
    plan = plan_layers(patches, [layer.canonical for layer in layers], int(unet.config.cross_attention_dim),
                       shapes, lambda: model_fingerprint(unet), lambda t: t.to(device))
    to_diffusers = {layer.canonical: layer.diffusers for layer in layers}
    return InjectionPlan({to_diffusers[name]: injection for name, injection in plan.layers.items()},
                         {paths[name]: deltas for name, deltas in plan.modules.items()}, plan.warnings)


class AttachedPatches:
    """Handle of patches attached to a UNet; `detach()` restores the previous processors exactly."""

    def __init__(self, unet, plan: InjectionPlan) -> None:
        self.warnings = plan.warnings
        modules = dict(unet.named_modules())
        self._modules = {name: modules[name] for name in plan.layers}
        self._previous = {name: module.processor for name, module in self._modules.items()}
        self._ours: dict[str, MemoryAttnProcessor] = {}
        self._hooks = [modules[name].register_forward_hook(delta_hook(deltas), with_kwargs=True)
                       for name, deltas in plan.modules.items()]
        for name, injection in plan.layers.items():
            previous = self._previous[name]
            if isinstance(previous, MemoryAttnProcessor):  # patches already attached: compose with them
                injection = previous.injection.combined(injection)
            self._ours[name] = MemoryAttnProcessor(injection)
            self._modules[name].set_processor(self._ours[name])

    def detach(self) -> None:
        """Restore the processors found at attach time. Patches attached later must be detached first."""
        covered = [name for name, proc in self._ours.items() if self._modules[name].processor is not proc]
        if covered:
            raise RuntimeError(f"patches attached later still hold {covered[0]}; detach them first")
        for name, processor in self._previous.items():
            self._modules[name].set_processor(processor)
        while self._hooks:
            self._hooks.pop().remove()
        self._ours.clear()
        self._previous.clear()


def attach(unet, patches: list[tuple[ErasurePatch, float]]) -> AttachedPatches:
    """Attach patches with strengths. Validation runs first, so a bad patch leaves nothing attached."""
    return AttachedPatches(unet, plan_injection(unet, patches))


@contextmanager
def attached(unet, patches: list[tuple[ErasurePatch, float]]) -> Iterator[AttachedPatches]:
    """`with attached(unet, [(patch, strength), ...]) as handle:` the patches apply inside the block only."""
    handle = attach(unet, patches)
    try:
        yield handle
    finally:
        handle.detach()
