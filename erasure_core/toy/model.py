"""The toy text-to-image model: an SD-layout UNet and a small CLIP text encoder.

Pixel space at 32x32. Cross-attention (attn2) lives only at the 8x8 level and in
the middle block, in the same CrossAttnDown/CrossAttnUp/mid layout as SD, so the
layer names map onto the LDM paths exactly as for a real checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..sampling import ddim_sample, seeded_noise
from .world import RESOLUTION, all_caption_words

ASSETS = Path(__file__).resolve().parent / "assets"
MAX_TOKENS = 16

UNET_CONFIG = dict(
    sample_size=RESOLUTION,
    in_channels=3,
    out_channels=3,
    block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=32,
    norm_num_groups=32,
)

TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    projection_dim=128,
)

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                        clip_sample=True)


def build_tokenizer() -> CLIPTokenizer:
    """Train the word-level BPE once; the result is committed (ids are not stable across runs)."""
    tok = CLIPTokenizer().train_new_from_iterator(all_caption_words(), vocab_size=1000)
    tok.model_max_length = MAX_TOKENS
    return tok


def load_tokenizer(path: Path = ASSETS / "tokenizer") -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TEXT_CONFIG)
    return CLIPTextModel(cfg)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULER_CONFIG, set_alpha_to_one=False, steps_offset=1)


@dataclass
class ToyModel:
    """The loaded toy model: what a diffusers pipeline would hold, minus the VAE (pixel space)."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context).sample

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 2.0,
                 batch: int = 128, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Images (N,3,H,W) in [0,1], one per (prompt, seed) pair."""
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        device = self.unet.device
        shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        out, total = [], steps * ((len(prompts) + batch - 1) // batch)
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            cond = self.encode(chunk)
            uncond = self.encode([""]).expand_as(cond)
            noise = seeded_noise(seeds[i:i + batch], shape, device)
            report = (lambda k, _n, base=steps * (i // batch): progress(base + k, total)) if progress else None
            x = ddim_sample(self.predict_noise, cond, uncond, noise, sample_scheduler(), steps, guidance, report)
            out.append(((x.clamp(-1, 1) + 1) / 2).cpu())
        return torch.cat(out)


def save_weights(model: ToyModel, folder: Path, dtype: torch.dtype = torch.float16) -> None:
    """Ship the weights as safetensors (fp16 keeps the repo small) with their configs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in (("unet", model.unet), ("text_encoder", model.text_encoder)):
        state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / f"{name}.safetensors"))
    (folder / "unet_config.json").write_text(json.dumps(UNET_CONFIG, indent=1))
    (folder / "text_config.json").write_text(json.dumps(TEXT_CONFIG, indent=1))


def load_toy_model(folder: Path = ASSETS, device: str | torch.device = "cpu") -> ToyModel:
    """Load the shipped toy model in fp32; nothing is downloaded."""
    tokenizer = load_tokenizer(folder / "tokenizer")
    unet_cfg = json.loads((folder / "unet_config.json").read_text())
    text_cfg = json.loads((folder / "text_config.json").read_text())
    unet = UNet2DConditionModel(**unet_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, **text_cfg))
    for module, name in ((unet, "unet"), (text_encoder, "text_encoder")):
        state = {k: v.float() for k, v in load_file(str(folder / f"{name}.safetensors")).items()}
        module.load_state_dict(state, strict=True)
        module.to(device).eval().requires_grad_(False)
    return ToyModel(unet, text_encoder, tokenizer)
