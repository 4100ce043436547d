"""Learnable concept memory (Bui et al., arXiv 2403.12326), in three variants.

Architecture (verified from the authors' model code): m key/value tokens appended to the text context of the
selected attn2 layers, one set shared by all of them. Training is OUR RECONSTRUCTION, since the authors'
training script is not public:

- "memory" (variant a, the paper's form): alternate a memory step, in which P learns to carry the concept
  (ε_{θ,P}(c_e) → ε*(c_e)), with an erasure step on the ESD-x deltas θ (P fixed):
  w_o·‖ε_θ(c_e) − y‖² + w·‖ε_{θ,P}(c_e) − y‖², y the ESD target, w_o = 1, w = 0.1.
- "memory-only" (variant b): all weights frozen; P is trained with the ESD target while attached. A plug-in
  patch of a few KB.
- "memory-key" (variant c, "hiding and recovering"): the erasure step's second term becomes a recovery term
  ‖ε_{θ,P}(c_e) − ε*(c_e)‖², so the deltas erase and the memory, kept apart as a key, brings the concept back.

With an alternative c_a, y = ε*(x_t, c_a) replaces the ESD target (an anchor, as in ESD's erase_from and
concept ablation): the erased prompt is steered to the alternative instead of away from everything.
With preserved prompts c_r, every step adds p·‖ε(x_t, c_r) − ε*(x_t, c_r)‖² (engine.preservation_loss) for the
part it trains: P in memory steps, θ (as the user will apply it) in erasure steps. Also our choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch.nn.functional as F

from ..denoiser import CacheRecord, Denoiser
from ..engine import (TrainConfig, TrajectoryCache, concept_cache, erased_prompts, esd_target, finish_patch,
                      predict_with, preservation_loss, preserved_prompts, projections_of, run_training, setup)
from .registry import MethodSpec, TrainResult, register

VARIANTS = ("memory", "memory-only", "memory-key")
ORIGINAL_WEIGHT, MEMORY_WEIGHT = 1.0, 0.1  # w_o and w of the erasure step
PROJECTIONS = "kv"  # to_k/to_v only, our choice: they act on the text tokens, so other prompts move least


def train_memory(denoiser: Denoiser, config: TrainConfig, *, cache: TrajectoryCache | None = None,
                 checkpoint: Path | None = None, progress: Callable | None = None,
                 cancel: Callable[[], bool] | None = None) -> TrainResult:
    """The key of the result is the memory of "memory-key" runs, None otherwise."""
    if config.method not in VARIANTS:
        raise ValueError(f"unknown memory variant {config.method!r}; use one of {', '.join(VARIANTS)}")
    concept, empty = denoiser.encode(config.concepts), denoiser.encode([""])
    alternative = denoiser.encode([config.alternative]) if config.alternative else None
    cache = cache or concept_cache(denoiser, config, concept, empty, alternative, checkpoint, progress)
    if alternative is not None and cache.eps_alternative is None:
        raise ValueError("the cache has no alternative predictions; build it with the alternative")
    preserved = preserved_prompts(denoiser, config, cache, progress)
    memory_only, key_mode = config.method == "memory-only", config.method == "memory-key"
    parts = setup(denoiser, config, tokens=config.tokens,
                  projections=() if memory_only else projections_of(config, PROJECTIONS), delta_layers=config.layers)
    train_memory_view = parts.patch(frozen=("deltas",))      # gradients reach P only
    deltas_only = parts.patch(with_memory=False)
    train_deltas_view = parts.patch(frozen=("memory",))      # gradients reach θ only
    # what the user will apply: the deltas alone in key mode (the memory is the key), everything otherwise
    public_view = deltas_only if key_mode else train_deltas_view

    def preservation(view, step: int, batch: CacheRecord):
        return config.preserve_weight * preservation_loss(denoiser, view, batch, preserved, step)

    def step_loss(step: int, batch: CacheRecord):
        cond = erased_prompts(concept, batch)
        target = batch.eps_alternative if alternative is not None else esd_target(batch, config.eta)
        if memory_only:
            return F.mse_loss(predict_with(denoiser, train_memory_view, batch.x_t, batch.t, cond), target) \
                + preservation(train_memory_view, step, batch)
        if step % 2 == 0:  # memory step: P takes in the concept, and only the concept
            carried = F.mse_loss(predict_with(denoiser, train_memory_view, batch.x_t, batch.t, cond),
                                 batch.eps_concept)
            return carried + preservation(train_memory_view, step, batch)
        erase = F.mse_loss(predict_with(denoiser, deltas_only, batch.x_t, batch.t, cond), target)
        with_p = predict_with(denoiser, train_deltas_view, batch.x_t, batch.t, cond)
        second = F.mse_loss(with_p, batch.eps_concept if key_mode else target)
        return ORIGINAL_WEIGHT * erase + MEMORY_WEIGHT * second + preservation(public_view, step, batch)

    groups = [{"params": parts.memory_params(), "lr": config.memory_rate}]
    if not memory_only:
        groups.append({"params": parts.delta_params(), "lr": config.delta_lr})
    losses = run_training(denoiser, config, parts, cache, step_loss, groups, checkpoint, progress, cancel)
    if key_mode:
        return TrainResult(finish_patch(denoiser, parts, config, include_memory=False), losses,
                           key=finish_patch(denoiser, parts, config, include_deltas=False))
    return TrainResult(finish_patch(denoiser, parts, config), losses)


_SOURCE = "Bui et al., Fantastic Targets for Concept Erasure / concept memory, arXiv 2403.12326"
register(MethodSpec("memory", "concept memory + attention deltas (the paper's form)", _SOURCE,
                    reconstruction=True, kind="trained", trains="memory tokens + attn2 to_k/to_v deltas",
                    train=train_memory, takes_alternative=True, delta_lr=1e-3, memory_lr=1e-2))
register(MethodSpec("memory-only", "a few-KB plug-in: memory tokens only, weights untouched", _SOURCE,
                    reconstruction=True, kind="trained", trains="memory tokens", train=train_memory,
                    takes_alternative=True, delta_lr=None, memory_lr=1e-2))
register(MethodSpec("memory-key", "deltas erase; the memory, kept apart, is a key that restores", _SOURCE,
                    reconstruction=True, kind="trained", trains="attn2 to_k/to_v deltas (+ the key's memory tokens)",
                    train=train_memory, takes_alternative=True, delta_lr=1e-3, memory_lr=1e-2, makes_key=True))
