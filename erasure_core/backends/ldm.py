"""The AUTOMATIC1111 / Forge backend.

A1111 holds an ldm `LatentDiffusion` (SD1.x, SD2.x) or an sgm `DiffusionEngine` (SDXL) as `p.sd_model` /
`shared.sd_model`. `LdmDenoiser` puts it behind the denoiser protocol (erasure_core.denoiser) through the two
calls every such model has, `get_learned_conditioning` and `apply_model`, so every method trains on the model the
user has loaded, and the tab can draw a before/after preview with it.

Patches are applied by erasure_core.injection's hooks, the same mechanism as for diffusers, on the selected attn2
layers' `to_k` / `to_v` modules, the calls every attention implementation A1111 swaps in makes
(`k = self.to_k(context)`, `v = self.to_v(context)`):

- a forward pre-hook on `to_k` appends P_k to its input, one on `to_v` appends s·P_v, so keys and values end the
  same length whatever attention kernel runs next;
- a forward hook on a projection, or on any other linear or conv layer a delta names (ESD-u), adds s·ΔW·x to its
  output (no bias), so weights are never written, which A1111's own LoRA code (it keeps in-place backups of
  weights) relies on.

`LdmAttachment.detach()` removes what it attached. Strength 0 skips a patch entirely, so it is bit-identical to
no patch. Several patches compose: their memories concatenate in order, their deltas add.

Forge resets its unet patcher before every sampling pass, so there patches go through the patcher instead,
re-applied each time (`apply_forge`). Forge's patcher has ComfyUI's calls, so it takes the ComfyUI backend's
path, erasure_core.backends.comfy.apply_patches: the memory is one `MemoryAttn2Patch` (set with
`set_model_attn2_patch`, merged with erasure memory the patcher already carries), the deltas go through Forge's
keyword-only `add_patches`, whose applied keys are checked.

Forge and ComfyUI pad a shorter conditioning to the length of a longer one in the same batch by repeating it. A
memory appended once would then lose share against the repeated text, so where the context is r identical
copies, the memory is appended r times (erasure_core.padding.padding_repeats), in the hooks as in the
patcher; duplicating every key and value alike leaves attention exactly as it was.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch

from ..denoiser import Conditioning, to_epsilon
from ..injection import AttachedPatches, InjectionPlan, attach_plan
from ..injection import plan_layers as plan_injection_layers
from ..layers import PROJECTIONS, base_layer, is_canonical_layer, weight_modules
from ..patch import ErasurePatch, PatchError, fingerprint_of
from ..sampling import ddim_sample, seeded_noise
from .comfy import apply_patches

__all__ = ["LdmDenoiser", "LdmAttachment", "attn2_modules", "modules_fingerprint", "plan_layers", "attach_hooks",
           "apply_forge"]

_CLIP_TOKENS = 77  # BOS + 75 + EOS: the most a prompt fills in one chunk


def attn2_modules(diffusion_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{canonical name: attn2 module} of an LDM-layout UNet, in LDM order (input, middle, output)."""
    found = {name: module for name, module in diffusion_model.named_modules() if is_canonical_layer(name)}
    if not found:
        raise ValueError("this model has no cross-attention (attn2) layers under LDM paths such as "
                         "input_blocks.1.1.transformer_blocks.0.attn2")
    for name, module in found.items():
        if not all(hasattr(module, p) for p in ("to_q", "to_k", "to_v", "to_out")):
            raise ValueError(f"{name} has no to_q / to_k / to_v / to_out projections")
    return found


def modules_fingerprint(modules: dict[str, torch.nn.Module]) -> str:
    """The base-model fingerprint (erasure_core.patch.fingerprint_of) over attn2 to_k / to_v in LDM order."""
    return fingerprint_of((f"{name}.{proj}.weight", base_layer(getattr(m, proj)).weight)
                          for name, m in modules.items() for proj in ("to_k", "to_v"))


def _projection(attn2: torch.nn.Module, projection: str) -> torch.nn.Module:
    return attn2.to_out[0] if projection == "to_out.0" else getattr(attn2, projection)


def plan_layers(modules: dict[str, torch.nn.Module], patches: list[tuple[ErasurePatch, float]],
                fingerprint: Callable[[], str] | None = None,
                weights: dict[str, torch.nn.Module] | None = None) -> InjectionPlan:
    """injection.plan_layers for the WebUI's attn2 `modules`; `weights` (layers.weight_modules) adds every other
    linear and conv layer, which deltas outside cross-attention (ESD-u) need."""
    names = list(modules)
    context_dim = _projection(modules[names[0]], "to_k").in_features
    shapes = {f"{name}.{proj}": tuple(base_layer(_projection(m, proj)).weight.shape) for name, m in modules.items()
              for proj in PROJECTIONS}
    shapes.update({name: tuple(base_layer(m).weight.shape) for name, m in (weights or {}).items()})
    return plan_injection_layers(patches, names, context_dim, shapes, fingerprint)


LdmAttachment = AttachedPatches  # the handle attach_hooks returns: `.attached`, `.warnings`, `.detach()`


def attach_hooks(modules: dict[str, torch.nn.Module], patches: list[tuple[ErasurePatch, float]],
                 fingerprint: Callable[[], str] | None = None,
                 weights: dict[str, torch.nn.Module] | None = None, unet: torch.nn.Module | None = None
                 ) -> LdmAttachment:
    """Register the hooks of `patches` on the attn2 `modules` (and on `weights` for deltas outside
    cross-attention, on the `unet`'s transformer blocks for SAeUron edits and its residual blocks for DuMo
    branches), through
    erasure_core.injection.attach_plan. Validation runs first: a bad patch attaches nothing."""
    plan = plan_layers(modules, patches, fingerprint, weights)
    if (plan.blocks or plan.branches) and unet is None:
        raise PatchError("SAeUron and DuMo patches need the UNet to attach to (attach_hooks(..., unet=))")
    blocks = {name: unet.get_submodule(name) for name in [*plan.blocks, *plan.branch_blocks]}
    return attach_plan(plan, modules, {**(weights or {}), **blocks}, unet)


class LdmDenoiser:
    """An A1111 `sd_model` (ldm LatentDiffusion or sgm DiffusionEngine) behind the denoiser protocol.

    `resolution` is the training / preview image size (default by architecture: 512 for SD1.x, 768 for a
    v-prediction SD2.x, 1024 for SDXL); `latent_scale` the VAE's downsampling (8 for every SD model).
    `autocast` is a context factory the host runs model calls under (A1111: `modules.devices.autocast`), and
    `device` where inputs go (A1111: `modules.devices.device`; with --medvram / --lowvram the UNet's parameters
    sit on the CPU between calls). The model's weights are never written."""

    default_guidance = 7.5  # what SD checkpoints are usually sampled with
    vocabulary = None       # a checkpoint's concepts are open-ended

    def __init__(self, sd_model, resolution: int | None = None, latent_scale: int = 8,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None, name: str | None = None,
                 device: torch.device | str | None = None):
        self.sd_model = sd_model
        self._device = torch.device(device) if device is not None else None
        self.unet = sd_model.model.diffusion_model
        self.modules = attn2_modules(self.unet)
        self.weights = weight_modules(self.unet)
        self.is_sdxl = hasattr(sd_model, "conditioner")
        self.parameterization = getattr(sd_model, "parameterization", "eps")
        self.alphas_cumprod = torch.as_tensor(sd_model.alphas_cumprod).detach().float().cpu()
        if resolution is None:
            resolution = {2048: 1024}.get(self.context_dim, 768 if self.parameterization == "v" else 512)
        if resolution <= 0 or resolution % (8 * latent_scale):
            raise ValueError(f"the resolution must be a positive multiple of {8 * latent_scale} pixels, "
                             f"got {resolution}")
        channels = getattr(self.unet, "out_channels", None) or getattr(self.unet, "in_channels", 4)
        self.latent_scale = latent_scale
        self.sample_shape = (int(channels), resolution // latent_scale, resolution // latent_scale)
        self.autocast = autocast or contextlib.nullcontext
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.name = name or getattr(info, "name_for_extra", None) or getattr(info, "model_name", None) or "model"

    def at_resolution(self, pixels: int) -> "LdmDenoiser":
        """The same model, trained on and sampled at `pixels` × `pixels` (lower: less memory)."""
        if pixels <= 0 or pixels % (8 * self.latent_scale):
            raise ValueError(f"the resolution must be a positive multiple of {8 * self.latent_scale} pixels, "
                             f"got {pixels}")
        other = copy.copy(self)
        other.sample_shape = (self.sample_shape[0], pixels // self.latent_scale, pixels // self.latent_scale)
        return other

    # -- the denoiser protocol -------------------------------------------------------------
    @property
    def context_dim(self) -> int:
        return int(next(iter(self.modules.values())).to_k.in_features)

    @property
    def device(self) -> torch.device:
        return self._device or next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def encode(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad(), self.autocast():
            c = self.sd_model.get_learned_conditioning(list(prompts))
        if isinstance(c, dict):  # sgm: {"crossattn": (B,T,d), "vector": (B,k)}
            extra = {k: v.clone() for k, v in c.items() if k != "crossattn" and torch.is_tensor(v)}
            return Conditioning(c["crossattn"].clone(), extra)
        return Conditioning(c.clone())  # clone: hosts may hand out inference tensors

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        c = {"crossattn": cond.context, **cond.extra} if self.is_sdxl else cond.context
        with self.autocast():
            out = self.sd_model.apply_model(x, t, c)
        kind = "v_prediction" if self.parameterization == "v" else "epsilon"
        return to_epsilon(out.to(x.dtype), x, t, self.alphas_cumprod, kind)

    def scheduler(self):
        from diffusers import DDIMScheduler

        a = self.alphas_cumprod.double()
        betas = 1 - a / torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
        return DDIMScheduler(num_train_timesteps=len(a), trained_betas=betas.numpy(), clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

    def network(self) -> torch.nn.Module:
        return self.unet

    def transformer_block(self, name: str) -> torch.nn.Module:
        if f"{name}.proj_out" not in self.weight_shapes():
            raise KeyError(f"the UNet has no transformer block {name}")
        return self.unet.get_submodule(name)

    def layer_names(self) -> list[str]:
        return list(self.modules)

    def cross_attention_modules(self) -> dict[str, torch.nn.Module]:
        return dict(self.modules)

    def prompt_length(self, prompt: str) -> int:
        for owner in (getattr(self.sd_model, "cond_stage_model", None),
                      *getattr(getattr(self.sd_model, "conditioner", None), "embedders", [])[:1]):
            tokenize = getattr(owner, "tokenize", None)
            if callable(tokenize):  # A1111's CLIP wrappers: ids without BOS / EOS
                return min(len(tokenize([prompt])[0]) + 2, _CLIP_TOKENS)
            tokenizer = getattr(owner, "tokenizer", None)
            if callable(tokenizer):
                return min(len(tokenizer(prompt).input_ids), _CLIP_TOKENS)
        return min(len(prompt.split()) + 2, _CLIP_TOKENS)  # no tokenizer found: a word count, BOS and EOS

    def projection_weights(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{proj}": _projection(m, proj).weight for name, m in self.modules.items()
                for proj in PROJECTIONS}

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(m.weight.shape) for name, m in self.weights.items()}

    def attach(self, patches: list) -> LdmAttachment:
        return attach_hooks(self.modules, patches, self.fingerprint, self.weights, self.unet)

    def fingerprint(self) -> str:
        return modules_fingerprint(self.modules)

    # -- training and preview helpers ------------------------------------------------------
    @contextlib.contextmanager
    def frozen(self):
        """Stop gradients into the host's weights while a patch trains (ldm UNets keep requires_grad=True), and
        restore every flag exactly afterwards."""
        params = [p for p in self.sd_model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield self
        finally:
            for p in params:
                p.requires_grad_(True)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 3.0,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Images (N,3,H,W) in [0,1], one per (prompt, seed): DDIM with CFG, decoded by the model's VAE."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        cond, empty = self.encode(prompts), self.encode([""]).expand(len(prompts))
        noise = seeded_noise(seeds, self.sample_shape, self.device)
        x = ddim_sample(self.predict_noise, cond, empty, noise, self.scheduler(), steps, guidance, progress)
        return self.decode(x)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        first = getattr(self.sd_model, "first_stage_model", None)
        dtype = next(first.parameters(), x).dtype if isinstance(first, torch.nn.Module) else x.dtype
        with self.autocast():
            images = self.sd_model.decode_first_stage(x.to(dtype))
        return ((images.float().clamp(-1, 1) + 1) / 2).cpu()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N,3,H,W) in [0,1] to x0 (scaled VAE latents) on `device`, as A1111's img2img encodes:
        `get_first_stage_encoding(encode_first_stage(2x − 1))` (ldm), or `encode_first_stage` alone (sgm, which
        scales itself). The posterior's mode is taken, so the same image always gives the same latents."""
        encode = getattr(self.sd_model, "encode_first_stage", None)
        if not callable(encode):
            raise ValueError("encoding images needs the model's VAE (sd_model.encode_first_stage); this model has "
                             "none")
        first = getattr(self.sd_model, "first_stage_model", None)
        dtype = next(first.parameters(), images).dtype if isinstance(first, torch.nn.Module) else self.dtype
        x = (images[:, :3].to(self.device, torch.float32) * 2 - 1).to(dtype)
        with self.autocast():
            posterior = encode(x)
            z = posterior if torch.is_tensor(posterior) else posterior.mode()  # ldm: a DiagonalGaussianDistribution
            scale = getattr(self.sd_model, "get_first_stage_encoding", None)
            z = scale(z) if callable(scale) else z
        return z.to(self.device, torch.float32)  # generate's x is float32 too; autocast casts for the UNet


# -- Forge: the unet patcher ----------------------------------------------------------------
def apply_forge(unet_patcher, patches: list[tuple[ErasurePatch, float]], filename: str = "erasure"):
    """Return a clone of Forge's `p.sd_model.forge_objects.unet` with the patches applied; the original is left
    alone. The ComfyUI backend's path (erasure_core.backends.comfy.apply_patches), which Forge's patcher shares:
    the memory goes in through `set_model_attn2_patch` as one MemoryAttn2Patch, merged with erasure memory the
    patcher already carries; deltas through Forge's keyword-only `add_patches` (named after `filename`), whose
    returned keys are checked: a key the patcher dropped is an error, never a silent no-op."""
    return apply_patches(unet_patcher, patches, filename=filename)[0]
