"""Erasure methods, each written once against the denoiser protocol (erasure_core.denoiser), each in its own file,
each registered once (erasure_core.methods.registry).

`train_patch` is the one entry point every front end (CLI, ComfyUI node, WebUI tab, standalone app) calls."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ..denoiser import Denoiser, patched
from ..engine import Progress, TrainConfig
from ..patch import ErasurePatch, combine_patches
from ..vocabulary import concept_prompt
from . import memory, all_but_one, esd, uce, rece, adversarial_preservation, prune, sdd, forget_me_not, saeuron, dumo  # noqa: F401,E501  (each registers its methods, in this order)
from .registry import MethodSpec, TrainResult, get_method, method_names, methods_help, register, unregister

__all__ = ["DEFAULT_METHOD", "MethodSpec", "TrainResult", "get_method", "method_names", "methods_help", "register",
           "unregister", "train_patch"]

DEFAULT_METHOD = "memory"


def train_patch(denoiser: Denoiser, config: TrainConfig, progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None, checkpoint: Path | None = None,
                cache=None, on_top_of: list[ErasurePatch] | tuple = ()) -> TrainResult:
    """Train `config.method` on `denoiser`. The model's weights are never modified; the result is a patch.
    `cache` reuses frozen-model trajectories (engine.TrajectoryCache) built for the same concept. `progress` is
    called as progress(done, total, loss, stage=...) through every phase (engine.Progress).

    `on_top_of`: earlier patches, attached (frozen, strength 1) for the whole run, so the cache, the anchors and
    every prediction are the already-erased model's; their concepts join the preserved prompts, whose anchors
    are then their erased predictions, so the new erasure keeps them erased. The result is one patch holding
    them all (patch.combine_patches): what a user applies, and shares, as one file."""
    spec = get_method(config.method)
    start = time.time()
    if on_top_of:
        earlier = [_trained_prompt(denoiser, c) for p in on_top_of for c in p.concepts]
        config = replace(config, preserve=list(dict.fromkeys(
            [*config.preserve, *(c for c in earlier if c not in config.concepts)])))
    with patched(denoiser, [(p, 1.0) for p in on_top_of]) if on_top_of else nullcontext():
        result = spec.train(denoiser, config, cache=cache, checkpoint=checkpoint, progress=progress, cancel=cancel)
    if on_top_of:
        result.patch = combine_patches([*on_top_of, result.patch])
    result.seconds = time.time() - start
    result.patch.training["seconds"] = round(result.seconds, 2)
    return result


def _trained_prompt(denoiser: Denoiser, concept: str) -> str:
    """An earlier patch's concept as a prompt: patches list the user's names ("circle"), or the prompt itself."""
    try:
        return concept_prompt(denoiser, concept)
    except KeyError:
        return concept
