"""DuMo's modulation branch (Han et al., AAAI 2025), our reading: a small trainable encoder beside the frozen UNet
whose residuals are added to the UNet's skip connections and to its middle block's output, each scaled by a
per-timestep, per-residual modulation table. No weight of the model changes.

What is DuMo's and what is ours:
- DuMo: an encoder branch reading x_t, the timestep and the prompt; zero-initialised output projections (the
  untrained branch changes nothing); residuals added to the down and mid skip connections; a table of scales
  indexed by t // 50 and by residual (time_scale.npy in the authors' release).
- ours: the branch is a reduced-width encoder written here (one width for every level, one residual block and
  one cross-attention per level), trained from scratch, not a copy of the UNet's encoder: a copy would make a
  patch as large as the encoder (about 400 MB at SD1.5 size in fp16) and tie it to one host's module layout.
  The table is learned with the branch (DuMo's own table was not derived in public code). The training loss is
  ours too (erasure_core.methods.dumo).

The branch is written as functions over a dict of tensors, so a patch's tensors (frozen, or being trained) run
it directly and gradients reach them. The layout it attaches to (per input block of the UNet: the skip's
channels and its downsampling level; the middle block's) is derived from the model's canonical weight shapes, so
one patch runs in every host and is refused where the layout differs.

Attachment (`hook_branch`): a pre-hook on the UNet computes the residuals from the call's x, timestep and
context; a pre-hook on the first residual block of output block j adds residual n−1−j to the skip half of its
input (the concatenation [h ; skip] it receives in diffusers, LDM/A1111 and ComfyUI alike); a forward hook on
the middle block's last residual block adds the middle residual.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

TIME_BUCKETS = 20  # DuMo's table: one row per 50 training timesteps (t in [0, 1000))
GROUPS = 8
_KEY = re.compile(r"erasure\.branch\.([a-z0-9_.]+)")


def bucket_of(t: torch.Tensor) -> torch.Tensor:
    return (t.float().round() * TIME_BUCKETS / 1000).long().clamp(0, TIME_BUCKETS - 1)


@dataclass(frozen=True)
class SkipLayout:
    """What the branch attaches to: per input block i, the skip's (channels, level), level counting the
    downsamplers up to i; the middle block's (channels, level); the UNet's input channels."""

    skips: tuple[tuple[int, int], ...]
    mid: tuple[int, int]
    in_channels: int

    @property
    def levels(self) -> int:
        return max([level for _, level in self.skips] + [self.mid[1]]) + 1

    def as_meta(self) -> dict:
        return {"skips": [list(s) for s in self.skips], "mid": list(self.mid), "in_channels": self.in_channels}


def skip_layout(shapes: dict[str, tuple[int, ...]]) -> SkipLayout | None:
    """The skip layout of a UNet from its canonical (LDM) weight shapes; None where it has no such layout."""
    if "input_blocks.0.0" not in shapes or "middle_block.2.out_layers.3" not in shapes:
        return None
    skips, level, i = [(shapes["input_blocks.0.0"][0], 0)], 0, 1
    while True:
        if f"input_blocks.{i}.0.op" in shapes:
            level += 1
            skips.append((shapes[f"input_blocks.{i}.0.op"][0], level))
        elif f"input_blocks.{i}.0.out_layers.3" in shapes:
            skips.append((shapes[f"input_blocks.{i}.0.out_layers.3"][0], level))
        else:
            break
        i += 1
    return SkipLayout(tuple(skips), (shapes["middle_block.2.out_layers.3"][0], level), shapes["input_blocks.0.0"][1])


def target_blocks(layout: SkipLayout) -> dict[str, int]:
    """Canonical residual blocks the residuals enter, with the residual's index (the middle's is the last):
    output block j consumes skip n−1−j."""
    n = len(layout.skips)
    return {**{f"output_blocks.{j}.0": n - 1 - j for j in range(n)}, "middle_block.2": n}


def branch_meta(layout: SkipLayout, context_dim: int, width: int = 32, heads: int = 4) -> dict:
    """What erasure.features["branch"] holds: the layout it was trained for and the branch's size."""
    return {**layout.as_meta(), "context_dim": int(context_dim), "width": int(width), "heads": int(heads),
            "buckets": TIME_BUCKETS}


def layout_of(meta: dict) -> SkipLayout:
    return SkipLayout(tuple(tuple(s) for s in meta["skips"]), tuple(meta["mid"]), int(meta["in_channels"]))


def branch_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a branch with these settings, by name, with its shape."""
    w, c, layout = meta["width"], meta["context_dim"], layout_of(meta)
    shapes: dict[str, tuple[int, ...]] = {
        "conv_in.weight": (w, layout.in_channels, 3, 3), "conv_in.bias": (w,),
        "time.0.weight": (4 * w, w), "time.0.bias": (4 * w,), "time.1.weight": (4 * w, 4 * w), "time.1.bias": (4 * w,)}
    for level in range(layout.levels):
        p = f"level{level}."
        if level:
            shapes.update({p + "down.weight": (w, w, 3, 3), p + "down.bias": (w,)})
        for name, shape in (("norm1", (w,)), ("norm2", (w,)), ("norm3", (w,))):
            shapes[p + name + ".weight"] = shapes[p + name + ".bias"] = shape
        shapes.update({p + "conv1.weight": (w, w, 3, 3), p + "conv1.bias": (w,), p + "emb.weight": (w, 4 * w),
                       p + "emb.bias": (w,), p + "conv2.weight": (w, w, 3, 3), p + "conv2.bias": (w,),
                       p + "to_q.weight": (w, w), p + "to_k.weight": (w, c), p + "to_v.weight": (w, c),
                       p + "to_out.weight": (w, w), p + "to_out.bias": (w,)})
    for i, (channels, _) in enumerate([*layout.skips, layout.mid]):
        shapes[f"out.{i}.weight"], shapes[f"out.{i}.bias"] = (channels, w, 1, 1), (channels,)
    shapes["modulation"] = (TIME_BUCKETS, len(layout.skips) + 1)
    return shapes


def init_branch(meta: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh branch tensors: the output projections zero (the untrained branch adds nothing), the modulation
    table one, norms the identity, the rest scaled by fan-in."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in branch_shapes(meta).items():
        if name.startswith("out.") or name.endswith(".bias") and not name.split(".")[-2].startswith("norm"):
            out[name] = torch.zeros(shape)
        elif name == "modulation" or ".norm" in name and name.endswith(".weight"):
            out[name] = torch.ones(shape)
        elif ".norm" in name:
            out[name] = torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            out[name] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return out


def _timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def _norm(p: dict, name: str, h: torch.Tensor) -> torch.Tensor:
    return F.group_norm(h, min(GROUPS, h.shape[1]), p[name + ".weight"], p[name + ".bias"])


def residuals(p: dict[str, torch.Tensor], meta: dict, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor
              ) -> list[torch.Tensor]:
    """The branch's residuals for one UNet call, in float32: one per skip (input block order), then the
    middle's, each scaled by the modulation table at the call's timestep bucket."""
    layout, heads = layout_of(meta), meta["heads"]
    x, context = x.float(), context.float()
    t = torch.as_tensor(t, device=x.device).flatten()
    t = t.expand(len(x)) if t.numel() == 1 else t
    emb = _timestep_features(t, meta["width"])
    emb = F.linear(F.silu(F.linear(emb, p["time.0.weight"], p["time.0.bias"])), p["time.1.weight"], p["time.1.bias"])
    h = F.conv2d(x, p["conv_in.weight"], p["conv_in.bias"], padding=1)
    features = []
    for level in range(layout.levels):
        q = f"level{level}."
        if level:
            h = F.conv2d(h, p[q + "down.weight"], p[q + "down.bias"], stride=2, padding=1)
        r = F.conv2d(F.silu(_norm(p, q + "norm1", h)), p[q + "conv1.weight"], p[q + "conv1.bias"], padding=1)
        r = r + F.linear(F.silu(emb), p[q + "emb.weight"], p[q + "emb.bias"])[:, :, None, None]
        h = h + F.conv2d(F.silu(_norm(p, q + "norm2", r)), p[q + "conv2.weight"], p[q + "conv2.bias"], padding=1)
        b, w, height, width = h.shape
        rows = _norm(p, q + "norm3", h).flatten(2).transpose(1, 2)  # (B, HW, w)
        split = lambda y: y.view(b, -1, heads, w // heads).transpose(1, 2)  # noqa: E731
        ctx = context.expand(b, -1, -1) if len(context) == 1 else context
        attended = F.scaled_dot_product_attention(split(F.linear(rows, p[q + "to_q.weight"])),
                                                  split(F.linear(ctx, p[q + "to_k.weight"])),
                                                  split(F.linear(ctx, p[q + "to_v.weight"])))
        attended = F.linear(attended.transpose(1, 2).reshape(b, -1, w), p[q + "to_out.weight"], p[q + "to_out.bias"])
        h = h + attended.transpose(1, 2).reshape(b, w, height, width)
        features.append(h)
    scale = p["modulation"][bucket_of(t).to(p["modulation"].device)]  # (B, n + 1)
    return [F.conv2d(features[level], p[f"out.{i}.weight"], p[f"out.{i}.bias"]) * scale[:, i, None, None, None]
            for i, (_, level) in enumerate([*layout.skips, layout.mid])]


def summed_residuals(branches: list[tuple[dict, dict, float]], x, t, context) -> list[torch.Tensor]:
    """Σ s·residuals over the attached branches (each (tensors, meta, strength))."""
    total = None
    for tensors, meta, strength in branches:
        parts = [strength * r for r in residuals({k: v.to(x.device) for k, v in tensors.items()}, meta, x, t,
                                                 context)]
        total = parts if total is None else [a + b for a, b in zip(total, parts)]
    return total


def _call_inputs(args: tuple, kwargs: dict):
    """x, timestep and text context of a UNet call: diffusers' (sample, timestep, encoder_hidden_states) or the
    LDM UNetModel's (x, timesteps, context) of ComfyUI, A1111 and Forge."""
    def pick(i: int, *names: str):
        for name in names:
            if name in kwargs:
                return kwargs[name]
        return args[i] if len(args) > i else None
    return pick(0, "sample", "x"), pick(1, "timestep", "timesteps", "t"), pick(2, "encoder_hidden_states", "context")


def residual_hooks(blocks: dict[torch.nn.Module, int], current: Callable[[], list[torch.Tensor] | None]) -> list:
    """Hooks adding residual i of `current()` to block `blocks[module] = i`'s skip input (output blocks: the
    last channels of the input) or output (the middle block, the last index). Returns the handles."""
    last = max(blocks.values())

    def add_to_skip(index: int):
        def hook(_module, args, kwargs):
            found = current()
            if found is None or not args:
                return None
            x, r = args[0], found[index]
            c = r.shape[1]
            x = torch.cat([x[:, :-c], x[:, -c:] + r.to(x.dtype)], dim=1)
            return (x, *args[1:]), kwargs
        return hook

    def add_to_output(_module, _args, out):
        found = current()
        return None if found is None else out + found[last].to(out.dtype)

    return [module.register_forward_hook(add_to_output) if index == last
            else module.register_forward_pre_hook(add_to_skip(index), with_kwargs=True)
            for module, index in blocks.items()]


def hook_branch(unet: torch.nn.Module, blocks: dict[torch.nn.Module, int],
                branches: list[tuple[dict, dict, float]]) -> list:
    """Attach the branches to a UNet called with (x, t, context) (see the module docstring): the UNet's
    pre-hook computes the residuals of each call, the block hooks add them. Returns the handles."""
    current: list = [None]

    def compute(_module, args, kwargs):
        x, t, context = _call_inputs(args, kwargs)
        current[0] = None if x is None or context is None else summed_residuals(branches, x, t, context)

    return [unet.register_forward_pre_hook(compute, with_kwargs=True), *residual_hooks(blocks, lambda: current[0])]


# -- the patch feature ---------------------------------------------------------------------------------------
#
# A DuMo patch carries the branch's tensors as `erasure.branch.<name>` and, in erasure.features["branch"], the
# layout it attaches to and its size (branch_meta). The file is self-contained: a few MB at SD1.5 size.

def branch_tensors(patch) -> dict[str, torch.Tensor]:
    """The branch tensors of a DuMo patch, by branch name."""
    return {_KEY.fullmatch(k).group(1): v for k, v in patch.extra["branch"].items()}


def check_layout(patch, shapes: dict[str, tuple[int, ...]], context_dim: int) -> None:
    """Refuse a model whose skip layout or text width is not the one the branch was trained for."""
    from .patch import PatchError

    meta, layout = patch.feature_meta["branch"], skip_layout(shapes)
    if layout is None:
        raise PatchError("the DuMo patch adds residuals to a UNet's skip connections, and this model has no "
                         "input_blocks / middle_block layout")
    if layout != layout_of(meta):
        raise PatchError(f"the DuMo patch's branch was trained for {len(meta['skips'])} skip connections of "
                         f"{[s[0] for s in meta['skips']]} channels; this model has {[s[0] for s in layout.skips]}: "
                         "it was made for another architecture")
    if int(meta["context_dim"]) != int(context_dim):
        raise PatchError(f"the DuMo patch reads a {meta['context_dim']}-wide text context, this model's is "
                         f"{context_dim}")


def _validate_feature(tensors: dict[str, torch.Tensor], patch, name: str) -> None:
    from .patch import PatchError

    meta = patch.feature_meta.get("branch")
    try:
        layout = layout_of(meta)
        ok = (all(int(c) > 0 and 0 <= int(level) < 16 for c, level in [*layout.skips, layout.mid])
              and 0 < len(layout.skips) <= 64 and 0 < layout.in_channels <= 64
              and 0 < int(meta["context_dim"]) <= 8192 and 0 < int(meta["heads"]) <= 64
              and 0 < int(meta["width"]) <= 4096 and int(meta["width"]) % int(meta["heads"]) == 0
              and int(meta["width"]) % min(GROUPS, int(meta["width"])) == 0
              and int(meta["buckets"]) == TIME_BUCKETS)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise PatchError(f"{name}: erasure.features branch must give the skip layout (skips, mid, in_channels), "
                         f"context_dim, width, heads and buckets ({TIME_BUCKETS})")
    expected = {f"erasure.branch.{k}": v for k, v in branch_shapes(meta).items()}
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise PatchError(f"{name}: the branch's tensors do not match its settings (missing {missing[:3]}, "
                         f"unexpected {extra[:3]})")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != expected[key]:
            raise PatchError(f"{name}: {key} has shape {tuple(tensor.shape)}, its settings need {expected[key]}")


def _register() -> None:
    from .patch import KNOWN_FEATURES, register_feature

    if "branch" not in KNOWN_FEATURES:
        register_feature("branch", _KEY, _validate_feature)


_register()
