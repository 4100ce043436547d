"""The main job on the toy model: erase a concept, measure it against the base model on the same prompts and seeds,
and show a before/after grid made of the evaluation's own images (so the demo samples each image once)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..imaging import grid, save_side_by_side
from ..methods import TrainResult, get_method, train_patch
from ..patch import save_patch
from ..request import RequestError, TrainPlan, TrainRequest, prepare
from .evaluation import ErasureTarget, GridItem, erasure_items, evaluate_erasure

@dataclass(frozen=True)
class DemoBudget:
    """How much the demo trains and evaluates."""

    steps: int
    batch: int
    cache_seeds: int
    cache_steps: int
    sample_steps: int       # DDIM steps of the grid and the evaluation
    other_cells_every: int  # evaluation: every target cell, and the other cells on this lattice (erasure_items)
    rate_scale: float = 1.0  # times the method's default learning rates

    def request(self, concept: str, method: str, alternative: str, steps: int | None = None) -> TrainRequest:
        """The training request of this budget; `steps` overrides the budget's."""
        spec = get_method(method)
        scaled = lambda rate: None if rate is None else rate * self.rate_scale  # noqa: E731
        return TrainRequest(concept=concept, method=method, alternative=alternative, steps=steps or self.steps,
                            batch=self.batch, cache_seeds=self.cache_seeds, cache_steps=self.cache_steps,
                            lr=scaled(spec.delta_lr), memory_lr=scaled(spec.memory_lr))

    def describe(self) -> str:
        cells = "every cell" if self.other_cells_every == 1 else \
            f"the target's cells and 1 in {self.other_cells_every} of the others"
        rates = "" if self.rate_scale == 1 else f" at {self.rate_scale:g}x the method's learning rates"
        return (f"{self.steps} training steps of batch {self.batch}{rates} on {self.cache_seeds}x{self.cache_steps} "
                f"cached trajectories, {self.sample_steps} DDIM steps, evaluated on {cells}")


# "quick", the demo's default, was chosen with bench/demo_budget.py (results in bench/results/demo_budget.md) to
# finish in a minute on 2 CPU cores; "full" is the library's training defaults and the whole evaluation grid.
BUDGETS = {"quick": DemoBudget(steps=40, batch=4, cache_seeds=4, cache_steps=10, sample_steps=10, other_cells_every=3,
                               rate_scale=2.0),
           "full": DemoBudget(steps=200, batch=8, cache_seeds=8, cache_steps=25, sample_steps=20, other_cells_every=1)}


def demo_alternative(model, concept: str, method: str, alternative: str = "auto") -> str:
    """"auto": the vocabulary's neighbour for methods that take an alternative; "none": nothing."""
    if alternative == "none" or not get_method(method).takes_alternative:
        return ""
    return model.vocabulary.default_alternative(concept) if alternative == "auto" else alternative


def grid_rows(target: ErasureTarget, items: list[GridItem]) -> tuple[list[int], list[int]]:
    """Which evaluated images the before/after grid shows: one per target cell (all of them), and as many other
    cells, spread over the evaluated ones."""
    seen, on, off = set(), [], []
    for k, item in enumerate(items):
        if (item.obj, item.style) in seen:  # one seed per cell
            continue
        seen.add((item.obj, item.style))
        (on if target.label(item) == target.index else off).append(k)
    step = max(1, len(off) // len(on))
    return on, off[::step][:len(on)]


def save_before_after(path: Path, items: list[GridItem], before: torch.Tensor, after: torch.Tensor,
                      target: ErasureTarget, title: str) -> Path:
    """Two labelled panels side by side, each prompt once with one seed: the target's cells, then other cells;
    the original model's image and the patched model's from the same seed."""
    panels = []
    for rows, heading in zip(grid_rows(target, items), ("the erased concept", "everything else")):
        pairs = torch.stack([torch.stack([before[k], after[k]]) for k in rows]).flatten(0, 1)
        panels.append(grid(pairs, ncols=2, scale=3, row_labels=[items[k].prompt for k in rows],
                           col_labels=["original", "erased"], title=heading))
    return save_side_by_side(panels, path, title=title)


def run_demo(model, out_dir: Path, request: TrainRequest, sample_steps: int = 20, eval_seeds_per_cell: int = 1,
             other_cells_every: int = 1, progress: Callable | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Train `request` on the toy model, write the patch, a before/after grid and metrics.json into `out_dir`."""
    plan: TrainPlan = prepare(request, model)
    if len(plan.concepts) > 1:
        raise RequestError("the demo erases one concept; train several with `erasure train --concept a,b`")
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
    guidance, base = model.default_guidance, {}
    report, after = evaluate_erasure(model, patches, model.vocabulary.oracle(), target,
                                     seeds_per_cell=eval_seeds_per_cell, steps=sample_steps, guidance=guidance,
                                     other_cells_every=other_cells_every, base=base)
    lap("evaluate")
    items, _ = erasure_items(target, eval_seeds_per_cell, other_cells_every)
    grid_path = save_before_after(out_dir / "before_after.png", items, base["images"], after, target,
                                  f"erase '{plan.concept}' ({plan.config.method}): same seeds, before | after")
    log(f"wrote {grid_path}")
    lap("grid")
    report.update(target=plan.concept, alternative=plan.alternative or None, method=plan.config.method,
                  patch=str(patch_path), settings={**{k: getattr(plan.config, k) for k in (
                      "steps", "cache_seeds", "cache_steps", "batch")}, "sample_steps": sample_steps,
                      "eval_seeds_per_cell": eval_seeds_per_cell, "other_cells_every": other_cells_every},
                  seconds=seconds)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out_dir / 'metrics.json'}")
    return report
