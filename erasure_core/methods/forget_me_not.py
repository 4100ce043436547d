"""Forget-Me-Not (Zhang et al. 2023): attention re-steering. The model learns to stop attending to the concept:
the loss is the norm of the cross-attention probabilities at the concept's token positions, on noisy images of the
concept, so the concept's words lose their hold on the picture.

Verified from the paper and the authors' code (SHI-Labs/Forget-Me-Not, train_attn.py): the loss on the attention
probabilities at the concept's positions in every cross-attention layer, cross-attention parameters only, few
steps (35 at lr 2e-6 on full weights, batch 1). Ours: the positions are the prompt's words other than function
words and picture nouns (FRAME_WORDS), where the authors take them from the concept they are told, **and every
position after them**: a causal text encoder (CLIP, and the toy model's) writes the whole prompt into EOS and the
padding, so the concept is there too. Measured on the toy model ("a circle", 35 steps at 5e-3, 6 held-out seeds):
with the concept's token alone its attention fell from 0.34 to 0.02 and 4 of 6 circles were still drawn; with the
positions after it, 0 of 6 (bench/results/forget_me_not.md). The loss is the
norm divided by √(count), so its scale does not depend on the model's size; x_t from the frozen model's
trajectory cache on the erased prompt (the authors noise their own images of the concept); to_k deltas at the
engine's rates, since only the queries and keys reach the probabilities and a query delta would re-steer every
prompt; the engine's preservation term, with a list. No textual inversion first (the authors' optional step).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..attention_maps import cross_attention_maps, word_positions
from ..denoiser import CacheRecord, Denoiser, patched
from ..engine import (TrainConfig, TrajectoryCache, concept_cache, finish_patch, preservation_loss,
                      preserved_prompts, projections_of, run_training, setup)
from ..layers import select_layers
from .registry import MethodSpec, TrainResult, register

# words that frame a concept rather than name it: attention to them is the same in every prompt that starts so
FRAME_WORDS = frozenset(
    "a an the of with in on at by for from to and or showing shows picture image photo photograph painting "
    "drawing artwork art style shape".split())


def concept_positions(denoiser: Denoiser, prompt: str, context_length: int) -> list[int]:
    """The context positions of the prompt's concept words ("a shape with stripes" -> the tokens of "stripes")
    and every position after them, EOS and padding, up to `context_length`."""
    words = word_positions(denoiser.prompt_length, prompt, FRAME_WORDS)
    return list(range(words[0], context_length))


def attention_mass(maps: list[torch.Tensor]) -> torch.Tensor:
    """‖probabilities‖ / √count over every map: the authors' norm at a scale independent of the model's size."""
    values = torch.cat([m.flatten() for m in maps])
    return values.square().mean().sqrt()


def train_forget_me_not(denoiser: Denoiser, config: TrainConfig, *, cache: TrajectoryCache | None = None,
                        checkpoint: Path | None = None, progress: Callable | None = None,
                        cancel: Callable[[], bool] | None = None) -> TrainResult:
    concept, empty = denoiser.encode(config.concepts), denoiser.encode([""])
    positions = [concept_positions(denoiser, text, concept.context.shape[1]) for text in config.concepts]
    cache = cache or concept_cache(denoiser, config, concept, empty, checkpoint=checkpoint, progress=progress)
    preserved = preserved_prompts(denoiser, config, cache, progress)
    projections = projections_of(config, "all") if config.projections else ("to_k",)
    parts = setup(denoiser, config, tokens=0, projections=projections, delta_layers=config.layers)
    modules = denoiser.cross_attention_modules()
    read = {name: modules[name] for name in select_layers(denoiser.layer_names(), config.layers)}
    live = parts.patch()

    def step_loss(step: int, batch: CacheRecord):
        n = len(batch.x_t)
        which = batch.concept_index if batch.concept_index is not None else torch.zeros(n, dtype=torch.long)
        loss = config.preserve_weight * preservation_loss(denoiser, live, batch, preserved, step)
        for k, where in enumerate(positions):  # each erased concept's records, read at its own positions
            rows = (which == k).nonzero().flatten().to(batch.x_t.device)
            if len(rows):
                cond = concept.select(slice(k, k + 1)).expand(len(rows))
                with patched(denoiser, [(live, 1.0)]), cross_attention_maps(read, where) as maps:
                    denoiser.predict_noise(batch.x_t[rows], batch.t[rows], cond)
                loss = loss + attention_mass(maps) * len(rows) / n
        return loss

    groups = [{"params": parts.delta_params(), "lr": config.delta_lr}]
    losses = run_training(denoiser, config, parts, cache, step_loss, groups, checkpoint, progress, cancel)
    patch = finish_patch(denoiser, parts, config)
    patch.training["forget_me_not"] = {"positions": positions if len(positions) > 1 else positions[0],
                                       "layers_read": len(read)}
    return TrainResult(patch, losses)


register(MethodSpec("forget-me-not", "attention re-steering: the concept's words stop drawing attention",
                    "Zhang et al., Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models, 2023",
                    reconstruction=False, kind="trained", trains="attn2 to_k deltas", train=train_forget_me_not))
