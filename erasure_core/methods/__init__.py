"""Erasure methods, each written once against the denoiser protocol (erasure_core.denoiser), each in its own file,
each registered once (erasure_core.methods.registry).

`train_patch` is the one entry point every front end (CLI, ComfyUI node, WebUI tab, standalone app) calls."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..denoiser import Denoiser
from ..engine import Progress, TrainConfig
from . import memory, all_but_one, esd, uce, rece, adversarial_preservation, prune, sdd, forget_me_not  # noqa: F401  (each registers its methods, in this order)
from .registry import MethodSpec, TrainResult, get_method, method_names, methods_help, register, unregister

__all__ = ["DEFAULT_METHOD", "MethodSpec", "TrainResult", "get_method", "method_names", "methods_help", "register",
           "unregister", "train_patch"]

DEFAULT_METHOD = "memory"


def train_patch(denoiser: Denoiser, config: TrainConfig, progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None, checkpoint: Path | None = None,
                cache=None) -> TrainResult:
    """Train `config.method` on `denoiser`. The model's weights are never modified; the result is a patch.
    `cache` reuses frozen-model trajectories (engine.TrajectoryCache) built for the same concept. `progress` is
    called as progress(done, total, loss, stage=...) through every phase (engine.Progress)."""
    spec = get_method(config.method)
    start = time.time()
    result = spec.train(denoiser, config, cache=cache, checkpoint=checkpoint, progress=progress, cancel=cancel)
    result.seconds = time.time() - start
    result.patch.training["seconds"] = round(result.seconds, 2)
    return result
