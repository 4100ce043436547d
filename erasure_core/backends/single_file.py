"""Single-file Stable Diffusion checkpoints (SD1.x, SD2.x, SDXL `.safetensors`, the files A1111 and ComfyUI load),
offline.

A single file carries weights only. The architecture is read off the tensors' names and shapes (nothing is
downloaded, no YAML is needed); diffusers' own converters rename the original (LDM) keys; the CLIP tokenizer is
built from OpenAI's BPE merges shipped in `erasure_core/assets/clip` (MIT, OpenAI CLIP).

What a file cannot say is whether an SD2.x model predicts noise or velocity: SD2.x defaults to v-prediction (the
768 px models everyone runs), `prediction_type="epsilon"` for the 512 px base models."""
from __future__ import annotations

import gzip
import json
import re
import tempfile
from pathlib import Path

import torch

from .diffusers_backend import DiffusersDenoiser

CLIP_BPE = Path(__file__).resolve().parent.parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


class CheckpointError(ValueError):
    """A file that is not a single-file SD1.x / SD2.x / SDXL checkpoint this loader can read."""


def load_single_file(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     prediction_type: str | None = None) -> DiffusersDenoiser:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name} is a pickled checkpoint, which can run code when loaded; only "
                              ".safetensors checkpoints are read")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path.name} is not a readable .safetensors file ({str(exc).splitlines()[0]})") \
            from None
    family = checkpoint_family(state)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = unet_config(state, family)
    unet = _build(UNet2DConditionModel, config, _convert_unet(state, config), dtype)
    vae = _build(AutoencoderKL, vae_config(state, family), _convert_vae(state, family), dtype)
    encoders, tokenizers = _text_encoders(state, family, dtype)
    default = "v_prediction" if family == "sd2" else "epsilon"
    scheduler = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                 "steps_offset": 1, "prediction_type": prediction_type or default}
    model = DiffusersDenoiser(unet, encoders[0], tokenizers[0], scheduler, vae=vae,
                              text_encoder_2=encoders[1] if len(encoders) > 1 else None,
                              tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None, name=path.stem)
    for module in [unet, vae, *encoders]:
        module.to(device)
    return model


def checkpoint_family(state: dict) -> str:
    """"sd1", "sd2" or "sdxl", by the text encoders the file carries."""
    if f"{UNET}input_blocks.0.0.weight" not in state or f"{VAE}encoder.conv_in.weight" not in state:
        raise CheckpointError("not a Stable Diffusion checkpoint with its VAE (no model.diffusion_model.* and "
                              "first_stage_model.* weights); SD3, Flux and UNet-only files are not read")
    if any(k.startswith(SDXL_TEXT[1]) for k in state):
        return "sdxl"
    if f"{SD2_TEXT}token_embedding.weight" in state:
        return "sd2"
    if any(k.startswith(SD1_TEXT) for k in state):
        return "sd1"
    raise CheckpointError("the checkpoint carries no text encoder this loader knows (CLIP for SD1.x, OpenCLIP for "
                          "SD2.x, both for SDXL)")


# -- the UNet --------------------------------------------------------------------------------------------
def unet_config(state: dict, family: str) -> dict:
    """UNet2DConditionModel's config, from the original UNet's tensors: widths from the convolutions, attention
    from the transformer blocks that exist, heads by family (SD1.x: 8 heads; SD2.x and SDXL: 64 channels each)."""
    width, in_channels = state[f"{UNET}input_blocks.0.0.weight"].shape[:2]
    levels: list[dict] = [{"channels": int(width), "blocks": 0, "depth": 0}]
    for i in range(1, _count(state, rf"{re.escape(UNET)}input_blocks\.(\d+)\.")):
        if f"{UNET}input_blocks.{i}.0.op.weight" in state:  # a downsampler ends the level
            levels.append({"channels": levels[-1]["channels"], "blocks": 0, "depth": 0})
            continue
        level = levels[-1]
        level["channels"] = int(state[f"{UNET}input_blocks.{i}.0.out_layers.3.weight"].shape[0])
        level["blocks"] += 1
        level["depth"] = _count(state, rf"{re.escape(UNET)}input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
    attention = [lv["depth"] > 0 for lv in levels]
    channels = [lv["channels"] for lv in levels]
    to_k = next(v for k, v in state.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in state.items() if k.startswith(UNET) and k.endswith(".1.proj_in.weight"))
    mid_depth = _count(state, rf"{re.escape(UNET)}middle_block\.1\.transformer_blocks\.(\d+)\.")
    depths = [lv["depth"] or 1 for lv in levels]
    if mid_depth != depths[-1]:
        raise CheckpointError(f"unusual UNet: {mid_depth} transformer blocks in the middle, {depths[-1]} in the "
                              "deepest level")
    config = {
        "sample_size": {"sd1": 64, "sd2": 96, "sdxl": 128}[family],
        "in_channels": int(in_channels),
        "out_channels": int(state[f"{UNET}out.2.weight"].shape[0]),
        "block_out_channels": channels,
        "layers_per_block": levels[0]["blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": int(to_k.shape[1]),
        "attention_head_dim": 8 if family == "sd1" else [max(c // 64, 1) for c in channels],
        "use_linear_projection": proj_in.ndim == 2,
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else depths[0],
    }
    if family == "sdxl":
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=int(state[f"{UNET}label_emb.0.0.weight"].shape[1]))
    return config


def _convert_unet(state: dict, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(state, config)


# -- the VAE ---------------------------------------------------------------------------------------------
def vae_config(state: dict, family: str) -> dict:
    width, in_channels = state[f"{VAE}encoder.conv_in.weight"].shape[:2]
    levels = _count(state, rf"{re.escape(VAE)}encoder\.down\.(\d+)\.")
    channels = [int(state[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    return {
        "in_channels": int(in_channels),
        "out_channels": int(state[f"{VAE}decoder.conv_out.weight"].shape[0]),
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": _count(state, rf"{re.escape(VAE)}encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": int(state[f"{VAE}decoder.conv_in.weight"].shape[1]),
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
        "sample_size": {"sd1": 512, "sd2": 768, "sdxl": 1024}[family],
    }


def _convert_vae(state: dict, family: str) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state, vae_config(state, family))


# -- the text encoders and tokenizers ---------------------------------------------------------------------
def _text_encoders(state: dict, family: str, dtype: torch.dtype):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    encoders, tokenizers = [], []
    if family in ("sd1", "sdxl"):
        prefix = SD1_TEXT if family == "sd1" else SDXL_TEXT[0]
        weights = {k: v for k, v in convert_ldm_clip_checkpoint(
            {k: v for k, v in state.items() if k.startswith(prefix)}).items()
            if not k.endswith("position_ids")}
        config = _clip_config(weights["text_model.embeddings.token_embedding.weight"],
                              _count(weights, r"text_model\.encoder\.layers\.(\d+)\."),
                              weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                              weights["text_model.embeddings.position_embedding.weight"].shape[0], "quick_gelu")
        encoders.append(_build(CLIPTextModel, config, weights, dtype))
        tokenizers.append(clip_tokenizer(pad="<|endoftext|>"))
    if family in ("sd2", "sdxl"):
        prefix = SD2_TEXT if family == "sd2" else SDXL_TEXT[1]
        layers = _count(state, rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
        # SD2.x conditions on the penultimate layer (then the final norm): diffusers' encoder drops the last one
        config = _clip_config(state[f"{prefix}token_embedding.weight"], layers - 1 if family == "sd2" else layers,
                              state[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                              state[f"{prefix}positional_embedding"].shape[0], "gelu")
        cls = CLIPTextModel if family == "sd2" else CLIPTextModelWithProjection
        if family == "sdxl":
            config.projection_dim = int(state[f"{prefix}text_projection"].shape[1])
        shell = _empty(cls, config)
        weights = convert_open_clip_checkpoint(shell, state, prefix=prefix)
        weights.pop("text_model.embeddings.position_ids", None)
        if family == "sd2":  # the last block and the projection belong to layers SD2 does not use
            unused = f"text_model.encoder.layers.{layers - 1}."
            weights = {k: v for k, v in weights.items() if not k.startswith(unused) and k != "text_projection.weight"}
        encoders.append(_load(shell, weights, dtype))
        tokenizers.append(clip_tokenizer(pad="!"))
    return encoders, tokenizers


def _clip_config(embedding: torch.Tensor, layers: int, intermediate: int, positions: int, activation: str):
    from transformers import CLIPTextConfig

    vocab, hidden = embedding.shape
    return CLIPTextConfig(vocab_size=int(vocab), hidden_size=int(hidden), intermediate_size=int(intermediate),
                          num_hidden_layers=int(layers), num_attention_heads=max(int(hidden) // 64, 1),
                          max_position_embeddings=int(positions), hidden_act=activation, projection_dim=int(hidden),
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def clip_tokenizer(pad: str = "<|endoftext|>"):
    """CLIP's BPE tokenizer (49408 tokens) from the shipped merges, as Stable Diffusion's text encoders use it;
    SD2.x and SDXL's OpenCLIP encoder pads with "!"."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = write_clip_vocabulary(Path(folder))
        return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad, model_max_length=77)


def write_clip_vocabulary(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of CLIP's tokenizer, built from OpenAI's merges the way CLIP builds them: the 256
    byte symbols, the same with the end-of-word mark, one token per merge, then the two special tokens."""
    lines = gzip.decompress(CLIP_BPE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the merges CLIP was trained with: 49408 tokens in all
    symbols = list(_byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def _byte_symbols() -> dict[int, str]:
    """Byte → printable character, as byte-level BPE spells text: printable Latin-1 bytes stand for themselves,
    the others are shifted past 255 in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return table  # in this order: the first 512 vocabulary entries follow it


# -- building modules without a second copy of the weights ------------------------------------------------
def _empty(cls, config):
    """The module with its parameters on the meta device: no random initialisation, no memory."""
    with torch.device("meta"):
        return cls(config) if not isinstance(config, dict) else cls(**config)


def _build(cls, config, weights: dict, dtype: torch.dtype):
    return _load(_empty(cls, config), weights, dtype)


def _load(module: torch.nn.Module, weights: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Every parameter from the file, or a clear error: a missing or extra tensor means the architecture was
    read wrong or the file is damaged."""
    names = {n for n, _ in module.named_parameters()}
    if not any(n.startswith("text_model.") for n in names):  # transformers 5 dropped CLIP's text_model level
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    missing, extra = sorted(names - weights.keys()), sorted(weights.keys() - names -
                                                            {n for n, _ in module.named_buffers()})
    if missing or extra:
        raise CheckpointError(f"{type(module).__name__}: the file does not match the architecture read off it "
                              f"({len(missing)} tensors missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. "
                              f"{extra[:2]})")
    for name, value in weights.items():
        if name in names and tuple(value.shape) != tuple(module.get_parameter(name).shape):
            raise CheckpointError(f"{type(module).__name__}: {name} has shape {tuple(value.shape)} in the file, "
                                  f"{tuple(module.get_parameter(name).shape)} in the architecture read off it")
    module.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False, assign=True)
    for name, buffer in list(module.named_buffers()):  # buffers the file does not hold (position ids) are built
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            fresh = _materialise(module, name, buffer)
            module.get_submodule(owner).register_buffer(leaf, fresh, persistent=False)
    return module.eval().requires_grad_(False)


def _materialise(module: torch.nn.Module, name: str, buffer: torch.Tensor) -> torch.Tensor:
    if name.endswith("position_ids"):
        return torch.arange(buffer.shape[-1]).expand(buffer.shape)
    raise CheckpointError(f"{type(module).__name__}: no weights for buffer {name}")


def _count(state: dict, pattern: str) -> int:
    """1 + the largest index the pattern's group takes over the keys (0 when none match)."""
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0
