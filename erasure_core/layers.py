"""Cross-attention layer names: one canonical name per attn2 layer, the LDM module path.

ComfyUI, A1111 and Forge all use LDM paths such as
`input_blocks.1.1.transformer_blocks.0.attn2`; diffusers uses
`down_blocks.0.attentions.0.transformer_blocks.0.attn2`. Patches store canonical
names; this module converts them to and from diffusers paths, kohya keys and
ComfyUI keys. The LDM index arithmetic is derived from the UNet config, so SD1.x,
SD2.x, SDXL and the toy layout are all covered by the same rules:

- input_blocks.0 is conv_in; layer j of down block i is input_blocks[1 + i*(lpb+1) + j], and the
  downsampler that ends the block takes the next index (the last block has none);
- layer j of up block i (each has lpb+1 layers) is output_blocks[i*(lpb+1) + j];
- the attention is submodule `.1` of its LDM block; the middle block's is middle_block.1.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

SELECTION_MODES = ("mid", "midout", "all")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")

_COMFY_BLOCK = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


@dataclass(frozen=True)
class CrossAttentionLayer:
    canonical: str  # LDM path, e.g. input_blocks.1.1.transformer_blocks.0.attn2
    diffusers: str  # module path in a diffusers UNet2DConditionModel

    @property
    def comfy_block(self) -> tuple[str, int]:
        """ComfyUI's `extra_options["block"]`: ("input", i), ("middle", 0) or ("output", i)."""
        part, index = self.canonical.split(".")[:2]
        return _COMFY_BLOCK[part], (0 if part == "middle_block" else int(index))

    @property
    def transformer_index(self) -> int:
        """Index of the transformer block inside its spatial transformer: ComfyUI's `extra_options["block_index"]`
        (ComfyUI's `transformer_index` counts spatial transformers across the whole UNet instead)."""
        return int(re.search(r"transformer_blocks\.(\d+)\.attn2$", self.canonical).group(1))


def _per_block(value: int | Iterable[int], n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def attn2_layers_from_config(config: Mapping[str, Any] | Any) -> list[CrossAttentionLayer]:
    """Every attn2 layer of a UNet2DConditionModel config, in LDM order: input, middle, output."""
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    lpb = _per_block(get("layers_per_block"), len(down))
    depth = _per_block(get("transformer_layers_per_block", 1) or 1, len(down))
    up_depth = get("reverse_transformer_layers_per_block") or depth[::-1]
    layers: list[CrossAttentionLayer] = []
    ldm_index = 1  # input_blocks.0 is conv_in
    for i, kind in enumerate(down):
        for j in range(lpb[i]):
            if "CrossAttn" in kind:
                for k in range(_per_block(depth[i], lpb[i])[j]):
                    layers.append(CrossAttentionLayer(
                        f"input_blocks.{ldm_index}.1.transformer_blocks.{k}.attn2",
                        f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2"))
            ldm_index += 1
        ldm_index += 1 if i < len(down) - 1 else 0  # the downsampler
    mid = get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid and "CrossAttn" in mid:
        for k in range(depth[-1]):
            layers.append(CrossAttentionLayer(f"middle_block.1.transformer_blocks.{k}.attn2",
                                              f"mid_block.attentions.0.transformer_blocks.{k}.attn2"))
    up_lpb = lpb[::-1]
    ldm_index = 0
    for i, kind in enumerate(up):
        for j in range(up_lpb[i] + 1):
            if "CrossAttn" in kind:
                for k in range(_per_block(up_depth[i], up_lpb[i] + 1)[j]):
                    layers.append(CrossAttentionLayer(
                        f"output_blocks.{ldm_index}.1.transformer_blocks.{k}.attn2",
                        f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2"))
            ldm_index += 1
    return layers


def attn2_layers(unet) -> list[CrossAttentionLayer]:
    """The attn2 layers of a diffusers UNet, checked against the modules it really has."""
    layers = attn2_layers_from_config(unet.config)
    present = {name for name, _ in unet.named_modules() if name.endswith("attn2")}
    derived = {layer.diffusers for layer in layers}
    if derived != present:
        raise ValueError(f"unsupported UNet layout: derived attn2 layers {sorted(derived - present)} missing, "
                         f"unexpected {sorted(present - derived)}")
    return layers


_CANONICAL_LAYER = re.compile(
    r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\.transformer_blocks\.\d+\.attn2$")


def is_canonical_layer(name: str) -> bool:
    """Whether `name` has the form of a canonical attn2 layer name (not whether a given model has it)."""
    return bool(_CANONICAL_LAYER.match(name))


def _split_layer(path: str) -> tuple[str, str]:
    """`<...>.attn2.to_out.0` -> (`<...>.attn2`, `.to_out.0`); a bare layer path has an empty suffix."""
    head, sep, tail = path.partition(".attn2")
    if not sep or (tail and not tail.startswith(".")):
        raise ValueError(f"not a cross-attention (attn2) path: {path!r}")
    return head + sep, tail


def layer_of(module: str) -> str:
    """The attn2 layer a projection path belongs to: `<layer>.to_out.0` -> `<layer>`."""
    return _split_layer(module)[0]


def to_diffusers(canonical: str, layers: list[CrossAttentionLayer]) -> str:
    """Canonical path (a layer, or a module inside one such as `<layer>.to_k`) -> diffusers path."""
    layer, suffix = _split_layer(canonical)
    for entry in layers:
        if entry.canonical == layer:
            return entry.diffusers + suffix
    raise ValueError(f"the model has no cross-attention layer {layer!r}; "
                     f"it has: {', '.join(e.canonical for e in layers)}")


def to_canonical(diffusers: str, layers: list[CrossAttentionLayer]) -> str:
    """Diffusers path (a layer, or a module inside one) -> canonical path."""
    layer, suffix = _split_layer(diffusers)
    for entry in layers:
        if entry.diffusers == layer:
            return entry.canonical + suffix
    raise ValueError(f"the model has no cross-attention layer {layer!r}; "
                     f"it has: {', '.join(e.diffusers for e in layers)}")


def select_layers(all_layers: list[str], selection: str | list[str]) -> list[str]:
    """Resolve a selection mode (`mid`, `midout`, `all`) or an explicit list of canonical names."""
    if isinstance(selection, str):
        if selection == "all":
            return list(all_layers)
        if selection == "mid":
            return [n for n in all_layers if n.startswith("middle_block.")]
        if selection == "midout":
            return [n for n in all_layers if n.startswith(("middle_block.", "output_blocks."))]
        raise ValueError(f"unknown layer selection {selection!r}; use one of {', '.join(SELECTION_MODES)} "
                         "or a list of layer names")
    unknown = [n for n in selection if n not in all_layers]
    if unknown:
        raise ValueError(f"the model has no cross-attention layer {unknown[0]!r}; it has: {', '.join(all_layers)}")
    if not selection:
        raise ValueError("the layer selection is empty")
    return [n for n in all_layers if n in selection]  # model order, no duplicates


def kohya_prefix(canonical: str) -> str:
    """`input_blocks.1.1.transformer_blocks.0.attn2.to_k`
    -> `lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k`."""
    return "lora_unet_" + canonical.replace(".", "_")


_KOHYA = re.compile(r"^lora_unet_(input_blocks_\d+|middle_block|output_blocks_\d+)_(\d+)_transformer_blocks_(\d+)"
                    r"_attn2(?:_(to_q|to_k|to_v|to_out_0))?$")


def from_kohya_prefix(prefix: str) -> str:
    """Inverse of kohya_prefix for attn2 layers and their projections (the only modules patches touch)."""
    m = _KOHYA.match(prefix)
    if not m:
        raise ValueError(f"not a kohya key of a cross-attention layer: {prefix!r}")
    block, sub, transformer, projection = m.groups()
    block = re.sub(r"_(\d+)$", r".\1", block)
    path = f"{block}.{sub}.transformer_blocks.{transformer}.attn2"
    return path + ("." + projection.replace("to_out_0", "to_out.0") if projection else "")


def comfy_weight_key(canonical_module: str) -> str:
    """The key ComfyUI's ModelPatcher.add_patches accepts (every other form is dropped silently)."""
    return f"diffusion_model.{canonical_module}.weight"


def from_comfy_weight_key(key: str) -> str:
    """`diffusion_model.<module>.weight` -> `<module>`."""
    if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
        raise ValueError(f"not a ComfyUI diffusion_model weight key: {key!r}")
    module = key[len("diffusion_model."):-len(".weight")]
    _split_layer(module)
    return module
