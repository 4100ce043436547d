"""The diffusers backend: a UNet2DConditionModel with its text encoder(s) behind the denoiser protocol.

Serves the embedded toy model (pixel space, no VAE) and local SD1.x / SD2.x / SDXL
pipeline folders, loaded with `local_files_only` so that nothing is downloaded.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ..denoiser import Conditioning, to_epsilon
from ..sampling import ddim_sample, seeded_noise


class DiffusersDenoiser:
    """A loaded diffusers model. Its weights are frozen and never modified in place."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder, tokenizer, scheduler_config: dict,
                 vae=None, text_encoder_2=None, tokenizer_2=None, name: str = "model", vocabulary=None,
                 default_guidance: float = 7.5) -> None:
        self.unet, self.vae, self.name = unet, vae, name
        self.vocabulary = vocabulary  # erasure_core.vocabulary.Vocabulary when the model knows its world
        self.default_guidance = default_guidance  # what previews sample with
        self.text_encoders = [e for e in (text_encoder, text_encoder_2) if e is not None]
        self.tokenizers = [t for t in (tokenizer, tokenizer_2) if t is not None]
        self.scheduler_config = dict(scheduler_config)
        self.is_sdxl = text_encoder_2 is not None
        self._sample_size: int | None = None  # latent side set by at_resolution; None: the UNet's own
        for module in [unet, vae, *self.text_encoders]:
            if module is not None:
                module.eval().requires_grad_(False)

    # -- the denoiser protocol -------------------------------------------------------------
    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self._sample_size or self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def at_resolution(self, pixels: int) -> "DiffusersDenoiser":
        """The same model, trained on and sampled at `pixels` × `pixels` (lower: less memory); shares every
        module, changes nothing of them."""
        factor = self._vae_scale() * self._down_factor()
        if pixels <= 0 or pixels % factor:
            raise ValueError(f"the resolution must be a positive multiple of {factor} pixels for this model, "
                             f"got {pixels}")
        other = copy.copy(self)
        other._sample_size = pixels // self._vae_scale()
        return other

    def _down_factor(self) -> int:
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return self.sample_shape[-1] * self._vae_scale()

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        contexts, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=self.is_sdxl)
            if self.is_sdxl:  # SDXL conditions on the penultimate layers and the second encoder's pooled output
                contexts.append(out.hidden_states[-2])
                pooled = out[0]
            else:
                contexts.append(out[0])
        cond = Conditioning(torch.cat(contexts, dim=-1).to(self.unet.dtype))
        if self.is_sdxl:
            px = self.image_size
            ids = torch.tensor([px, px, 0, 0, px, px], dtype=self.unet.dtype, device=self.device)
            cond.extra = {"text_embeds": pooled.to(self.unet.dtype), "time_ids": ids.expand(len(prompts), 6)}
        return cond

    # -- text access for attacks (erasure_core.attacks): token ids and embeddings in, conditioning out -----
    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """Padded token ids (B, max_length) of the first tokenizer, as `encode` feeds them to the text encoder."""
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def token_embeddings(self) -> torch.Tensor:
        """The text encoder's input embedding table (V, d), read-only."""
        return self._single_text_encoder().get_input_embeddings().weight.detach()

    def encode_embeddings(self, ids: torch.Tensor, embeds: torch.Tensor) -> Conditioning:
        """`encode` for token ids whose input embeddings (B, T, d) are given: differentiable in `embeds`, so an
        attack can learn or search token embeddings. Position embeddings, masks and layers are the encoder's."""
        encoder = self._single_text_encoder()
        table = encoder.get_input_embeddings()
        if embeds.shape[:2] != ids.shape or embeds.shape[-1] != table.embedding_dim:
            raise ValueError(f"embeddings {tuple(embeds.shape)} do not match ids {tuple(ids.shape)} and width "
                             f"{table.embedding_dim}")
        hook = table.register_forward_hook(lambda _m, _i, out: embeds.to(out.device, out.dtype))
        try:
            context = encoder(ids.to(encoder.device))[0]
        finally:
            hook.remove()
        return Conditioning(context.to(self.unet.dtype))

    def _single_text_encoder(self):
        if len(self.text_encoders) != 1:
            raise ValueError("token-level text access needs a model with one text encoder (not SDXL)")
        return self.text_encoders[0]

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = dict(cond.extra) if cond.extra else None
        out = self.unet(x, t, cond.context, added_cond_kwargs=added).sample
        return to_epsilon(out, x, t, self._alphas_cumprod(), self.scheduler_config.get("prediction_type", "epsilon"))

    def scheduler(self) -> DDIMScheduler:
        # steps take ε: predict_noise converts v- and x0-predictions before any sampler sees them
        return DDIMScheduler.from_config(self.scheduler_config, prediction_type="epsilon")

    def network(self) -> torch.nn.Module:
        return self.unet

    def transformer_block(self, name: str) -> torch.nn.Module:
        from ..layers import unet_modules

        path = unet_modules(self.unet).get(f"{name}.proj_out")
        if path is None:
            raise KeyError(f"the UNet has no transformer block {name}")
        return self.unet.get_submodule(path.removesuffix(".proj_out"))

    def layer_names(self) -> list[str]:
        from ..layers import attn2_layers

        return [layer.canonical for layer in attn2_layers(self.unet)]

    def cross_attention_modules(self) -> dict[str, torch.nn.Module]:
        from ..layers import attn2_layers

        return {layer.canonical: self.unet.get_submodule(layer.diffusers) for layer in attn2_layers(self.unet)}

    def prompt_length(self, prompt: str) -> int:
        return len(self.tokenizer(prompt).input_ids)

    def projection_weights(self) -> dict[str, torch.Tensor]:
        from ..layers import PROJECTIONS, attn2_layers

        modules = dict(self.unet.named_modules())
        return {f"{layer.canonical}.{proj}": modules[f"{layer.diffusers}.{proj}"].weight
                for layer in attn2_layers(self.unet) for proj in PROJECTIONS}

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        from ..layers import unet_modules

        modules = dict(self.unet.named_modules())
        return {name: tuple(modules[path].weight.shape) for name, path in unet_modules(self.unet).items()}

    def attach(self, patches: list):
        from ..injection import attach

        return attach(self.unet, patches)

    def fingerprint(self) -> str:
        from ..patch import model_fingerprint

        return model_fingerprint(self.unet)

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 3.0,
                 progress: Callable[[int, int], None] | None = None, batch: int = 16) -> torch.Tensor:
        """Images (N,3,H,W) float in [0,1] on the CPU, one per (prompt, seed); each depends only on its prompt and
        seed. `batch` bounds how many are sampled at once (16: on 2 CPU cores the toy model runs about 1.7× faster
        per image than at 128, which leaves the caches)."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        return self.generate_from(lambda i, j: self.encode(prompts[i:j]), seeds, steps, guidance, progress, batch)

    @torch.no_grad()
    def generate_from(self, conditioning: Callable[[int, int], Conditioning], seeds: list[int], steps: int = 25,
                      guidance: float = 3.0, progress: Callable[[int, int], None] | None = None,
                      batch: int = 16) -> torch.Tensor:
        """`generate` for conditionings that are not prompts (an attack's learned embeddings):
        `conditioning(i, j)` gives those of images i..j-1, one batch at a time."""
        empty = self.encode([""])
        batches = range(0, len(seeds), batch)
        total, out = steps * len(batches), []
        for b, i in enumerate(batches):
            cond = conditioning(i, i + batch)
            noise = seeded_noise(seeds[i:i + batch], self.sample_shape, self.device).to(self.unet.dtype)
            report = (lambda k, _n, base=b * steps: progress(base + k, total)) if progress else None
            x = ddim_sample(self.predict_noise, cond, empty.expand(len(cond)), noise, self.scheduler(), steps,
                            guidance, report)
            out.append(self.decode(x))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x_0 (VAE latents, or the toy model's pixels in [-1,1]) to images (N,3,H,W) float in [0,1] on the CPU."""
        if self.vae is not None:
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N,3,H,W) in [0,1] to the model's x_0 space (VAE latents, or pixels in [-1,1])."""
        x = images.to(self.device, self.unet.dtype) * 2 - 1
        if self.vae is not None:
            x = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor
        return x.to(self.unet.dtype)

    def _vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def _alphas_cumprod(self) -> torch.Tensor:
        if not hasattr(self, "_alphas"):
            self._alphas = self.scheduler().alphas_cumprod
        return self._alphas


def load_pipeline_folder(path: str | Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> DiffusersDenoiser:
    """Load a local diffusers pipeline folder (SD1.x, SD2.x or SDXL). Nothing is downloaded."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from diffusers import AutoencoderKL

    folder = Path(path)
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json / unet/)")
    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype, **kw)
    text_encoder_2 = tokenizer_2 = None
    if (folder / "text_encoder_2").is_dir():
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", torch_dtype=dtype, **kw)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2", **kw)
    scheduler_config = DDIMScheduler.load_config(folder / "scheduler", **kw)
    model = DiffusersDenoiser(unet, text_encoder, tokenizer, scheduler_config, vae=vae,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, name=folder.name)
    for module in [unet, vae, text_encoder, text_encoder_2]:
        if module is not None:
            module.to(device)
    return model
