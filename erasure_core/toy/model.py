"""The toy text-to-image model: an SD-layout UNet and a small CLIP text encoder.

Pixel space at 32x32. Cross-attention (attn2) lives only at the 8x8 level and in
the middle block, in the same CrossAttnDown/CrossAttnUp/mid layout as SD, so the
layer names map onto the LDM paths exactly as for a real checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..backends.diffusers_backend import DiffusersDenoiser
from .vocabulary import ToyVocabulary
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
                        clip_sample=True, set_alpha_to_one=False, steps_offset=1)


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
    return DDPMScheduler.from_config(SCHEDULER_CONFIG)


def save_weights(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, folder: Path,
                 dtype: torch.dtype = torch.float16) -> None:
    """Ship the weights as safetensors (fp16 keeps the repo small) with their configs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / f"{name}.safetensors"))
    (folder / "unet_config.json").write_text(json.dumps(UNET_CONFIG, indent=1))
    (folder / "text_config.json").write_text(json.dumps(TEXT_CONFIG, indent=1))
    tokenizer.save_pretrained(str(folder / "tokenizer"))


def _keys_for(module: torch.nn.Module, state: dict) -> dict:
    """transformers 5 names CLIPTextModel's weights without the "text_model." prefix that 4.x uses (the WebUIs
    pin 4.30 and 4.46): rename the shipped weights to whichever the installed version expects."""
    expected = set(module.state_dict())
    if set(state) <= expected:
        return state
    prefixed = {f"text_model.{k}": v for k, v in state.items()}
    return prefixed if set(prefixed) <= expected else state


def load_toy_model(folder: Path = ASSETS, device: str | torch.device = "cpu") -> DiffusersDenoiser:
    """Load the shipped toy model in fp32 behind the diffusers backend; nothing is downloaded."""
    tokenizer = load_tokenizer(folder / "tokenizer")
    unet_cfg = json.loads((folder / "unet_config.json").read_text())
    text_cfg = json.loads((folder / "text_config.json").read_text())
    unet = UNet2DConditionModel(**unet_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, **text_cfg))
    for module, name in ((unet, "unet"), (text_encoder, "text_encoder")):
        state = _keys_for(module, {k: v.float() for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
        missing, unexpected = module.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("position_ids") for k in missing):  # a buffer older versions keep
            raise ValueError(f"{folder / name}.safetensors does not fit the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        module.to(device)
    model = DiffusersDenoiser(unet, text_encoder, tokenizer, SCHEDULER_CONFIG, name="toy", vocabulary=ToyVocabulary(),
                              default_guidance=3.0)  # the guidance the toy model was trained and measured at
    # SAeUron's sparse autoencoder for this model ships beside it (toy.sae.safetensors, made by
    # bench/saeuron_toy.py: 192 prompts x 1 seed x 10 steps, 565 s on 2 cores), so no run trains it again
    model.sae_folder = folder
    return model
