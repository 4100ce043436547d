"""Erasing with Adversarial Preservation (Bui et al., NeurIPS 2024): instead of trusting a preservation list, find
during training the concept the edit harms most and preserve that one.

Verified from the paper and the authors' code (train_adversarial_gumbel.py): candidates are the words nearest the
target in the text encoder's space, k-means'd to about 64 centres (erasure_core.candidates); the adversarial
concept is a hard Gumbel-softmax draw over learned logits (temperature 2, learning rate 1e-2), c_a = GS(w)·M; the
model step is ESD's loss on the target plus the preservation term ‖ε_θ'(x_t, c_a) − ε_θ(x_t, c_a)‖², which the
adversary maximises over w; ESD-x's parameters (every attn2 projection).
Ours: one backward pass serves both players, the logits' gradient reversed on its way in (the authors alternate
two adversary steps per model step); one draw per sample of the batch; the preservation term in ε space like the
engine's, on the erased prompt's cached x_t; a user's preservation list, when given, is kept by the engine's
term as well and its prompts join the candidates. Which candidates the adversary drew most is recorded in the
patch (training["adversarial_preservation"]).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..candidates import nearest_concepts
from ..denoiser import CacheRecord, Conditioning, Denoiser
from ..engine import (TrainConfig, TrajectoryCache, erased_prompts, esd_target, finish_patch, predict_with,
                      preservation_loss, run_training, start_attn2_run)
from .registry import MethodSpec, TrainResult, register

CANDIDATES = 64
TEMPERATURE = 2.0
ADVERSARY_LR = 1e-2
STAGE = "finding the candidate concepts"


class _Reversed(torch.autograd.Function):
    """Identity forward, negated gradient backward: the adversary ascends the loss the model descends."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def hard_gumbel_softmax(logits: torch.Tensor, n: int, temperature: float, generator: torch.Generator):
    """n one-hot draws over the logits (n, K), differentiable through the soft sample (straight-through)."""
    u = torch.rand((n, len(logits)), generator=generator).clamp(1e-9, 1 - 1e-9).to(logits.device)
    soft = F.softmax((logits - torch.log(-torch.log(u))) / temperature, dim=1)
    hard = F.one_hot(soft.argmax(dim=1), len(logits)).to(soft.dtype)
    return hard + soft - soft.detach()


def _mixed(candidates: Conditioning, weights: torch.Tensor) -> Conditioning:
    """Σ_k weights[b, k] · candidate k, for the context and every extra input."""
    mix = lambda t: torch.einsum("bk,k...->b...", weights.to(t.dtype), t)  # noqa: E731
    return Conditioning(mix(candidates.context), {k: mix(v) for k, v in candidates.extra.items()})


def train_adversarial_preservation(denoiser: Denoiser, config: TrainConfig, *, cache: TrajectoryCache | None = None,
                                   checkpoint: Path | None = None, progress: Callable | None = None,
                                   cancel: Callable[[], bool] | None = None) -> TrainResult:
    run = start_attn2_run(denoiser, config, "all", cache, checkpoint, progress)
    concept, preserved, parts = run.concept, run.preserved, run.parts
    bar = (lambda done, total: progress(done, total, None, stage=STAGE)) if progress else None
    words: list[str] = []
    for text in config.concepts:  # several erased concepts share the candidates; none may be a candidate
        words += nearest_concepts(denoiser, text, max(CANDIDATES // len(config.concepts), 1),
                                  exclude=[*config.candidate_exclude, *config.preserve, *config.concepts, *words],
                                  progress=bar)
    names = [*config.preserve, *words]
    if not names:
        raise ValueError("no candidate concepts: the word list gave none for this target")
    candidates = denoiser.encode(names)
    logits = parts.extra["adversary"] = torch.nn.Parameter(torch.zeros(len(names), device=denoiser.device))
    live = parts.patch()
    generator = torch.Generator().manual_seed(config.seed + 2)
    picks: Counter = Counter()

    def step_loss(step: int, batch: CacheRecord):
        n = len(batch.x_t)
        cond = erased_prompts(concept, batch)
        erase = F.mse_loss(predict_with(denoiser, live, batch.x_t, batch.t, cond), esd_target(batch, config.eta))
        draws = hard_gumbel_softmax(_Reversed.apply(logits), n, TEMPERATURE, generator)
        picks.update(draws.argmax(dim=1).tolist())
        adversarial = _mixed(candidates, draws)
        # the frozen model's prediction is the anchor for the model, and depends on c_a for the adversary
        anchor = predict_with(denoiser, None, batch.x_t, batch.t, adversarial)
        harm = F.mse_loss(predict_with(denoiser, live, batch.x_t, batch.t, adversarial), anchor)
        return erase + config.preserve_weight * (harm + preservation_loss(denoiser, live, batch, preserved, step))

    groups = [{"params": parts.delta_params(), "lr": config.delta_lr}, {"params": [logits], "lr": ADVERSARY_LR}]
    losses = run_training(denoiser, config, parts, run.cache, step_loss, groups, checkpoint, progress, cancel)
    patch = finish_patch(denoiser, parts, config)
    strongest = logits.detach().argsort(descending=True)[:8].tolist()
    patch.training["adversarial_preservation"] = {
        "candidates": len(names), "excluded_words": len(config.candidate_exclude),
        "most_drawn": [[names[i], c] for i, c in picks.most_common(8)],
        "strongest_at_end": [names[i] for i in strongest]}
    return TrainResult(patch, losses)


register(MethodSpec("adversarial-preservation", "ESD-x that finds and preserves the concept it harms most",
                    "Bui et al., Erasing Undesirable Concepts in Diffusion Models with Adversarial Preservation, "
                    "NeurIPS 2024", reconstruction=True, kind="trained", trains="attn2 q/k/v/out deltas",
                    train=train_adversarial_preservation))
