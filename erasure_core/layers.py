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

Adapter wrappers (peft's LoRA layers, which `pipe.load_lora_weights` puts in place of `to_k` and others: a
module with a `base_layer` child) are seen through: the wrapper stands under the name of the layer it wraps,
its weight is the base layer's, and its own children (`base_layer`, `lora_A`, ...) are not layers of the UNet.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

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


def base_layer(module):
    """The module an adapter wrapper (peft: a `base_layer` child, possibly nested) wraps; `module` itself if none."""
    while "base_layer" in getattr(module, "_modules", {}):
        module = module._modules["base_layer"]
    return module


def outer_modules(model) -> Iterator[tuple[str, Any]]:
    """named_modules() with adapter wrappers standing for what they wrap: the wrapper's own children are left out,
    so hooks go on the outermost module and the adapter sees what the layer sees."""
    wrapper = None
    for name, module in model.named_modules():
        if wrapper is not None and name.startswith(wrapper):
            continue
        wrapper = name + "." if "base_layer" in getattr(module, "_modules", {}) else None
        yield name, module


def attn2_layers(unet) -> list[CrossAttentionLayer]:
    """The attn2 layers of a diffusers UNet, checked against the modules it really has."""
    layers = attn2_layers_from_config(unet.config)
    present = {name for name, _ in outer_modules(unet) if name.endswith("attn2")}
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


def comfy_weight_key(canonical_module: str) -> str:
    """The key ComfyUI's ModelPatcher.add_patches accepts (every other form is dropped silently)."""
    return f"diffusion_model.{canonical_module}.weight"


def from_comfy_weight_key(key: str) -> str:
    """`diffusion_model.<module>.weight` -> `<module>`."""
    if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
        raise ValueError(f"not a ComfyUI diffusion_model weight key: {key!r}")
    module = key[len("diffusion_model."):-len(".weight")]
    if not is_canonical_module(module):
        raise ValueError(f"not a UNet weight key: {key!r}")
    return module


# -- every weight module of the UNet (ESD-u trains outside cross-attention) ------------------------------------
_TRANSFORMER_LEAF = (r"(?:norm|proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
                     r"|ff\.net\.0\.proj|ff\.net\.2|norm[123]))")
_RESNET_LEAF = r"(?:in_layers\.[02]|emb_layers\.1|out_layers\.[03]|skip_connection)"
_UNET_MODULE = re.compile(
    r"^(?:input_blocks\.0\.0|time_embed\.[02]|label_emb\.0\.[02]|out\.[02]"
    rf"|(?:input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+\.(?:{_TRANSFORMER_LEAF}|{_RESNET_LEAF}|op|conv))$")
# kohya keys write every "." as "_"; these names keep their own underscores
_UNDERSCORED = ("input_blocks", "output_blocks", "middle_block", "transformer_blocks", "time_embed", "label_emb",
                "in_layers", "emb_layers", "out_layers", "skip_connection", "proj_in", "proj_out", "to_out", "to_q",
                "to_k", "to_v")
_RESNET_TO_DIFFUSERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def is_canonical_module(name: str) -> bool:
    """Whether `name` is the LDM path of a UNet module that carries a weight (a linear, conv or norm layer)."""
    return bool(_UNET_MODULE.match(name))


def is_attn2_projection(module: str) -> bool:
    layer, _, projection = module.partition(".attn2.")
    return is_canonical_layer(layer + ".attn2") and projection in PROJECTIONS


def weight_modules(diffusion_model) -> dict:
    """{LDM path: module} of every linear and conv layer of an LDM-layout UNet (ComfyUI, A1111, Forge)."""
    return {name: module for name, module in outer_modules(diffusion_model) if is_canonical_module(name)
            and getattr(getattr(base_layer(module), "weight", None), "dim", lambda: 0)() in (2, 4)}


def from_kohya_module(prefix: str) -> str:
    """Inverse of kohya_prefix for every UNet module: `lora_unet_input_blocks_1_0_in_layers_2`
    -> `input_blocks.1.0.in_layers.2`."""
    if not prefix.startswith("lora_unet_"):
        raise ValueError(f"not a kohya UNet key: {prefix!r}")
    body = prefix[len("lora_unet_"):]
    for word in _UNDERSCORED:
        body = body.replace(word, word.replace("_", "\0"))
    path = body.replace("_", ".").replace("\0", "_")
    if not is_canonical_module(path):
        raise ValueError(f"not a kohya key of a UNet module: {prefix!r}")
    return path


def _diffusers_to_ldm(name: str, lpb: list[int], up_has_attention: list[bool]) -> str | None:
    """One diffusers module path -> its LDM path, by the index arithmetic of attn2_layers_from_config."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    resnet_leaf = {v: k for k, v in _RESNET_TO_DIFFUSERS.items()}
    parts = name.split(".")
    if parts[0] == "mid_block" and len(parts) > 3:
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{resnet_leaf[rest]}" if kind == "resnets" and rest in resnet_leaf else None
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 5:
        return None
    i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        block, start, count = "input_blocks", 1 + sum(n + 1 for n in lpb[:i]), lpb[i]
    else:
        block, start, count = "output_blocks", sum(n + 1 for n in lpb[::-1][:i]), lpb[::-1][i] + 1
    if kind == "resnets" and rest in resnet_leaf:
        return f"{block}.{start + j}.0.{resnet_leaf[rest]}"
    if kind == "attentions":
        return f"{block}.{start + j}.1.{rest}"
    if kind == "downsamplers" and rest == "conv":
        return f"input_blocks.{start + count}.0.op"
    if kind == "upsamplers" and rest == "conv":  # after the last layer: ResBlock[, SpatialTransformer], Upsample
        return f"output_blocks.{start + count - 1}.{2 if up_has_attention[i] else 1}.conv"
    return None


def unet_modules(unet) -> dict[str, str]:
    """{LDM path: diffusers path} of every linear and conv layer of a diffusers UNet, in the UNet's module order."""
    lpb = _per_block(unet.config.layers_per_block, len(unet.config.down_block_types))
    up_has_attention = ["CrossAttn" in kind for kind in unet.config.up_block_types]
    out: dict[str, str] = {}
    for name, module in outer_modules(unet):
        weight = getattr(base_layer(module), "weight", None)
        if weight is None or weight.dim() not in (2, 4):  # linear and conv layers; norms stay out
            continue
        ldm = _diffusers_to_ldm(name, lpb, up_has_attention)
        if ldm is None or not is_canonical_module(ldm):
            raise ValueError(f"unsupported UNet layout: no LDM path for {name}")
        out[ldm] = name
    return out
