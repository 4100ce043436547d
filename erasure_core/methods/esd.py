"""ESD (Gandikota et al. 2023), the baseline: push ε(x_t, c_e) towards the negatively guided target
y = ε*(x_t, ∅) − η·(ε*(x_t, c_e) − ε*(x_t, ∅)). Verified against the authors' code; training from the
frozen-trajectory cache instead of re-sampling every step is our design (bench/cache_vs_resample.py measures the
two against each other), and so is the optional preservation term on `config.preserve`.

Parameter sets: ESD-x trains every attn2 projection, ESD-x-strict attn2 to_k and to_v. ESD-u trains every
parameter except attn2, the time embedding and the output layers; ours trains the weights of those linear and
conv layers (biases and norms stay frozen, so the patch holds plain weight deltas that every host and the stock
LoRA loaders apply). An ESD-u patch is as large as the weights it changes (813 M parameters, 3.3 GB in float32,
for SD1.5)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch.nn.functional as F

from ..denoiser import CacheRecord, Denoiser
from ..engine import (PROJECTION_SETS, TrainConfig, TrajectoryCache, concept_cache, erased_prompts, esd_target,
                      finish_patch, predict_with, preservation_loss, preserved_prompts, run_training, setup)
from .registry import MethodSpec, TrainResult, register

# what each variant trains: a set of attn2 projections, or "outside" for every linear and conv layer outside attn2
PARAMETER_SETS = {"esd-x": "all", "esd-x-strict": "kv", "esd-u": "outside"}
_NOT_IN_ESD_U = ("time_embed.", "label_emb.", "out.")  # the time (and SDXL size) embedding and the output layers


def esd_u_modules(weight_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The layers ESD-u trains: every linear and conv layer except attn2, the embeddings and the output."""
    return [name for name in weight_shapes if ".attn2." not in name and not name.startswith(_NOT_IN_ESD_U)]


def train_esd(denoiser: Denoiser, config: TrainConfig, *, cache: TrajectoryCache | None = None,
              checkpoint: Path | None = None, progress: Callable | None = None,
              cancel: Callable[[], bool] | None = None) -> TrainResult:
    if config.method not in PARAMETER_SETS:
        raise ValueError(f"unknown ESD variant {config.method!r}; use one of {', '.join(PARAMETER_SETS)}")
    concept, empty = denoiser.encode(config.concepts), denoiser.encode([""])
    cache = cache or concept_cache(denoiser, config, concept, empty, checkpoint=checkpoint, progress=progress)
    preserved = preserved_prompts(denoiser, config, cache, progress)
    if PARAMETER_SETS[config.method] == "outside":
        parts = setup(denoiser, config, tokens=0, delta_modules=esd_u_modules(denoiser.weight_shapes()))
    else:
        parts = setup(denoiser, config, tokens=0, projections=PROJECTION_SETS[PARAMETER_SETS[config.method]],
                      delta_layers=config.layers)
    live = parts.patch()

    def step_loss(step: int, batch: CacheRecord):
        pred = predict_with(denoiser, live, batch.x_t, batch.t, erased_prompts(concept, batch))
        return F.mse_loss(pred, esd_target(batch, config.eta)) \
            + config.preserve_weight * preservation_loss(denoiser, live, batch, preserved, step)

    groups = [{"params": parts.delta_params(), "lr": config.delta_lr}]
    losses = run_training(denoiser, config, parts, cache, step_loss, groups,
                          checkpoint, progress, cancel)
    return TrainResult(finish_patch(denoiser, parts, config), losses)


_SOURCE = "Gandikota et al., Erasing Concepts from Diffusion Models, ICCV 2023"
register(MethodSpec("esd-x", "baseline: negative guidance on every attn2 projection", _SOURCE,
                    reconstruction=False, kind="trained", trains="attn2 q/k/v/out deltas", train=train_esd))
register(MethodSpec("esd-x-strict", "baseline: negative guidance on attn2 to_k/to_v", _SOURCE,
                    reconstruction=False, kind="trained", trains="attn2 to_k/to_v deltas", train=train_esd))
# ESD-u moves every layer outside cross-attention: at the attention deltas' rate it broke the model within 6 steps
register(MethodSpec("esd-u", "baseline: every layer outside cross-attention (large patch)", _SOURCE,
                    reconstruction=False, kind="trained", trains="every linear/conv weight outside attn2",
                    train=train_esd, delta_lr=1e-4))
