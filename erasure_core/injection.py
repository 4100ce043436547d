"""Concept-memory injection by hooks on the model's own modules: one mechanism for the hosts whose UNet modules
we call into, diffusers (here) and A1111 (erasure_core.backends.ldm.attach_hooks). ComfyUI and Forge take their
patcher's path instead (erasure_core.backends.comfy.apply_patches).

In each selected attn2 layer, K = W_k·[c ; P_k] and V = W_v·[c ; s·P_v]:
- a forward pre-hook on `to_k` appends P_k to its input and one on `to_v` appends s·P_v, so keys and values end
  the same length whatever attention processor or kernel runs next (IP-Adapter's and any other one the user set
  stay in place and see the memory too);
- a forward hook adds s·ΔW·x (no bias) to the output of a projection, or of any other linear or conv layer a
  delta names (ESD-u's, outside cross-attention): y + s·ΔW·x = (W + s·ΔW)·x + b, with the weight never written.
- a SAeUron patch (erasure_core.sae) edits the output of one transformer block, by a forward hook on the block
  and a pre-hook on the UNet that reads the call's timestep (the edit is per timestep bucket).
- a DuMo patch (erasure_core.branch) runs its branch in a pre-hook on the UNet and adds s·residuals to the skip
  inputs of the output blocks and to the middle block's output.
The hooks go on the outermost module under each name: when an adapter wraps a projection (a LoRA loaded with
peft), the wrapper is called with the memory appended, so the LoRA acts on the memory tokens as well, and a
quantised base layer runs its own forward.

A diffusers attention processor sizes the attention mask from the text context before `to_k` runs; while an
`attention_mask` (diffusers' `encoder_attention_mask`) is passed, a pre-hook on the attn2 layer has
`prepare_attention_mask` add the memory positions, always visible.

Strength s: 0 removes the patch entirely (bit-identical to no patch); 1 is the trained behaviour; in between the
memory keys stay and their values fade (V scales linearly, which is what ComfyUI's and A1111's context hooks can
express too), and deltas scale linearly. Several patches compose: memories concatenate along the token axis in
order, deltas add. Attaching on top of attached patches composes the same way (one set of memory hooks per layer
holds every attachment's memory, so the result equals attaching them together), and detaching, in any order,
removes exactly what that attach added.

Where a host pads the context into r identical copies (ComfyUI, Forge: erasure_core.padding),
the memory is appended r times, keeping its share of attention; an ordinary context has r = 1.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from .layers import PROJECTIONS, attn2_layers, base_layer, is_attn2_projection, unet_modules
from .padding import padding_repeats
from .patch import ErasurePatch, PatchError, WeightDelta, check_compatible, model_fingerprint
from .branch import branch_tensors, check_layout, hook_branch, skip_layout, target_blocks
from .sae import edit_all, hook_block, patch_features

__all__ = ["PROJECTIONS", "LayerInjection", "InjectionPlan", "AttachedPatches", "plan_layers", "plan_injection",
           "delta_output", "delta_hook", "attach_plan", "attach", "attached"]


@dataclass
class LayerInjection:
    """What one attn2 layer receives: memory tokens (k, v, strength) and weight deltas per projection."""

    memories: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)
    deltas: dict[str, list[tuple[WeightDelta, float]]] = field(default_factory=dict)


def _ready(tensor: torch.Tensor, ready: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Prepare frozen tensors once; trainable ones stay as they are so gradients reach them."""
    return tensor if tensor.requires_grad else ready(tensor.detach())


@dataclass
class InjectionPlan:
    """What attaching patches does: per attn2 layer, its memory (appended to the to_k / to_v inputs) and
    projection deltas; per other module (ESD-u's deltas), the deltas a forward hook adds to its output; and the
    warnings."""

    layers: dict[str, LayerInjection]
    modules: dict[str, list[tuple[WeightDelta, float]]]
    warnings: list[str]
    # per transformer block (LDM path, e.g. output_blocks.4.1), SAeUron edits of its output: (sae, features, s)
    blocks: dict[str, list[tuple]] = field(default_factory=dict)
    # DuMo branches: (tensors, settings, s) each, and the residual blocks they feed (module key -> residual index)
    branches: list[tuple] = field(default_factory=list)
    branch_blocks: dict[str, int] = field(default_factory=dict)


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
        if "sae" in patch.extra:
            block, sae = sae_block(patch, shapes)
        if "branch" in patch.extra:
            check_layout(patch, shapes, context_dim)
        if strength == 0:
            continue
        if "sae" in patch.extra:
            plan.blocks.setdefault(block, []).append((sae, patch_features(patch), strength))
        if "branch" in patch.extra:
            plan.branches.append(({k: _ready(v, ready) for k, v in branch_tensors(patch).items()},
                                  patch.feature_meta["branch"], strength))
            plan.branch_blocks = target_blocks(skip_layout(shapes))
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


def sae_block(patch: ErasurePatch, shapes: dict[str, tuple[int, ...]]):
    """The block a SAeUron patch edits and its SAE, refusing a model without that block or of another width."""
    block, sae = patch.feature_meta["sae"]["block"], patch.resolved.get("sae")
    if sae is None:
        raise PatchError("the SAeUron patch has no SAE loaded (load it with load_patch, from its folder)")
    width = shapes.get(f"{block}.proj_out", (None,))[0]
    if width is None:
        raise PatchError(f"the SAeUron patch edits {block}, which this model lacks; it was made for another "
                         "architecture")
    if width != sae.w_enc.shape[0]:
        raise PatchError(f"the SAeUron patch's SAE reads {sae.w_enc.shape[0]} channels, {block} has {width}")
    return block, sae


def _layer_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str | None]:
    """A layer call's input and the keyword it came under (None: positional). torch names it `input`, peft `x`."""
    if args:
        return args[0], None
    for key in ("input", "x", "hidden_states"):
        if key in kwargs:
            return kwargs[key], key
    return None, None


def delta_output(module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ΔW applied to x the way `module` (a linear or conv layer, or an adapter wrapping one) applies its own
    weight, without the bias."""
    weight = weight.to(x.device, x.dtype)
    if weight.dim() == 4:
        conv = base_layer(module)  # a wrapper need not carry the conv's stride and padding itself
        return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.linear(x, weight)


def delta_hook(deltas: list[tuple[WeightDelta, float]]):
    """Forward hook (register with with_kwargs=True): output + Σ s·ΔW·x, so the weight itself is never written."""
    def hook(module, args, kwargs, output):
        x = _layer_input(args, kwargs)[0]
        for delta, strength in deltas:
            output = output + delta_output(module, x, strength * delta.weight())
        return output
    return hook


class _LayerMemory:
    """The memory of every attachment on one attn2 layer, appended by one pre-hook on `to_k` and one on `to_v`.

    One set of hooks per layer, shared by the attachments (in attach order), so patches attached on top of
    others give exactly what attaching them together gives, padding included, and any of them can be detached
    first. The hooks are registered with the first attachment and removed with the last."""

    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def on(cls, attn2: torch.nn.Module) -> "_LayerMemory":
        memory = cls._of.get(attn2)
        if memory is None:
            memory = cls._of[attn2] = cls(attn2)
        return memory

    def __init__(self, attn2: torch.nn.Module) -> None:
        self.attn2 = attn2
        self.entries: dict[object, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self._installed, self._saved_prepare = False, None
        self.handles = [attn2.to_k.register_forward_pre_hook(self._appender(keys=True), with_kwargs=True),
                        attn2.to_v.register_forward_pre_hook(self._appender(keys=False), with_kwargs=True)]
        if callable(getattr(attn2, "prepare_attention_mask", None)):  # a diffusers Attention: masks need room
            self.handles += [attn2.register_forward_pre_hook(self._open_mask, with_kwargs=True),
                             attn2.register_forward_hook(self._close_mask, always_call=True)]

    def add(self, owner: object, memories: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        self.entries.setdefault(owner, []).extend(memories)

    def remove(self, owner: object) -> None:
        self.entries.pop(owner, None)
        if not self.entries:
            while self.handles:
                self.handles.pop().remove()
            if _LayerMemory._of.get(self.attn2) is self:
                del _LayerMemory._of[self.attn2]

    def count(self) -> int:
        return sum(k.shape[0] for entries in self.entries.values() for k, _, _ in entries)

    def tokens(self, keys: bool, like: torch.Tensor) -> torch.Tensor | None:
        """[P_k of each] or [s·P_v of each], concatenated in attach order, in `like`'s device and dtype."""
        parts = [(k if keys else v if s == 1 else s * v).to(like.device, like.dtype)
                 for entries in self.entries.values() for k, v, s in entries]
        return torch.cat(parts) if parts else None

    def _appender(self, keys: bool):
        def hook(module, args, kwargs):
            x, key = _layer_input(args, kwargs)
            if x is None or x.dim() != 3:
                return None
            memory = self.tokens(keys, x)
            if memory is None:
                return None
            memory = memory.repeat(padding_repeats(x), 1)  # r copies for a context padded into r copies
            x = torch.cat([x, memory.expand(x.shape[0], -1, -1)], dim=1)
            return ((x,) + tuple(args[1:]), kwargs) if key is None else (args, {**kwargs, key: x})
        return hook

    def _open_mask(self, module, args, kwargs):
        """Processors size the mask from the text context before to_k runs, all through prepare_attention_mask:
        for this call it appends the memory's positions, always visible (0 in an additive mask, True in a
        boolean one), and sizes for them."""
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if mask is None or context is None or context.dim() != 3:
            return None
        extra = padding_repeats(context) * self.count()
        if not extra:
            return None
        self._installed, self._saved_prepare = True, module.__dict__.get("prepare_attention_mask")
        original = module.prepare_attention_mask

        def prepare(attention_mask, target_length, batch_size, out_dim=3):
            if attention_mask is not None:
                visible = torch.ones((), dtype=torch.bool, device=attention_mask.device) \
                    if attention_mask.dtype == torch.bool else \
                    torch.zeros((), dtype=attention_mask.dtype, device=attention_mask.device)
                attention_mask = torch.cat([attention_mask, visible.expand(*attention_mask.shape[:-1], extra)], -1)
            return original(attention_mask, target_length + extra, batch_size, out_dim)

        module.__dict__["prepare_attention_mask"] = prepare
        return None

    def _close_mask(self, module, args, output):
        if self._installed:  # always called, even when the forward raised: nothing outlives the call
            module.__dict__.pop("prepare_attention_mask", None)
            if self._saved_prepare is not None:
                module.__dict__["prepare_attention_mask"] = self._saved_prepare
            self._installed, self._saved_prepare = False, None
        return None


class AttachedPatches:
    """Handle of attached patches: `detach()` removes exactly the hooks and memory this attach added, in any order
    relative to other attachments, once (again is harmless)."""

    def __init__(self, warnings: list[str] | None = None) -> None:
        self.warnings = list(warnings or [])
        self._handles: list = []
        self._memories: list[_LayerMemory] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles or self._memories)

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._memories:
            self._memories.pop().remove(self)


def attach_plan(plan: InjectionPlan, layers: Mapping[str, torch.nn.Module],
                modules: Mapping[str, torch.nn.Module] | None = None, unet: torch.nn.Module | None = None
                ) -> AttachedPatches:
    """Register the hooks of a plan. `layers` maps the plan's layer keys to attn2 modules (each with `to_k`,
    `to_v` and the projections its deltas name, `to_out.0` included), `modules` the keys of its other deltas
    and of its SAeUron and DuMo blocks to their modules, and `unet` is the network called with the timestep (what
    the SAE edits are bucketed by) and the inputs a DuMo branch reads. Every host that runs its UNet's modules
    itself attaches through here."""
    handle = AttachedPatches(plan.warnings)
    try:
        for name, edits in plan.blocks.items():
            handle._handles += hook_block(unet, modules[name], edit_all(edits))
        if plan.branches:
            handle._handles += hook_branch(unet, {modules[name]: i for name, i in plan.branch_blocks.items()},
                                           plan.branches)
        for name, deltas in plan.modules.items():
            handle._handles.append(modules[name].register_forward_hook(delta_hook(deltas), with_kwargs=True))
        for name, injection in plan.layers.items():
            attn2 = layers[name]
            if injection.memories:
                memory = _LayerMemory.on(attn2)
                memory.add(handle, injection.memories)
                handle._memories.append(memory)
            for projection, deltas in injection.deltas.items():
                handle._handles.append(attn2.get_submodule(projection).register_forward_hook(
                    delta_hook(deltas), with_kwargs=True))
    except BaseException:
        handle.detach()
        raise
    return handle


def plan_injection(unet, patches: list[tuple[ErasurePatch, float]]) -> InjectionPlan:
    """plan_layers for a diffusers UNet, keyed by diffusers module paths (an adapter wrapper's path is that of
    the layer it wraps)."""
    layers = attn2_layers(unet)
    paths = unet_modules(unet)
    modules = dict(unet.named_modules())
    shapes = {name: tuple(base_layer(modules[path]).weight.shape) for name, path in paths.items()}
    device = next(unet.parameters()).device
    plan = plan_layers(patches, [layer.canonical for layer in layers], int(unet.config.cross_attention_dim),
                       shapes, lambda: model_fingerprint(unet), lambda t: t.to(device))
    to_diffusers = {layer.canonical: layer.diffusers for layer in layers}
    return InjectionPlan({to_diffusers[name]: injection for name, injection in plan.layers.items()},
                         {paths[name]: deltas for name, deltas in plan.modules.items()}, plan.warnings,
                         {paths[f"{name}.proj_out"].removesuffix(".proj_out"): edits
                          for name, edits in plan.blocks.items()},
                         plan.branches, {residual_block_path(paths, name): i for name, i in plan.branch_blocks.items()})


def residual_block_path(paths: dict[str, str], canonical: str) -> str:
    """The diffusers path of the residual block at LDM path `canonical` (output_blocks.3.0 -> up_blocks.1.resnets.0),
    from the path of its first convolution."""
    return paths[f"{canonical}.in_layers.2"].removesuffix(".conv1")


def attach(unet, patches: list[tuple[ErasurePatch, float]]) -> AttachedPatches:
    """Attach patches with strengths to a diffusers UNet. Validation runs first, so a bad patch leaves nothing
    attached."""
    plan = plan_injection(unet, patches)
    modules = dict(unet.named_modules())
    return attach_plan(plan, modules, modules, unet)


@contextmanager
def attached(unet, patches: list[tuple[ErasurePatch, float]]) -> Iterator[AttachedPatches]:
    """`with attached(unet, [(patch, strength), ...]) as handle:` the patches apply inside the block only."""
    handle = attach(unet, patches)
    try:
        yield handle
    finally:
        handle.detach()


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


class _AttachmentState:
    """The patches attached inside one module tree at one moment: every submodule's forward hooks, parameters
    and buffers (a host may swap in W + s·ΔW for one call, as ComfyDenoiser does with functional_call) and every
    layer memory's entries. A training step attaches and detaches several views of a patch between its forward
    passes and its backward pass; a block recomputed in the backward pass must see what its forward saw."""

    def __init__(self, root: torch.nn.Module) -> None:  # parameters too: ComfyUI trains through functional_call
        self.hooks = [(m, {name: dict(getattr(m, name)) for name in (*_HOOK_DICTS, "_parameters", "_buffers")
                           if hasattr(m, name)}) for m in root.modules()]
        memories = [_LayerMemory._of.get(m) for m in root.modules()]
        self.entries = [(mem, {owner: list(items) for owner, items in mem.entries.items()})
                        for mem in memories if mem is not None]

    @contextmanager
    def replayed(self) -> Iterator[None]:
        current = [(m, {name: getattr(m, name) for name in dicts}) for m, dicts in self.hooks]
        current_entries = [(mem, mem.entries) for mem, _ in self.entries]
        for m, dicts in self.hooks:  # copies: a handle removed meanwhile still removes from the live dicts
            for name, saved in dicts.items():
                setattr(m, name, type(getattr(m, name))(saved))
        for mem, saved in self.entries:
            mem.entries = saved
        try:
            yield
        finally:
            for m, dicts in current:
                for name, live in dicts.items():
                    setattr(m, name, live)
            for mem, live in current_entries:
                mem.entries = live


@contextmanager
def recomputed_transformer_blocks(network: torch.nn.Module) -> Iterator[int]:
    """While open, every transformer block of `network` (the BasicTransformerBlock of diffusers, of the original
    LDM code, A1111 and ComfyUI alike) keeps no activations for the backward pass and recomputes them there,
    with the patches that were attached when it ran forward: the attention maps at 64 x 64 latents are most of
    a training step's memory. The forward functions are swapped on the module instances and restored on exit;
    the weights are untouched and the gradients the same. Yields the number of blocks."""
    from torch.utils.checkpoint import checkpoint

    blocks = [m for m in network.modules() if type(m).__name__ == "BasicTransformerBlock"]
    originals = [m.__dict__.get("forward") for m in blocks]

    def recomputed(block: torch.nn.Module, forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            state, calls = _AttachmentState(block), []
            # dicts as they are now, a fresh copy for each run: ComfyUI's UNet rewrites
            # transformer_options["block"] before every block, and a block may write into what it is given
            dicts = {i: dict(a) for i, a in enumerate(args) if isinstance(a, dict)}
            dicts.update({n: dict(v) for n, v in kwargs.items() if isinstance(v, dict)})

            def once_more(*a, **k):  # the first call is the forward pass itself, later ones the recomputation
                calls.append(1)
                a = [dict(dicts[i]) if i in dicts else x for i, x in enumerate(a)]
                k = {n: dict(dicts[n]) if n in dicts else v for n, v in k.items()}
                if len(calls) == 1:
                    return forward(*a, **k)
                with state.replayed():
                    return forward(*a, **k)
            return checkpoint(once_more, *args, use_reentrant=False, **kwargs)
        return run

    for block in blocks:
        block.forward = recomputed(block, block.forward)
    try:
        yield len(blocks)
    finally:
        for block, original in zip(blocks, originals):
            if original is None:
                del block.forward
            else:
                block.forward = original
