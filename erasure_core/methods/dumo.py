"""DuMo (Han et al., AAAI 2025): erase with a modulation branch beside the frozen UNet (erasure_core.branch), whose
residuals enter the skip connections at generation time; no weight of the model changes.

The authors' training code is not public: the loss is ours, ESD's negative guidance on the erased prompt
(‖ε_{θ+B}(x_t, c_e) − [ε*(x_t, ∅) − η(ε*(x_t, c_e) − ε*(x_t, ∅))]‖²), plus two terms that keep the branch quiet
elsewhere: the engine's preservation term on the preserved prompts and ‖ε_{θ+B}(x_t, ∅) − ε*(x_t, ∅)‖² on the
empty prompt, which classifier-free guidance runs through the branch as well. x_t comes from the frozen
model's trajectory cache, as for every trained method here. The branch is ours too (reduced width, trained
from scratch: see erasure_core.branch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..branch import branch_meta, init_branch, skip_layout
from ..denoiser import CacheRecord, Conditioning, Denoiser
from ..engine import (TrainConfig, TrajectoryCache, concept_cache, erased_prompts, esd_target, finish_patch,
                      predict_with, preserved_prompts, run_training, setup)
from ..patch import ErasurePatch, PatchError
from .registry import MethodSpec, TrainResult, register

WIDTH, HEADS = 32, 4  # the branch's channels at every level (the toy UNet's are 64 and 128)


def train_dumo(denoiser: Denoiser, config: TrainConfig, *, cache: TrajectoryCache | None = None,
               checkpoint: Path | None = None, progress: Callable | None = None,
               cancel: Callable[[], bool] | None = None) -> TrainResult:
    layout = skip_layout(denoiser.weight_shapes())
    if layout is None:
        raise PatchError("DuMo adds residuals to the skip connections of a UNet with input_blocks and a "
                         "middle_block; this model has none")
    concept, empty = denoiser.encode(config.concepts), denoiser.encode([""])
    cache = cache or concept_cache(denoiser, config, concept, empty, checkpoint=checkpoint, progress=progress)
    preserved = preserved_prompts(denoiser, config, cache, progress)
    parts = setup(denoiser, config, tokens=0)
    meta = branch_meta(layout, denoiser.context_dim, WIDTH, HEADS)
    for name, tensor in init_branch(meta, torch.Generator().manual_seed(config.seed + 1)).items():
        parts.extra[name] = torch.nn.Parameter(tensor.to(denoiser.device))  # in `extra`: checkpointed, resumed
    live = ErasurePatch(layers=[], method=config.method,
                        extra={"branch": {f"erasure.branch.{k}": v for k, v in parts.extra.items()}},
                        feature_meta={"branch": meta})

    def step_loss(step: int, batch: CacheRecord):
        # one forward for the three terms: the erased prompt, the empty prompt, one preserved prompt per sample
        n = len(batch.x_t)
        conds, targets = [erased_prompts(concept, batch), empty.expand(n)], [esd_target(batch, config.eta),
                                                                             batch.eps_uncond]
        if preserved is not None and batch.eps_preserve is not None:
            which = (torch.arange(n) + step) % len(preserved)  # rotating, as the engine's preservation term
            conds.append(preserved.select(which))
            targets.append(batch.eps_preserve[torch.arange(n), which])
        parts_of = predict_with(denoiser, live, torch.cat([batch.x_t] * len(conds)), torch.cat([batch.t] * len(conds)),
                                Conditioning.cat(conds)).chunk(len(conds))
        losses = [F.mse_loss(pred, target) for pred, target in zip(parts_of, targets)]
        return losses[0] + config.preserve_weight * sum(losses[1:])

    groups = [{"params": list(parts.extra.values()), "lr": config.delta_lr}]
    losses = run_training(denoiser, config, parts, cache, step_loss, groups, checkpoint, progress, cancel)
    patch = finish_patch(denoiser, parts, config)
    patch.extra = {"branch": {f"erasure.branch.{k}": v.detach().clone().cpu() for k, v in parts.extra.items()}}
    patch.feature_meta = {"branch": meta}
    patch.training["branch"] = {"width": WIDTH, "heads": HEADS,
                                "parameters": sum(v.numel() for v in parts.extra.values())}
    return TrainResult(patch, losses)


register(MethodSpec("dumo", "a small encoder branch adds residuals to the UNet's skip connections; no weights",
                    "Han et al., DuMo: Dual Encoder Modulation Network for Precise Concept Erasure, AAAI 2025",
                    reconstruction=True, kind="inference-time",
                    trains="an encoder branch (ours, reduced width) + its per-timestep modulation table",
                    train=train_dumo))
