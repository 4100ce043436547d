"""Cross-attention layer names: one canonical name per attn2 layer, the LDM module path.

ComfyUI, A1111 and Forge all use LDM paths such as
`input_blocks.1.1.transformer_blocks.0.attn2`; diffusers uses
`down_blocks.0.attentions.0.transformer_blocks.0.attn2`. Patches store canonical
names; this module converts to diffusers paths, kohya keys and ComfyUI keys.
The LDM index arithmetic is derived from the UNet config, so SD1.x, SD2.x, SDXL
and the toy layout are all covered by the same rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SELECTION_MODES = ("mid", "midout", "all")


@dataclass(frozen=True)
class CrossAttentionLayer:
    canonical: str  # LDM path, e.g. input_blocks.1.1.transformer_blocks.0.attn2
    diffusers: str  # module path in a diffusers UNet2DConditionModel

    @property
    def comfy_block(self) -> tuple[str, int]:
        """ComfyUI's `extra_options["block"]`: ("input", i), ("middle", 0) or ("output", i)."""
        part, index = self.canonical.split(".")[:2]
        return {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[part], \
            (0 if part == "middle_block" else int(index))

    @property
    def transformer_index(self) -> int:
        return int(re.search(r"transformer_blocks\.(\d+)\.attn2$", self.canonical).group(1))


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def attn2_layers_from_config(config) -> list[CrossAttentionLayer]:
    """Every attn2 layer of a UNet2DConditionModel config, in LDM order: input, middle, output."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    lpb = _per_block(get("layers_per_block"), len(down))
    depth = _per_block(get("transformer_layers_per_block", 1) or 1, len(down))
    rev_depth = get("reverse_transformer_layers_per_block") or depth[::-1]
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
        ldm_index += 1 if i < len(down) - 1 else 0  # the downsampler, absent after the last block
    mid = get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid and "CrossAttn" in mid:
        for k in range(depth[-1]):
            layers.append(CrossAttentionLayer(f"middle_block.1.transformer_blocks.{k}.attn2",
                                              f"mid_block.attentions.0.transformer_blocks.{k}.attn2"))
    rev_lpb = lpb[::-1]
    ldm_index = 0
    for i, kind in enumerate(up):
        for j in range(rev_lpb[i] + 1):
            if "CrossAttn" in kind:
                for k in range(_per_block(rev_depth[i], rev_lpb[i] + 1)[j]):
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


def kohya_prefix(canonical_module: str) -> str:
    """`input_blocks.1.1.transformer_blocks.0.attn2.to_k` -> `lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k`."""
    return "lora_unet_" + canonical_module.replace(".", "_")


_KOHYA_PATH = re.compile(
    r"^lora_unet_(input_blocks_\d+|middle_block|output_blocks_\d+)_(\d+)_transformer_blocks_(\d+)_attn2_"
    r"(to_q|to_k|to_v|to_out_0)$")


def from_kohya_prefix(prefix: str) -> str:
    """Inverse of kohya_prefix for attn2 projections (the only modules patches touch)."""
    m = _KOHYA_PATH.match(prefix)
    if not m:
        raise ValueError(f"not a kohya key of a cross-attention projection: {prefix!r}")
    block, sub, tb, proj = m.groups()
    block = re.sub(r"_(\d+)$", r".\1", block)
    return f"{block}.{sub}.transformer_blocks.{tb}.attn2.{proj.replace('to_out_0', 'to_out.0')}"


def comfy_weight_key(canonical_module: str) -> str:
    """The key ComfyUI's ModelPatcher.add_patches accepts (all other forms are dropped silently)."""
    return f"diffusion_model.{canonical_module}.weight"
