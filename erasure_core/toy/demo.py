"""The main job on the toy model: erase a concept, draw the same prompts and seeds before and after, measure."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..denoiser import patched
from ..imaging import save_grid
from ..methods import TrainResult, get_method, train_patch
from ..patch import save_patch
from ..request import TrainPlan, TrainRequest, prepare
from .evaluation import ErasureTarget, evaluate_erasure
from .world import OBJECT_NAMES, prompt

GRID_SEEDS = (7, 8)


def demo_alternative(model, concept: str, method: str, alternative: str = "auto") -> str:
    """"auto": the vocabulary's neighbour for methods that take an alternative; "none": nothing."""
    if alternative == "none" or not get_method(method).takes_alternative:
        return ""
    return model.vocabulary.default_alternative(concept) if alternative == "auto" else alternative


def grid_prompts(target: ErasureTarget) -> list[str]:
    """Four prompts naming the target, then four naming a neighbour on the same axis instead."""
    others = [i for i in range(len(OBJECT_NAMES)) if i != target.index][:4]
    partners = (1, 2, 3, 0) if target.axis == "object" else (0, 1, 4, 6)
    cells = [(target.index, p) for p in partners] + list(zip(others, partners))
    if target.axis == "style":
        cells = [(o, s) for s, o in cells]
    return [prompt(o, s) for o, s in cells]


def run_demo(model, out_dir: Path, request: TrainRequest, sample_steps: int = 20, eval_seeds_per_cell: int = 1,
             progress: Callable | None = None, log: Callable[[str], None] = print) -> dict:
    """Train `request` on the toy model, write the patch, a before/after grid and metrics.json into `out_dir`."""
    plan: TrainPlan = prepare(request, model)
    target = ErasureTarget.from_names(plan.concept, plan.alternative)  # ValueError for a cross-axis alternative
    out_dir.mkdir(parents=True, exist_ok=True)
    clock, seconds = time.time(), {}

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase] = round(time.time() - clock, 1)
        clock = time.time()

    result: TrainResult = plan.label(train_patch(model, plan.config, progress=progress))
    lap("train")
    patch_path = save_patch(result.patch, out_dir / f"{plan.concept}.safetensors")
    log(f"wrote {patch_path} in {result.seconds:.1f} s")
    patches = [(result.patch, 1.0)]
    prompts = grid_prompts(target)
    all_prompts = [p for p in prompts for _ in GRID_SEEDS]
    all_seeds = list(GRID_SEEDS) * len(prompts)
    guidance = model.default_guidance
    before = model.generate(all_prompts, all_seeds, steps=sample_steps, guidance=guidance)
    with patched(model, patches):
        after = model.generate(all_prompts, all_seeds, steps=sample_steps, guidance=guidance)
    k = len(GRID_SEEDS)
    pairs = [torch.cat([before[i:i + k], after[i:i + k]]) for i in range(0, len(all_prompts), k)]
    grid_path = save_grid(torch.cat(pairs), out_dir / "before_after.png", ncols=2 * k, scale=3, row_labels=prompts,
                          col_labels=["original"] * k + ["erased"] * k,
                          title=f"erase '{plan.concept}' ({plan.config.method}): same seeds, before | after")
    log(f"wrote {grid_path}")
    lap("grid")
    report, _ = evaluate_erasure(model, patches, model.vocabulary.oracle(), target,
                                 seeds_per_cell=eval_seeds_per_cell, steps=sample_steps, guidance=guidance)
    lap("evaluate")
    report.update(target=plan.concept, alternative=plan.alternative or None, method=plan.config.method,
                  patch=str(patch_path), settings={**{k: getattr(plan.config, k) for k in (
                      "steps", "cache_seeds", "cache_steps", "batch")}, "sample_steps": sample_steps,
                      "eval_seeds_per_cell": eval_seeds_per_cell}, seconds=seconds)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out_dir / 'metrics.json'}")
    return report
