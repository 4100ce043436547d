"""Contract fakes of the WebUI hosts, written from AUTOMATIC1111's and Forge's code (modules/scripts.py,
modules/script_callbacks.py, modules/processing.py, modules/infotext_utils.py, ldm's CrossAttention as A1111's
attention optimisations call it, Forge's backend/patcher/base.py and backend/nn/unet.py).

- `host/` holds the fake `modules` package and `launch` module; `installed()` puts them on sys.path.
- `LdmUNet` is an LDM-layout view of a diffusers UNet: every attn2 is an ldm-style `CrossAttention` registered
  under its LDM path (input_blocks.1.1.transformer_blocks.0.attn2) that calls `self.to_k(context)` and
  `self.to_v(value)`, sharing the diffusers layer's projection modules, and the diffusers UNet's forward runs
  through it. So the same weights can be driven through the diffusers module tree and through the LDM one (the
  same hooks of erasure_core.injection either way), and the results compared.
- `FakeLatentDiffusion` is A1111's `sd_model` (get_learned_conditioning, apply_model, alphas_cumprod,
  parameterization, decode_first_stage); `FakeForgeModel` is Forge's, with `forge_objects.unet` a
  `UnetPatcher` (clone deep-copies model_options, set_model_attn2_patch, keyword-only add_patches that keeps only
  keys of the model's named_parameters; patches run in the transformer block before attn2 with Forge's
  extra_options). Until Forge's first generation its `sd_model` is `FakeInitialModel`, a placeholder; `forge_host()`
  makes `modules_forge` importable, which is how the extension tells Forge from A1111.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

HOST = Path(__file__).resolve().parent / "host"
FORGE = Path(__file__).resolve().parent / "forge"  # modules_forge, the package that tells Forge from A1111
TRANSFORMER_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("transformer_options", default=None)


@contextlib.contextmanager
def installed():
    """The fake `modules` package and `launch` importable for the duration; every trace removed afterwards."""
    def purge():
        for name in list(sys.modules):
            if name in ("modules", "launch", "modules_forge") or name.startswith("modules."):
                del sys.modules[name]

    purge()
    sys.path.insert(0, str(HOST))
    try:
        yield
    finally:
        sys.path.remove(str(HOST))
        purge()


def checksum(module: nn.Module) -> str:
    """sha256 over every state-dict entry (name, dtype, shape, bytes) and every requires_grad flag."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict(keep_vars=True).items()):
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}:{bool(value.requires_grad)}".encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hook_counts(module: nn.Module) -> tuple[int, int]:
    """(forward pre-hooks, forward hooks) registered on any submodule."""
    pre = sum(len(m._forward_pre_hooks) for m in module.modules())
    post = sum(len(m._forward_hooks) for m in module.modules())
    return pre, post


class CrossAttention(nn.Module):
    """ldm.modules.attention.CrossAttention as A1111's sdp optimisation (and Forge's attention) runs it."""

    def __init__(self, to_q, to_k, to_v, to_out, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = to_q, to_k, to_v, to_out

    def forward(self, x, context=None, value=None, mask=None):
        q = self.to_q(x)
        context = x if context is None else context
        k = self.to_k(context)
        v = self.to_v(context if value is None else value)
        b, _, inner = q.shape
        d = inner // self.heads
        q, k, v = (t.view(b, -1, self.heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, inner))


def block_of(canonical: str) -> tuple[tuple[str, int], int]:
    """Forge's extra_options["block"] and ["block_index"] for a canonical attn2 name."""
    parts = canonical.split(".")
    kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
    index = 0 if kind == "middle" else int(parts[1])
    return (kind, index), int(parts[parts.index("transformer_blocks") + 1])


class _Bridge:
    """A diffusers attention processor that hands the layer to its ldm CrossAttention, running Forge's attn2
    patches first when a Forge patcher is sampling (as backend/nn/unet.py's BasicTransformerBlock does)."""

    def __init__(self, ldm_attn: CrossAttention, canonical: str) -> None:
        self.ldm_attn = ldm_attn
        self.block, self.block_index = block_of(canonical)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        context, value = encoder_hidden_states, None
        options = TRANSFORMER_OPTIONS.get()
        patches = (options or {}).get("patches", {}).get("attn2_patch", [])
        if patches:
            extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
            extra.update(block=self.block, block_index=self.block_index, n_heads=self.ldm_attn.heads,
                         dim_head=hidden_states.shape[-1] // self.ldm_attn.heads)
            value = context
            for patch in patches:
                hidden_states, context, value = patch(hidden_states, context, value, extra)
        return self.ldm_attn(hidden_states, context=context, value=value)


class LdmUNet(nn.Module):
    """An LDM-layout view of a diffusers UNet (see the module docstring). The diffusers UNet is kept outside the
    module tree, so named_modules() shows LDM paths only, as in A1111."""

    def __init__(self, unet) -> None:
        from erasure_core.layers import attn2_layers, unet_modules

        super().__init__()
        self._diffusers = [unet]
        self.in_channels, self.out_channels = unet.config.in_channels, unet.config.out_channels
        for layer in attn2_layers(unet):
            attn = unet.get_submodule(layer.diffusers)
            ldm_attn = CrossAttention(attn.to_q, attn.to_k, attn.to_v, nn.Sequential(attn.to_out[0], attn.to_out[1]),
                                      attn.heads)
            self._place(layer.canonical, ldm_attn)
            attn.set_processor(_Bridge(ldm_attn, layer.canonical))
        for ldm_path, diffusers_path in unet_modules(unet).items():  # every other linear and conv layer, shared
            if ".attn2." not in ldm_path:
                self._place(ldm_path, unet.get_submodule(diffusers_path))

    def _place(self, ldm_path: str, module: nn.Module) -> None:
        parent = self
        *path, leaf = ldm_path.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, module)

    @property
    def diffusers_unet(self):
        return self._diffusers[0]

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        return self.diffusers_unet(x, timesteps, context).sample


class _CLIP(nn.Module):
    """A1111's FrozenCLIPEmbedderWithCustomWords, reduced to what the backend uses: tokenize and encode."""

    def __init__(self, tokenizer, encoder) -> None:
        super().__init__()
        self.tokenizer, self.transformer = tokenizer, encoder

    def tokenize(self, texts):
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False).input_ids

    def forward(self, prompts):
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.transformer(ids)[0]


class FakeLatentDiffusion(nn.Module):
    """A1111's `sd_model` over a DiffusersDenoiser's weights (pixel space: decode_first_stage is the identity)."""

    def __init__(self, denoiser) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = LdmUNet(denoiser.unet)
        self.weights = nn.ModuleDict({"unet": denoiser.unet})  # the whole UNet is in state_dict()
        self.cond_stage_model = _CLIP(denoiser.tokenizer, denoiser.text_encoders[0])
        self.first_stage_model = nn.Identity()
        self.register_buffer("alphas_cumprod", denoiser.scheduler().alphas_cumprod.clone())
        self.parameterization = "eps"
        self.sd_checkpoint_info = SimpleNamespace(name_for_extra="toy", model_name="toy")
        self.sd_model_hash = "0123456789"
        self.calls = 0
        for p in self.parameters():  # as in A1111, the UNet's parameters require grad
            p.requires_grad_(True)
        denoiser.text_encoders[0].requires_grad_(False)

    def get_learned_conditioning(self, prompts):
        with torch.inference_mode():  # Forge's does this; the backend must cope with inference tensors
            return self.cond_stage_model(prompts)

    def apply_model(self, x, t, cond):
        self.calls += 1
        return self.model.diffusion_model(x, t, context=cond)

    def decode_first_stage(self, z):
        return z


# -- Forge ---------------------------------------------------------------------------------
class KModel(nn.Module):
    def __init__(self, diffusion_model) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, context=None):
        return self.diffusion_model(x, t, context=context)


class UnetPatcher:
    """backend/patcher/base.py's ModelPatcher surface that extensions use."""

    def __init__(self, model: KModel) -> None:
        self.model = model
        self.lora_patches: dict = {}
        self.model_options: dict = {"transformer_options": {}}

    def clone(self) -> "UnetPatcher":
        n = UnetPatcher(self.model)
        n.lora_patches = self.lora_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)  # patch objects and their tensors included
        return n

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        if "patches" not in to:
            to["patches"] = {}
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        identifier = (filename, strength_patch, strength_model, online_mode)
        keys = {k for k, _ in self.model.named_parameters()}
        taken, these = set(), {}
        for key, value in patches.items():
            if key in keys:
                taken.add(key)
                these.setdefault(key, []).append([strength_patch, value, strength_model, None, None])
        self.lora_patches[identifier] = these
        return taken

    def patched_weights(self) -> dict[str, torch.Tensor]:
        """Weights with every delta merged, as Forge's LoraLoader bakes them (here without touching the module)."""
        weights = {k: v for k, v in self.model.named_parameters()}
        for these in self.lora_patches.values():
            for key, items in these.items():
                for strength, value, strength_model, _, _ in items:
                    kind, (diff,) = value if len(value) == 2 else ("diff", value)
                    assert kind == "diff"
                    weights[key] = weights[key] * strength_model + strength * diff.to(weights[key])
        return weights

    def apply_model(self, x, t, context):
        options = dict(self.model_options["transformer_options"])
        options.update(transformer_index=0, original_shape=list(x.shape))
        token = TRANSFORMER_OPTIONS.set(options)
        try:
            return torch.func.functional_call(self.model, self.patched_weights(), (x, t),
                                              {"context": context}, strict=False)
        finally:
            TRANSFORMER_OPTIONS.reset(token)


class ForgeObjects:
    def __init__(self, unet, clip=None, vae=None, clipvision=None) -> None:
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self) -> "ForgeObjects":
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


@contextlib.contextmanager
def forge_host():
    """Inside `installed()`: the host is Forge (its own package importable) for the duration."""
    sys.path.insert(0, str(FORGE))
    try:
        yield
    finally:
        sys.path.remove(str(FORGE))
        sys.modules.pop("modules_forge", None)


class FakeInitialModel:
    """Forge's shared.sd_model until its first generation loads the checkpoint: no forge_objects, no model."""

    def __init__(self) -> None:
        self.cond_stage_model = None
        self.chunk_length = 75


class FakeForgeModel:
    """Forge's `sd_model`: forge_objects (reset from forge_objects_after_applying_lora before every sampling pass)."""

    def __init__(self, ldm_model: FakeLatentDiffusion) -> None:
        self.ldm = ldm_model
        unet = UnetPatcher(KModel(ldm_model.model.diffusion_model))
        self.forge_objects = ForgeObjects(unet)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.alphas_cumprod = ldm_model.alphas_cumprod

    def get_learned_conditioning(self, prompts):
        return self.ldm.get_learned_conditioning(prompts)

    def decode_first_stage(self, z):
        return z


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes OpenMP's spinning threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
