"""SDD, safe self-distillation (Kim et al. 2023): the model learns to predict, for the erased prompt, what it
predicts unconditioned, ‖sg(ε_θ(x_t, ∅)) − ε_θ(x_t, c_e)‖²: a target that moves with the model itself, and the
EMA of the weights is what ships.

Verified from the paper and the authors' code (train_sdd.py): the self-distillation loss with the unconditional
prediction under stop-gradient, EMA decay 0.999, the EMA weights shipped, cross-attention only. Ours: x_t from the
frozen model's trajectory cache (the authors sample it from the EMA teacher at every step); weight deltas of every
attn2 projection at the engine's rates instead of full weights at 1e-5; the EMA of the deltas is bias-corrected,
ema / (1 − 0.999^steps), so a short run ships the average of its recent weights rather than a fifth of them (the
authors train 1,500 steps, where the correction is about 1.3); the engine's preservation term, with a list.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..denoiser import CacheRecord, Denoiser
from ..engine import (TrainConfig, TrajectoryCache, erased_prompts, finish_patch, predict_with, preservation_loss,
                      run_training, start_attn2_run)
from .registry import MethodSpec, TrainResult, register

EMA_DECAY = 0.999


def train_sdd(denoiser: Denoiser, config: TrainConfig, *, cache: TrajectoryCache | None = None,
              checkpoint: Path | None = None, progress: Callable | None = None,
              cancel: Callable[[], bool] | None = None) -> TrainResult:
    run = start_attn2_run(denoiser, config, "all", cache, checkpoint, progress)
    concept, empty, preserved, parts = run.concept, run.empty, run.preserved, run.parts
    ema = {}
    for i, (name, delta) in enumerate(parts.deltas.items()):  # in `extra`, so a resumed run keeps its average
        ema[name] = parts.extra[f"ema{i}"] = torch.nn.Parameter(torch.zeros_like(delta), requires_grad=False)
    live = parts.patch()

    def fold_in() -> None:
        """One EMA step with the weights as they are now (after the previous optimiser step)."""
        with torch.no_grad():
            for name, delta in parts.deltas.items():
                ema[name].mul_(EMA_DECAY).add_(delta, alpha=1 - EMA_DECAY)

    def step_loss(step: int, batch: CacheRecord):
        if step:
            fold_in()
        n = len(batch.x_t)
        with torch.no_grad():
            target = predict_with(denoiser, live, batch.x_t, batch.t, empty.expand(n))
        pred = predict_with(denoiser, live, batch.x_t, batch.t, erased_prompts(concept, batch))
        return F.mse_loss(pred, target) + config.preserve_weight * preservation_loss(denoiser, live, batch,
                                                                                     preserved, step)

    groups = [{"params": parts.delta_params(), "lr": config.delta_lr}]
    losses = run_training(denoiser, config, parts, run.cache, step_loss, groups, checkpoint, progress, cancel)
    fold_in()
    with torch.no_grad():
        correction = 1 - EMA_DECAY ** config.steps
        for name, delta in parts.deltas.items():
            delta.copy_(ema[name] / correction)
    patch = finish_patch(denoiser, parts, config)
    patch.training["sdd"] = {"ema_decay": EMA_DECAY, "bias_correction": round(1 / correction, 4)}
    return TrainResult(patch, losses)


register(MethodSpec("sdd", "self-distillation: the erased prompt learns the model's own unconditional prediction",
                    "Kim et al., Towards Safe Self-Distillation of Internet-Scale Text-to-Image Diffusion Models, "
                    "2023", reconstruction=True, kind="trained", trains="attn2 q/k/v/out deltas (their EMA)",
                    train=train_sdd))
