"""Pruning for robust concept erasing (P-ESD, arXiv 2405.16534, which publishes no code): a learned mask over the
cross-attention weights, trained with ESD's loss, then made binary, so the concept loses the weights that carry it.

Ours throughout: a score s per weight entry of every attn2 projection (or the set `--projections` names); the
forward pass uses the binary mask m = [s > 0], the backward pass σ(s / τ)'s gradient (straight-through), so the
model trained is the model shipped, and every weight starts kept (s = START_SCORE). The loss is ESD's on the masked
model, L_ESD(θ ⊙ m), plus SPARSITY · mean(1 − σ(s / τ)) (and the engine's preservation term, with a list). The
patch stores the pruning as plain weight deltas, −W on the pruned entries and 0 elsewhere, so every host and LoRA
loader applies it; the share of weights pruned, per projection kind and in all, is recorded in training["prune"].
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..denoiser import CacheRecord, Denoiser
from ..engine import (TrainConfig, TrajectoryCache, erased_prompts, esd_target, finish_patch, predict_with,
                      preservation_loss, run_training, start_attn2_run)
from ..patch import ErasurePatch, WeightDelta
from .registry import MethodSpec, TrainResult, register

TEMPERATURE = 0.5
START_SCORE = 0.5   # kept, and about ten consistent Adam steps at the default rate from being pruned
SPARSITY = 0.05     # weight of mean(1 − σ(s/τ)): what keeping weights is worth against the erasure


def train_prune(denoiser: Denoiser, config: TrainConfig, *, cache: TrajectoryCache | None = None,
                checkpoint: Path | None = None, progress: Callable | None = None,
                cancel: Callable[[], bool] | None = None) -> TrainResult:
    run = start_attn2_run(denoiser, config, "all", cache, checkpoint, progress)
    concept, preserved, parts = run.concept, run.preserved, run.parts
    weights = denoiser.projection_weights()
    original = {name: weights[name].detach().to(denoiser.device, torch.float32) for name in parts.deltas}
    scores = {name: torch.nn.Parameter(torch.full_like(w, START_SCORE)) for name, w in original.items()}
    for i, (name, s) in enumerate(scores.items()):
        parts.extra[f"score{i}"] = s  # saved with the checkpoint, so a resumed run continues the same mask

    def masked() -> tuple[ErasurePatch, torch.Tensor]:
        """The model with the binary mask, as deltas (m − 1) ⊙ W, and the soft share pruned, mean(1 − σ(s/τ))."""
        soft = {name: torch.sigmoid(s / TEMPERATURE) for name, s in scores.items()}
        hard = {name: (scores[name] > 0).to(m.dtype) + m - m.detach() for name, m in soft.items()}
        view = ErasurePatch(layers=[], deltas={n: WeightDelta(full=(m - 1) * original[n]) for n, m in hard.items()})
        pruned = torch.stack([(1 - m).mean() for m in soft.values()]).mean()
        return view, pruned

    def step_loss(step: int, batch: CacheRecord):
        view, pruned = masked()
        pred = predict_with(denoiser, view, batch.x_t, batch.t, erased_prompts(concept, batch))
        return F.mse_loss(pred, esd_target(batch, config.eta)) + SPARSITY * pruned \
            + config.preserve_weight * preservation_loss(denoiser, view, batch, preserved, step)

    groups = [{"params": list(scores.values()), "lr": config.delta_lr}]
    losses = run_training(denoiser, config, parts, run.cache, step_loss, groups, checkpoint, progress, cancel)
    counts: dict[str, list[int]] = {}
    with torch.no_grad():
        for name, s in scores.items():
            cut = s <= 0
            parts.deltas[name].copy_(torch.where(cut, -original[name], torch.zeros_like(original[name])))
            kind = counts.setdefault(name.split(".attn2.", 1)[-1], [0, 0])  # to_q, to_k, to_v, to_out.0
            kind[0], kind[1] = kind[0] + int(cut.sum()), kind[1] + cut.numel()
    pruned, of = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    if not pruned:
        raise ValueError(f"prune-esd pruned no weight in {config.steps} steps; train for more steps or with a "
                         f"higher learning rate (this run: {config.delta_lr})")
    patch = finish_patch(denoiser, parts, config)
    patch.training["prune"] = {"pruned": pruned, "of": of, "share": round(pruned / of, 6),
                               "per_projection": {k: round(c[0] / c[1], 6) for k, c in counts.items()}}
    return TrainResult(patch, losses)


register(MethodSpec("prune-esd", "a learned mask over cross-attention, with ESD's loss: prunes the concept's weights",
                    "Pruning for Robust Concept Erasing in Diffusion Models, arXiv 2405.16534 (P-ESD)",
                    reconstruction=True, kind="trained", trains="attn2 weights pruned (stored as −W deltas)",
                    train=train_prune, delta_lr=5e-2))
