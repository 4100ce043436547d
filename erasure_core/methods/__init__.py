"""Erasure methods, each written once against the denoiser protocol (erasure_core.denoiser).

`train_patch` is the one entry point every front end (CLI, ComfyUI node, WebUI tab, standalone app) calls."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..denoiser import Denoiser
from ..engine import TrainConfig
from ..patch import ErasurePatch

METHODS = ("memory", "memory-only", "memory-key", "all-but-one", "esd-x", "esd-x-strict", "esd-u", "uce")
TAKES_ALTERNATIVE = ("memory", "memory-only", "memory-key", "all-but-one", "uce")  # ESD has no anchor


@dataclass
class TrainResult:
    patch: ErasurePatch
    losses: list[float]
    seconds: float
    key: ErasurePatch | None = None  # the restoring memory of a "memory-key" run


def train_patch(denoiser: Denoiser, config: TrainConfig, progress: Callable[[int, int, float], None] | None = None,
                cancel: Callable[[], bool] | None = None, checkpoint: Path | None = None) -> TrainResult:
    """Train `config.method` on `denoiser`. The model's weights are never modified; the result is a patch."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; use one of {', '.join(METHODS)}")
    start = time.time()
    key, losses = None, []
    if config.method == "uce":
        from .uce import train_uce

        patch = train_uce(denoiser, config)
    elif config.method.startswith("memory"):
        from .memory import train_memory

        patch, losses, key = train_memory(denoiser, config, checkpoint=checkpoint, progress=progress, cancel=cancel)
    elif config.method == "all-but-one":
        from .all_but_one import train_all_but_one

        patch, losses = train_all_but_one(denoiser, config, checkpoint=checkpoint, progress=progress, cancel=cancel)
    else:
        from .esd import train_esd

        patch, losses = train_esd(denoiser, config, checkpoint=checkpoint, progress=progress, cancel=cancel)
    seconds = time.time() - start
    patch.training["seconds"] = round(seconds, 2)
    return TrainResult(patch, losses, seconds, key)
