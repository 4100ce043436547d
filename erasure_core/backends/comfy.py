"""The ComfyUI backend: erasure patches on a ComfyUI MODEL (ModelPatcher) and CLIP, duck-typed.

Nothing here imports ComfyUI: the objects are used through the calls ComfyUI's own code makes (read from
comfy/ldm/modules/attention.py, comfy/model_patcher.py, comfy/model_base.py, comfy/samplers.py). The node pack
(nodes/) passes ComfyUI's objects in; the tests pass contract fakes (tests/comfy_fakes/).

Applying a patch (`apply_patches`), the same arithmetic as erasure_core.injection for diffusers:
- memory: a `MemoryAttn2Patch` set with `set_model_attn2_patch` on a clone. ComfyUI calls it in every
  BasicTransformerBlock with the *unprojected* text context (`value is context` on entry); it appends P_k to
  `context` and s·P_v to `value`, so K = W_k·[c ; P_k] and V = W_v·[c ; s·P_v]. It finds its layer from
  extra_options: `block` = ("input", i) / ("middle", 0) / ("output", i) and `block_index`, the transformer block
  inside the spatial transformer (ComfyUI's `transformer_index` counts spatial transformers across the whole
  UNet, so it is not used). It needs nothing else (`sigmas`, `cond_or_uncond` are absent when a node calls
  apply_model itself) and leaves every other layer alone.
- weight deltas: `add_patches` with `diffusion_model.<ldm path>.weight` keys, checking the returned list, since
  ComfyUI drops every key it does not know without a word.
- SAeUron edits (erasure_core.sae): a `SaeEditWrapper` in the clone's transformer_options["wrappers"]
  ["diffusion_model"], which ComfyUI calls around the UNet with the timesteps; it hooks the block for that call.
  Forge's unet patcher has no such wrapper, and refuses them (`refuse_for_forge`).
- DuMo branches (erasure_core.branch): a `BranchWrapper` beside it, which runs the branch on the call's x,
  timesteps and context and hooks the residual blocks for that call; Forge refuses them too.
- never on the input MODEL: `clone()` shares the nn.Module, so no weight is written, and the patch holds only
  detached tensors, because clone() deep-copies model_options.

Training (`ComfyDenoiser`): nodes run under torch.inference_mode() and ComfyUI's weights are inference tensors,
which autograd refuses to save for backward. The denoiser leaves the user's module alone and, while gradients are
on, runs it through torch.func.functional_call with ordinary tensors that alias the same memory (made through
DLPack outside inference mode: nothing is copied; a dtype DLPack cannot carry is copied instead; dropped by
`release()`); deltas become W + s·ΔW in that parameter set, memories a MemoryAttn2Patch holding the live tensors,
so gradients reach the patch being trained.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch

from ..denoiser import Conditioning
from ..layers import PROJECTIONS, comfy_weight_key, is_canonical_layer, weight_modules
from ..padding import COMFY_CHUNK, pad_by_repetition, padding_repeats
from ..injection import sae_block
from ..patch import ErasurePatch, PatchError, WeightDelta, check_compatible, fingerprint_of
from ..branch import branch_tensors, check_layout, hook_branch, residual_hooks, summed_residuals, target_blocks
from ..sae import edit_all, hook_block, output_hook, patch_features

__all__ = ["MemoryAttn2Patch", "ComfyDenoiser", "apply_patches", "comfy_address", "attn2_modules",
           "address_from_extra_options", "refuse_for_forge"]


_LAYER = re.compile(r"^(input_blocks|middle_block|output_blocks)(?:\.(\d+))?\.\d+\.transformer_blocks\.(\d+)\.attn2$")
_KIND = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
_ORDER = {"input": 0, "middle": 1, "output": 2}

Address = tuple  # (kind, block number, block_index)


def comfy_address(canonical: str) -> Address:
    """`input_blocks.4.1.transformer_blocks.1.attn2` -> ("input", 4, 1): what extra_options carries."""
    m = _LAYER.match(canonical)
    if not m:
        raise ValueError(f"not a canonical cross-attention layer: {canonical!r}")
    kind = _KIND[m.group(1)]
    return kind, 0 if kind == "middle" else int(m.group(2)), int(m.group(3))


def address_from_extra_options(extra_options) -> Address | None:
    """The layer ComfyUI is calling a patch for, or None when the caller does not say."""
    block = extra_options.get("block") if hasattr(extra_options, "get") else None
    if not block or len(block) < 2 or block[0] not in _ORDER:
        return None
    return block[0], 0 if block[0] == "middle" else int(block[1]), int(extra_options.get("block_index", 0) or 0)


class MemoryAttn2Patch:
    """ComfyUI attn2_patch appending concept-memory tokens to the text context of the layers it holds.

    `memories` maps a layer address (comfy_address) to [(P_k, P_v, strength), ...]; several patches'
    memories concatenate. Called as `patch(n, context, value, extra_options)` and returns the three."""

    def __init__(self, memories: dict[Address, list[tuple[torch.Tensor, torch.Tensor, float]]],
                 chunk: int = COMFY_CHUNK) -> None:
        self.memories = {addr: list(entries) for addr, entries in memories.items() if entries}
        self.chunk = chunk

    @classmethod
    def from_patches(cls, patches: list[tuple[ErasurePatch, float]], detach: bool = True,
                     chunk: int = COMFY_CHUNK) -> "MemoryAttn2Patch":
        """Memories of [(patch, strength)]; strength-0 patches are left out. `detach` copies the tensors out of
        any autograd graph (what a MODEL may hold: clone() deep-copies it); training passes live tensors."""
        memories: dict[Address, list] = {}
        for patch, strength in patches:
            strength = float(strength)
            if strength == 0:
                continue
            for layer in patch.layers:
                mem = patch.memory_for(layer)
                if mem is None:
                    continue
                k, v = (t.detach().clone() if detach else t for t in (mem.k, mem.v))
                memories.setdefault(comfy_address(layer), []).append((k, v, strength))
        return cls(memories, chunk)

    def merged(self, later: "MemoryAttn2Patch") -> "MemoryAttn2Patch":
        memories = {addr: list(entries) for addr, entries in self.memories.items()}
        for addr, entries in later.memories.items():
            memories.setdefault(addr, []).extend(entries)
        return MemoryAttn2Patch(memories, self.chunk)

    def __bool__(self) -> bool:
        return bool(self.memories)

    def __call__(self, n, context, value, extra_options):
        addr = address_from_extra_options(extra_options)
        entries = self.memories.get(addr) if addr is not None else None
        if not entries or context is None or context.dim() != 3:
            return n, context, value
        if value is None:
            value = context
        device, dtype = context.device, context.dtype
        mem_k = torch.cat([k.to(device, dtype) for k, _, _ in entries])
        mem_v = torch.cat([(strength * v).to(device, dtype) for _, v, strength in entries])
        repeats = padding_repeats(context, self.chunk)
        if repeats > 1:
            mem_k, mem_v = mem_k.repeat(repeats, 1), mem_v.repeat(repeats, 1)
        batch = context.shape[0]
        context = torch.cat([context, mem_k.unsqueeze(0).expand(batch, -1, -1)], dim=1)
        value = torch.cat([value, mem_v.unsqueeze(0).expand(value.shape[0], -1, -1)], dim=1)
        return n, context, value

    def to(self, device_or_dtype):
        """ComfyUI moves model patches with the model (model_patches_to), and also calls this with the model's
        dtype; memories keep their precision and are cast at call time, so a dtype changes nothing."""
        if isinstance(device_or_dtype, torch.dtype):
            return self
        self.memories = {addr: [(k.to(device_or_dtype), v.to(device_or_dtype), s) for k, v, s in entries]
                         for addr, entries in self.memories.items()}
        return self

    def __repr__(self) -> str:
        tokens = {addr: sum(k.shape[0] for k, _, _ in entries) for addr, entries in self.memories.items()}
        return f"MemoryAttn2Patch({len(tokens)} layers, {max(tokens.values(), default=0)} tokens)"


def _layer_sort_key(name: str):
    kind, block, index = comfy_address(name)
    return _ORDER[kind], block, index


def attn2_modules(diffusion_model) -> dict[str, torch.nn.Module]:
    """{canonical layer name: attn2 module} of a ComfyUI diffusion model (LDM UNet), in LDM order."""
    found = {name: module for name, module in diffusion_model.named_modules()
             if name.endswith(".attn2") and is_canonical_layer(name) and hasattr(module, "to_k")}
    return {name: found[name] for name in sorted(found, key=_layer_sort_key)}


class _ModelInfo:
    """What validation needs from a ComfyUI model: its attn2 layers, projection weights and context width."""

    def __init__(self, base_model, backup: dict | None = None) -> None:
        self.backup = backup if backup is not None else {}  # ModelPatcher.backup: original weights while patched
        diffusion_model = getattr(base_model, "diffusion_model", None)
        if diffusion_model is None:
            raise PatchError("this MODEL has no diffusion_model; erasure patches need an SD1.x / SD2.x / SDXL UNet")
        self.modules = attn2_modules(diffusion_model)
        if not self.modules:
            raise PatchError("this MODEL has no UNet cross-attention (attn2) layers; erasure patches work on "
                             "SD1.x, SD2.x and SDXL UNets")
        self.layers = list(self.modules)
        self.weights = weight_modules(diffusion_model)
        first = next(iter(self.modules.values()))
        self.context_dim = int(first.to_k.weight.shape[1])

    def projection_weights(self) -> dict[str, torch.Tensor]:
        return {f"{layer}.{proj}": module.get_submodule(proj).weight
                for layer, module in self.modules.items() for proj in PROJECTIONS}

    def _original(self, layer: str, proj: str, weight: torch.Tensor) -> torch.Tensor:
        """The checkpoint's weight even while ComfyUI has weight patches (a LoRA, our deltas) baked into the
        shared module: those keep the original in ModelPatcher.backup (a tensor, or a tuple with .weight)."""
        saved = self.backup.get(f"diffusion_model.{layer}.{proj}.weight")
        saved = getattr(saved, "weight", saved)
        return saved if isinstance(saved, torch.Tensor) else weight

    def fingerprint(self) -> str:
        """The base checkpoint's fingerprint (attn2 to_k / to_v in LDM order), as erasure_core.patch defines it."""
        return fingerprint_of((f"{layer}.{proj}.weight",
                               self._original(layer, proj, module.get_submodule(proj).weight))
                              for layer, module in self.modules.items() for proj in ("to_k", "to_v"))

    def check(self, patches: list[tuple[ErasurePatch, float]]) -> list[str]:
        """Refuse what the model cannot take (PatchError); warnings for what is merely unusual."""
        shapes = {name: tuple(m.weight.shape) for name, m in self.weights.items()}
        fingerprint = self.fingerprint() if any(p.base_fingerprint for p, _ in patches) else None
        warnings: list[str] = []
        for patch, strength in patches:
            if not isinstance(patch, ErasurePatch):
                raise PatchError(f"expected an erasure patch, got {type(patch).__name__}")
            if not math.isfinite(float(strength)):
                raise PatchError(f"strength must be a finite number, got {strength}")
            warnings += check_compatible(patch, self.context_dim, self.layers, fingerprint, shapes)
            if "sae" in patch.extra:
                sae_block(patch, shapes)
            if "branch" in patch.extra:
                check_layout(patch, shapes, self.context_dim)
        return warnings


def sae_edits(patches: list[tuple[ErasurePatch, float]]) -> dict[str, list[tuple]]:
    """SAeUron edits per block of the patches at non-zero strength: {LDM block path: [(sae, features, s)]}."""
    edits: dict[str, list[tuple]] = {}
    for patch, strength in patches:
        if "sae" in patch.extra and float(strength) != 0.0:
            edits.setdefault(patch.feature_meta["sae"]["block"], []).append(
                (patch.resolved["sae"], patch_features(patch), float(strength)))
    return edits


class SaeEditWrapper:
    """A ComfyUI DIFFUSION_MODEL wrapper (comfy.patcher_extension; ComfyUI calls wrapper(executor, x, timesteps,
    ...) around UNetModel._forward with the timesteps, not the sigmas): while the diffusion model runs, SAeUron's
    edits hook the output of their blocks. Kept in the clone's transformer_options["wrappers"], so it applies
    wherever that MODEL samples, and nowhere else. Immutable: clone()'s deep copy shares it."""

    def __init__(self, edits: dict[str, list[tuple]]) -> None:
        self.edits = edits

    def __call__(self, executor, x, timesteps=None, *args, **kwargs):
        model = executor.class_obj
        handles = [model.get_submodule(block).register_forward_hook(output_hook(edit_all(e), lambda: timesteps))
                   for block, e in self.edits.items()]
        try:
            return executor(x, timesteps, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def __deepcopy__(self, memo) -> "SaeEditWrapper":
        return self


def branch_edits(patches: list[tuple[ErasurePatch, float]]) -> list[tuple]:
    """The DuMo branches of the patches at non-zero strength: [(tensors, settings, s)]."""
    return [(branch_tensors(p), p.feature_meta["branch"], float(s)) for p, s in patches
            if "branch" in p.extra and float(s) != 0.0]


def branch_blocks(network: torch.nn.Module, branches: list[tuple]) -> dict[torch.nn.Module, int]:
    """The residual blocks of an LDM UNet the branches feed, with the residual each takes."""
    from ..branch import layout_of

    return {network.get_submodule(name): i for name, i in target_blocks(layout_of(branches[0][1])).items()}


class BranchWrapper:
    """A ComfyUI DIFFUSION_MODEL wrapper (see SaeEditWrapper): runs the DuMo branches on the call's x, timesteps
    and context, and while the diffusion model runs, adds their residuals to the skip inputs of the output blocks
    and to the middle block's output. Immutable: clone()'s deep copy shares it."""

    def __init__(self, branches: list[tuple]) -> None:
        self.branches = branches

    def __call__(self, executor, x, timesteps=None, context=None, *args, **kwargs):
        model = executor.class_obj
        found = summed_residuals(self.branches, x, timesteps, context) if context is not None else None
        handles = residual_hooks(branch_blocks(model, self.branches), lambda: found)
        try:
            return executor(x, timesteps, context, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def __deepcopy__(self, memo) -> "BranchWrapper":
        return self


def _find_memory_patch(patch_list: list) -> int | None:
    for i, p in enumerate(patch_list):
        if isinstance(p, MemoryAttn2Patch):
            return i
    return None


DIFFUSION_MODEL_WRAPPERS = "diffusion_model"  # comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
WRAPPER_KEY = "concept-erasure"


def refuse_for_forge(patches: list[tuple[ErasurePatch, float]]) -> None:
    """What Forge's unet patcher cannot apply: SAeUron patches at a non-zero strength (PatchError). The WebUI
    script asks before anything is drawn, since Forge only logs an error raised while it samples."""
    if sae_edits(patches):
        raise PatchError("SAeUron patches edit a block's output at generation time, which Forge's unet patcher "
                         "cannot do yet; apply them in ComfyUI, AUTOMATIC1111 or the CLI")
    if branch_edits(patches):
        raise PatchError("DuMo patches add a branch's residuals to the skip connections at generation time, which "
                         "Forge's unet patcher cannot do yet; apply them in ComfyUI, AUTOMATIC1111 or the CLI")


def keyword_only_add_patches(patcher) -> bool:
    """ComfyUI: add_patches(patches, strength_patch, strength_model); Forge: keyword-only, with a filename."""
    import inspect

    try:
        parameter = inspect.signature(patcher.add_patches).parameters["patches"]
        return parameter.kind == inspect.Parameter.KEYWORD_ONLY
    except (KeyError, TypeError, ValueError):
        return False


def apply_patches(model_patcher, patches: list[tuple[ErasurePatch, float]], chunk: int = COMFY_CHUNK,
                  filename: str = "erasure") -> tuple[object, list[str]]:
    """A new ModelPatcher with the patches applied, and the compatibility warnings: ComfyUI's MODEL, or Forge's
    unet patcher, which has the same calls except a keyword-only `add_patches(*, filename, patches, ...)`.

    Everything is validated before anything is built, and all changes go to a clone: the input patcher, its
    model_options and the shared weights stay exactly as they were, whatever happens. Strength 0 leaves a patch
    out entirely. A MODEL that already carries erasure memory gets one merged MemoryAttn2Patch. Every delta key
    must come back in add_patches' list of applied keys (both hosts drop unknown keys without a word).
    `filename` names the deltas' entries where the patcher keys them by name (Forge). SAeUron patches add a
    SaeEditWrapper, DuMo patches a BranchWrapper, to the clone's DIFFUSION_MODEL wrappers."""
    info = _ModelInfo(model_patcher.model, getattr(model_patcher, "backup", None))
    warnings = info.check(patches)
    active = [(patch, float(strength)) for patch, strength in patches if float(strength) != 0.0]
    clone = model_patcher.clone()
    memory = MemoryAttn2Patch.from_patches(active, detach=True, chunk=chunk)
    edits, branches = sae_edits(active), branch_edits(active)
    if edits or branches:
        if keyword_only_add_patches(clone):
            refuse_for_forge(active)
        to = clone.model_options.setdefault("transformer_options", {})
        wrappers = to.setdefault("wrappers", {}).setdefault(DIFFUSION_MODEL_WRAPPERS, {})
        wrappers = wrappers.setdefault(WRAPPER_KEY, [])
        wrappers += [SaeEditWrapper(edits)] * bool(edits) + [BranchWrapper(branches)] * bool(branches)
    if memory:
        to = clone.model_options.setdefault("transformer_options", {})
        existing = list(to.get("patches", {}).get("attn2_patch", []))
        at = _find_memory_patch(existing)
        if at is None:
            clone.set_model_attn2_patch(memory)
        else:  # one memory patch per model, so padding is detected on the plain text context
            existing[at] = existing[at].merged(memory)
            to["patches"] = dict(to.get("patches", {}))
            to["patches"]["attn2_patch"] = existing
    keyword_only = keyword_only_add_patches(clone)
    host = "Forge's unet patcher" if keyword_only else "ComfyUI"
    # Forge keys each add_patches call by (filename, strengths) and replaces an entry of the same key: every call
    # gets a name no earlier call on this patcher took
    taken = {key[0] for key in getattr(clone, "lora_patches", {}) if isinstance(key, tuple) and key}
    for patch, strength in active:
        if not patch.deltas:
            continue
        deltas = {comfy_weight_key(module): ("diff", (delta.weight().detach().float().cpu().clone(),))
                  for module, delta in patch.deltas.items()}
        if keyword_only:
            name = next(f"{filename}-{i}" for i in range(len(taken) + 1) if f"{filename}-{i}" not in taken)
            taken.add(name)
            applied = clone.add_patches(filename=name, patches=deltas, strength_patch=strength, strength_model=1.0)
        else:
            applied = clone.add_patches(deltas, strength)
        missing = sorted(set(deltas) - set(applied or ()))
        if missing:
            raise PatchError(f"{host} did not apply the weight delta {missing[0]} (it did not take {len(missing)} "
                             f"of {len(deltas)} keys); the model does not have that layer under that name")
    return clone, warnings


class _ApplyModel(torch.nn.Module):
    """Calls base.apply_model, so that torch.func.functional_call can run it with other parameters."""

    def __init__(self, base) -> None:
        super().__init__()
        self.base = base

    def forward(self, *args, **kwargs):
        return self.base.apply_model(*args, **kwargs)


class _Attachment:
    def __init__(self, owner: "ComfyDenoiser", patches: list[tuple[ErasurePatch, float]], warnings: list[str]):
        self.owner, self.patches, self.warnings = owner, patches, warnings

    def detach(self) -> None:
        if self in self.owner._attached:
            self.owner._attached.remove(self)


class ComfyDenoiser:
    """A ComfyUI MODEL (+ CLIP) behind the denoiser protocol (erasure_core.denoiser).

    `load_model(patcher)` (ComfyUI: model_management.load_models_gpu) is called before predictions so the model
    sits on its device with its own weight patches in place; `check_interrupt()` (ComfyUI:
    throw_exception_if_processing_interrupted) is called on every prediction made without gradients (trajectory
    sampling, generation). ComfyUI's apply_model takes sigma and returns x0 for every parameterisation; x_t of
    the DDIM (variance-preserving) convention maps to ComfyUI's x = x_t·sqrt(1 + σ²), and ε = (x − x0) / σ.

    `vae` (ComfyUI's VAE: `decode(latent) -> (N,H,W,3)` in [0,1], `encode((N,H,W,3) pixels) -> latent`) gives
    the protocol's pixel side, `generate`, `decode` and `encode_image`, with process_latent_in / _out around
    it; without one, `sample` still returns x0 in the model's latent space."""

    default_guidance = 7.5  # what SD checkpoints are usually sampled with
    vocabulary = None       # a checkpoint's concepts are open-ended

    def __init__(self, model_patcher, clip=None, width: int = 512, height: int = 512, downscale: int | None = None,
                 name: str = "", load_model: Callable | None = None, check_interrupt: Callable | None = None,
                 chunk: int = COMFY_CHUNK, vae=None) -> None:
        self.patcher = model_patcher
        self.base = model_patcher.model
        self.clip = clip
        self.vae = vae
        self._info = _ModelInfo(self.base, getattr(model_patcher, "backup", None))
        self._loaded = False
        get = getattr(model_patcher, "get_model_object", None)  # honours object patches (ModelSamplingDiscrete node)
        sampling = get("model_sampling") if callable(get) else self.base.model_sampling
        sigmas = getattr(sampling, "sigmas", None)
        if sigmas is None or sigmas.dim() != 1 or len(sigmas) < 2 or not hasattr(sampling, "calculate_denoised"):
            raise ValueError("training and previews need a discrete-time model (SD1.x, SD2.x, SDXL); this MODEL's "
                             "sampling has no sigma table")
        with torch.inference_mode(False):
            self._sigmas = sigmas.detach().to("cpu", torch.float64).clone()
        latent_format = getattr(self.base, "latent_format", None)
        channels = int(getattr(latent_format, "latent_channels", 4))
        if downscale is None:  # pixels per latent cell; ComfyUI's latent formats say so, SD's VAEs use 8
            downscale = int(getattr(latent_format, "spacial_downscale_ratio", 8))
        self.sample_shape = (channels, height // downscale, width // downscale)
        self.width, self.height = width, height
        config = getattr(self.base, "model_config", None)
        self.name = name or (type(config).__name__ if config is not None else "comfyui-model")
        self._load, self._check_interrupt, self.chunk = load_model, check_interrupt, chunk
        self._attached: list[_Attachment] = []
        self._aliases: dict[str, torch.Tensor] | None = None
        self._wrapper = _ApplyModel(self.base)

    # -- the denoiser protocol -------------------------------------------------------------
    @property
    def context_dim(self) -> int:
        return self._info.context_dim

    @property
    def device(self) -> torch.device:
        self._ensure_loaded()
        return next(self.base.diffusion_model.parameters()).device

    def network(self) -> torch.nn.Module:
        return self.base.diffusion_model

    def transformer_block(self, name: str) -> torch.nn.Module:
        if f"{name}.proj_out" not in self.weight_shapes():
            raise KeyError(f"the UNet has no transformer block {name}")
        return self.base.diffusion_model.get_submodule(name)

    def layer_names(self) -> list[str]:
        return list(self._info.layers)

    def cross_attention_modules(self) -> dict[str, torch.nn.Module]:
        return dict(self._info.modules)

    def projection_weights(self) -> dict[str, torch.Tensor]:
        self._ensure_loaded()
        return self._info.projection_weights()

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(m.weight.shape) for name, m in self._info.weights.items()}

    def fingerprint(self) -> str:
        self._ensure_loaded()
        return self._info.fingerprint()

    def scheduler(self):
        """DDIM over the model's own noise schedule (alphas_cumprod = 1 / (1 + σ²)), predicting ε."""
        from diffusers import DDIMScheduler

        alphas_cumprod = 1.0 / (1.0 + self._sigmas ** 2)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        betas = (1.0 - alphas_cumprod / previous).clamp(0.0, 0.999)
        return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.tolist(), clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

    def encode(self, prompts: list[str]) -> Conditioning:
        """Contexts from the user's CLIP, as ordinary tensors (CLIP output made under inference mode is cloned)."""
        if self.clip is None:
            raise ValueError("encoding prompts needs the CLIP that goes with this MODEL")
        contexts, adm = [], []
        self._loaded = False
        with torch.inference_mode(False), torch.no_grad():
            for prompt in prompts:
                out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
                cond, pooled = out if isinstance(out, tuple) else (out, None)
                contexts.append(cond.detach().clone())
                if getattr(self.base, "adm_channels", 0):
                    y = self.base.encode_adm(pooled_output=pooled, width=self.width, height=self.height, crop_w=0,
                                             crop_h=0, target_width=self.width, target_height=self.height,
                                             device=cond.device)
                    if y is not None:
                        adm.append(y.detach().clone())
            device = self.device
            context = pad_by_repetition(contexts).to(device)
            extra = {"y": torch.cat(adm).to(device)} if adm else {}
        return Conditioning(context, extra)

    def prompt_length(self, prompt: str) -> int:
        """Context positions from BOS to the first EOS, found from the tokenizer's output for "" and the prompt."""
        if self.clip is None:
            raise ValueError("prompt lengths need the CLIP that goes with this MODEL")

        def ids(text: str) -> list:
            tokens = self.clip.tokenize(text)
            first = tokens[next(iter(tokens))] if isinstance(tokens, dict) else tokens
            return [t[0] if isinstance(t, (tuple, list)) else t for t in first[0]]

        empty, tokens = ids(""), ids(prompt)
        end = empty[1] if len(empty) > 1 else None
        for i in range(1, len(tokens)):
            if tokens[i] == end:
                return i + 1
        return len(tokens)

    def attach(self, patches: list[tuple[ErasurePatch, float]]) -> _Attachment:
        warnings = self._info.check(patches)  # refuse before attaching anything
        handle = _Attachment(self, [(p, float(s)) for p, s in patches if float(s) != 0.0], warnings)
        self._attached.append(handle)
        return handle

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self._ensure_loaded()
        training = torch.is_grad_enabled()
        if not training and self._check_interrupt is not None:
            self._check_interrupt()
        sigma = self._sigmas[t.long().cpu()].to(x.device, torch.float32)
        shape = (-1,) + (1,) * (x.dim() - 1)
        x_in = x * (sigma ** 2 + 1).sqrt().view(shape)
        kwargs = {"c_crossattn": cond.context, "transformer_options": self._transformer_options(), **cond.extra}
        params = self._parameters(training)
        network = self.base.diffusion_model
        edits = sae_edits([(p, s) for handle in self._attached for p, s in handle.patches])
        handles = [h for block, e in edits.items() for h in hook_block(network, network.get_submodule(block),
                                                                         edit_all(e))]
        branches = branch_edits([(p, s) for handle in self._attached for p, s in handle.patches])
        if branches:
            handles += hook_branch(network, branch_blocks(network, branches), branches)
        try:
            if params:
                denoised = torch.func.functional_call(self._wrapper, params, (x_in, sigma), kwargs, strict=False)
            else:
                denoised = self.base.apply_model(x_in, sigma, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return (x_in - denoised.to(x_in.dtype)) / sigma.view(shape)

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 7.0,
               progress: Callable[[int, int], None] | None = None, negative: str = "") -> torch.Tensor:
        """DDIM + CFG from per-seed noise, one sample per (prompt, seed); returns x0 (N,*sample_shape) in the
        model's latent space (a LATENT's samples are `latent_out` of it). Needs no VAE."""
        from ..sampling import ddim_sample, seeded_noise

        if isinstance(prompts, str):
            raise TypeError("prompts is a list of strings, one per seed")
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        n = len(prompts)
        both = self.encode(list(prompts) + [negative])  # one encode: ComfyUI's padding gives them one length
        cond, uncond = both.select(slice(None, n)), both.select(slice(n, None)).expand(n)
        noise = seeded_noise(seeds, self.sample_shape, self.device)
        return ddim_sample(self.predict_noise, cond, uncond, noise, self.scheduler(), steps, guidance, progress)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 7.0,
                 progress: Callable[[int, int], None] | None = None, negative: str = "") -> torch.Tensor:
        """Images (N,3,H,W) in [0,1] on the CPU, one per (prompt, seed): `sample`, decoded by the VAE."""
        self._require_vae("generating images")
        return self.decode(self.sample(prompts, seeds, steps, guidance, progress, negative))

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x0 in the model's latent space to images (N,3,H,W) float in [0,1] on the CPU, through the VAE."""
        self._require_vae("decoding")
        images = self.vae.decode(self.latent_out(x))
        images = images.reshape(-1, *images.shape[-3:])  # video VAEs add a frame axis
        return images.movedim(-1, 1)[:, :3].float().clamp(0, 1).cpu().contiguous()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N,3,H,W) in [0,1] to x0 in the model's latent space, on the model's device, through the VAE.
        Height and width should be multiples of the VAE's downscale factor (ComfyUI's VAE crops otherwise)."""
        self._require_vae("encoding images")
        latent = self.vae.encode(images[:, :3].movedim(1, -1))
        return self.latent_in(latent).to(self.device)

    def latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        """A VAE latent into the space the model denoises (ComfyUI: process_latent_in)."""
        process = getattr(self.base, "process_latent_in", None)
        return process(latent) if process is not None else latent

    def latent_out(self, latent: torch.Tensor) -> torch.Tensor:
        process = getattr(self.base, "process_latent_out", None)
        return process(latent) if process is not None else latent

    def release(self) -> None:
        """Drop the training view of the weights (and any copy a dtype without DLPack needed)."""
        self._aliases = None

    # -- internals -------------------------------------------------------------------------
    def _require_vae(self, what: str) -> None:
        if self.vae is None:
            raise ValueError(f"{what} needs a VAE: build the ComfyDenoiser with vae= (the VAE that goes with this "
                             "MODEL), or use sample() for latents")

    def _ensure_loaded(self) -> None:
        """Load once, and again after the text encoder ran (loading CLIP may have moved the UNet off the GPU)."""
        if self._load is not None and not self._loaded:
            self._load(self.patcher)
            self._loaded = True

    def _parameters(self, training: bool) -> dict[str, torch.Tensor]:
        """Parameters to run with: none (the module's own) for inference without deltas; while training, all of
        them as tensors autograd may save (`autograd_alias`); attached deltas added functionally as W + s·ΔW."""
        params: dict[str, torch.Tensor] = {}
        if training:
            if self._aliases is None:
                with torch.inference_mode(False), torch.no_grad():
                    self._aliases = {name: autograd_alias(t) for name, t in
                                     list(self._wrapper.named_parameters()) + list(self._wrapper.named_buffers())}
            params.update(self._aliases)
        deltas: dict[str, list[tuple[WeightDelta, float]]] = {}
        for handle in self._attached:
            for patch, strength in handle.patches:
                for module, delta in patch.deltas.items():
                    deltas.setdefault(module, []).append((delta, strength))
        for module, items in deltas.items():
            key = f"base.diffusion_model.{module}.weight"
            weight = params.get(key)
            if weight is None:
                weight = self.base.diffusion_model.get_submodule(module).weight
            total = weight.float()
            for delta, strength in items:
                total = total + strength * delta.weight().to(weight.device, torch.float32)
            params[key] = total.to(weight.dtype)
        return params

    def _transformer_options(self) -> dict:
        """The MODEL's own transformer_options (its patches included), plus the attached memories."""
        base = getattr(self.patcher, "model_options", {}).get("transformer_options", {})
        options = dict(base)
        patches = {name: list(items) for name, items in base.get("patches", {}).items()}
        attached = [(p, s) for handle in self._attached for p, s in handle.patches]
        memory = MemoryAttn2Patch.from_patches(attached, detach=False, chunk=self.chunk)
        if memory:
            existing = patches.get("attn2_patch", [])
            at = _find_memory_patch(existing)
            if at is None:
                patches["attn2_patch"] = existing + [memory]
            else:  # the MODEL already carries erasure memory: one merged patch, as apply_patches makes
                existing[at] = existing[at].merged(memory)
        if patches:
            options["patches"] = patches
        return options


def autograd_alias(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as one autograd may save for backward, over the same memory: an inference tensor re-wrapped through
    DLPack outside inference mode is an ordinary tensor sharing its storage. Call outside inference mode. Only for
    weights nobody writes while it lives (the alias has its own version counter)."""
    tensor = tensor.detach()
    if not tensor.is_inference():
        return tensor
    try:
        return torch.from_dlpack(tensor)
    except (BufferError, RuntimeError, TypeError):  # a dtype or layout DLPack cannot carry (fp8, say)
        return tensor.clone()
