"""ESD (Gandikota et al. 2023), the baseline: push ε(x_t, c_e) towards the negatively guided target
y = ε*(x_t, ∅) − η·(ε*(x_t, c_e) − ε*(x_t, ∅)). Verified against the authors' code; training from the
frozen-trajectory cache instead of re-sampling every step is our design (METHODS.md), and so is the optional
preservation term on `config.preserve`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch.nn.functional as F

from ..denoiser import CacheRecord, Denoiser
from ..engine import (PROJECTION_SETS, TrainConfig, TrajectoryCache, concept_cache, finish_patch, predict_with, preservation_loss,
                      preserved_prompts, run_training, setup)
from ..patch import ErasurePatch

# which attn2 projections each variant trains (ESD-u, outside attn2, needs full-UNet deltas: not yet supported)
PARAMETER_SETS = {"esd-x": "all", "esd-x-strict": "kv"}


def esd_target(batch: CacheRecord, eta: float):
    return batch.eps_uncond - eta * (batch.eps_concept - batch.eps_uncond)


def train_esd(denoiser: Denoiser, config: TrainConfig, cache: TrajectoryCache | None = None,
              checkpoint: Path | None = None, progress: Callable | None = None,
              cancel: Callable[[], bool] | None = None) -> tuple[ErasurePatch, list[float]]:
    if config.method not in PARAMETER_SETS:
        raise ValueError(f"unknown ESD variant {config.method!r}; use one of {', '.join(PARAMETER_SETS)}")
    concept, empty = denoiser.encode([config.concept]), denoiser.encode([""])
    cache = cache or concept_cache(denoiser, config, concept, empty)
    preserved = preserved_prompts(denoiser, config, cache)
    parts = setup(denoiser, config, tokens=0, projections=PROJECTION_SETS[PARAMETER_SETS[config.method]],
                  delta_layers=config.layers)
    live = parts.patch()

    def step_loss(step: int, batch: CacheRecord):
        pred = predict_with(denoiser, live, batch.x_t, batch.t, concept.expand(len(batch.x_t)))
        return F.mse_loss(pred, esd_target(batch, config.eta)) \
            + config.preserve_weight * preservation_loss(denoiser, live, batch, preserved, step)

    losses = run_training(denoiser, config, parts, cache, step_loss, [{"params": parts.delta_params(), "lr": config.lr}],
                          checkpoint, progress, cancel)
    return finish_patch(denoiser, parts, config), losses
