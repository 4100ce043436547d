"""All but One (Hong, Lee, Woo, AAAI 2024), OUR RECONSTRUCTION from the abstract and Figure 1 (no code is public).

A surgical update of the guidance term that holds the unconditional prediction in place:
  L_guid  = ‖[ε_θ(x_t, c_e) − sg(ε_θ(x_t, ∅))] − (ε*(x_t, c_a) − ε*(x_t, ∅))‖²
  L_drift = ‖ε_θ(x_t, ∅) − ε*(x_t, ∅)‖²
  L = L_guid + λ·L_drift, on the ESD-x parameter set.
With no alternative (c_a = ∅) the erased prompt yields the unconditional distribution; with one, prompts for c_e
yield c_a while the layout, carried by the unconditional score, stays.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch.nn.functional as F

from ..denoiser import CacheRecord, Denoiser
from ..engine import (TrainConfig, TrajectoryCache, concept_cache, erased_prompts, finish_patch, predict_with,
                      preservation_loss, preserved_prompts, projections_of, run_training, setup)
from .registry import MethodSpec, TrainResult, register

DRIFT_WEIGHT = 1.0  # λ
PROJECTIONS = "kv"  # to_k/to_v only, our choice: they act on the text tokens, so other prompts move least


def train_all_but_one(denoiser: Denoiser, config: TrainConfig, *, cache: TrajectoryCache | None = None,
                      checkpoint: Path | None = None, progress: Callable | None = None,
                      cancel: Callable[[], bool] | None = None, drift_weight: float = DRIFT_WEIGHT) -> TrainResult:
    concept, empty = denoiser.encode(config.concepts), denoiser.encode([""])
    alternative = denoiser.encode([config.alternative]) if config.alternative else None
    cache = cache or concept_cache(denoiser, config, concept, empty, alternative, checkpoint, progress)
    if alternative is not None and cache.eps_alternative is None:
        raise ValueError("the cache has no alternative predictions; build it with the alternative")
    preserved = preserved_prompts(denoiser, config, cache, progress)
    parts = setup(denoiser, config, tokens=0, projections=projections_of(config, PROJECTIONS),
                  delta_layers=config.layers)
    live = parts.patch()

    def step_loss(step: int, batch: CacheRecord):
        n = len(batch.x_t)
        pred_c = predict_with(denoiser, live, batch.x_t, batch.t, erased_prompts(concept, batch))
        pred_u = predict_with(denoiser, live, batch.x_t, batch.t, empty.expand(n))
        guidance_target = (batch.eps_alternative - batch.eps_uncond) if alternative is not None \
            else 0 * batch.eps_uncond
        guid = F.mse_loss(pred_c - pred_u.detach(), guidance_target)
        return guid + drift_weight * F.mse_loss(pred_u, batch.eps_uncond) \
            + config.preserve_weight * preservation_loss(denoiser, live, batch, preserved, step)

    groups = [{"params": parts.delta_params(), "lr": config.delta_lr}]
    losses = run_training(denoiser, config, parts, cache, step_loss, groups,
                          checkpoint, progress, cancel)
    return TrainResult(finish_patch(denoiser, parts, config), losses)


register(MethodSpec("all-but-one", "replace by the alternative (or nothing), keep the unconditional score and layout",
                    "Hong, Lee, Woo, All but One, AAAI 2024", reconstruction=True, kind="trained",
                    trains="attn2 to_k/to_v deltas", train=train_all_but_one, takes_alternative=True))
