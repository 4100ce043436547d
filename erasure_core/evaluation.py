"""Judge generations with the oracle over the toy world's object x style grid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .toy.classifier import HELDOUT_SEED0, Oracle, accuracy, render_labelled
from .toy.world import OBJECT_NAMES, STYLE_NAMES, prompt

EVAL_SEED0 = 1000  # fixed seeds: every run and every method sees the same noise


@dataclass(frozen=True)
class GridItem:
    prompt: str
    obj: int
    style: int
    seed: int


def grid_items(seeds_per_cell: int = 2, synonym: bool = False) -> list[GridItem]:
    """Every object x style cell, `seeds_per_cell` times, with canonical or synonym-only wording."""
    items = []
    for o in range(len(OBJECT_NAMES)):
        for s in range(len(STYLE_NAMES)):
            for k in range(seeds_per_cell):
                idx = (o * len(STYLE_NAMES) + s) * seeds_per_cell + k
                items.append(GridItem(prompt(o, s, synonym=1 + k if synonym else 0), o, s, EVAL_SEED0 + idx))
    return items


def judge(oracle: Oracle, images: torch.Tensor, items: list[GridItem]) -> dict[str, torch.Tensor]:
    """Per image: whether the oracle saw the prompted object and the prompted style."""
    pred = oracle.predict(images)
    return {"object": pred["object"] == torch.tensor([i.obj for i in items]),
            "style": pred["style"] == torch.tensor([i.style for i in items])}


def _per_concept(hits: torch.Tensor, labels: list[int], names: tuple[str, ...]) -> dict[str, float]:
    lab = torch.tensor(labels)
    return {n: float(hits[lab == k].float().mean()) for k, n in enumerate(names)}


def evaluate_base(generate: Callable[[list[str], list[int]], torch.Tensor], oracle: Oracle,
                  seeds_per_cell: int = 2, heldout: int = 2000) -> tuple[dict, torch.Tensor]:
    """How well a model draws the prompted concepts, for canonical and synonym-only prompts.

    Returns the report and the canonical-prompt images (objects x styles x seeds, row-major)."""
    report: dict = {"per_concept": {"objects": {}, "styles": {}}}
    canonical_images = None
    for key, synonym in (("", False), ("synonym_", True)):
        items = grid_items(seeds_per_cell, synonym)
        images = generate([i.prompt for i in items], [i.seed for i in items])
        canonical_images = images if canonical_images is None else canonical_images
        hits = judge(oracle, images, items)
        report[f"{key}object_accuracy"] = float(hits["object"].float().mean())
        report[f"{key}style_accuracy"] = float(hits["style"].float().mean())
        for axis, names, labels in (("objects", OBJECT_NAMES, [i.obj for i in items]),
                                    ("styles", STYLE_NAMES, [i.style for i in items])):
            hit = hits["object" if axis == "objects" else "style"]
            for name, acc in _per_concept(hit, labels, names).items():
                report["per_concept"][axis].setdefault(name, {})[f"{key}accuracy"] = acc
    report["classifier"] = accuracy(oracle, *render_labelled(HELDOUT_SEED0, heldout))
    report["settings"] = {"seeds_per_cell": seeds_per_cell, "images": 2 * len(grid_items(seeds_per_cell)),
                          "first_seed": EVAL_SEED0, "classifier_heldout_renders": heldout}
    return report, canonical_images


def markdown_table(report: dict) -> str:
    """The per-concept table of a base-model report, as Markdown."""
    lines = ["| axis | concept | accuracy | synonym-only accuracy |", "|---|---|---|---|"]
    for axis in ("objects", "styles"):
        for name, r in report["per_concept"][axis].items():
            lines.append(f"| {axis[:-1]} | {name} | {r['accuracy']:.2f} | {r['synonym_accuracy']:.2f} |")
    lines.append(f"| **all** | objects | **{report['object_accuracy']:.3f}** | "
                 f"**{report['synonym_object_accuracy']:.3f}** |")
    lines.append(f"| **all** | styles | **{report['style_accuracy']:.3f}** | "
                 f"**{report['synonym_style_accuracy']:.3f}** |")
    return "\n".join(lines)
