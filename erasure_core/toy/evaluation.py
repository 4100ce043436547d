"""Judge generations with the oracle over the toy world's object x style grid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .classifier import HELDOUT_SEED0, Oracle, accuracy, render_labelled
from .world import OBJECT_NAMES, STYLE_NAMES, prompt

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


# -- erasure metrics (BENCHMARK.md) ---------------------------------------------------------------


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N x F each)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return max(0.0, float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity per image pair (Wang et al. 2004), (N,C,H,W) in [0,1]: the standard SSIM, with a
    Gaussian window (11×11, σ = 1.5), C1 = (0.01·L)², C2 = (0.03·L)² for L = 1, each channel on its own, averaged
    over the positions where the window fits inside the image (what scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)` gives)."""
    import torch.nn.functional as F

    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two image batches of one shape (N,C,H,W), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than the {window}-pixel SSIM window")
    x, y = x.double(), y.double()
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    channels = x.shape[1]
    kernel = torch.outer(g, g).to(x.device).expand(channels, 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=channels)  # noqa: E731  (valid: no padding)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()


@dataclass
class ErasureTarget:
    """What is erased, on which axis, and what should replace it (None: nothing in particular)."""

    axis: str  # "object" or "style"
    index: int
    alternative: int | None = None

    @classmethod
    def from_names(cls, target: str, alternative: str = "") -> "ErasureTarget":
        from .world import concept

        t = concept(target)
        names = OBJECT_NAMES if t.axis == "object" else STYLE_NAMES
        alt = None
        if alternative:
            a = concept(alternative)
            if a.axis != t.axis:
                raise ValueError(f"the alternative {alternative!r} is a {a.axis}, the target {target!r} a {t.axis}")
            alt = names.index(a.name)
        return cls(t.axis, names.index(t.name), alt)

    def label(self, item: GridItem) -> int:
        return item.obj if self.axis == "object" else item.style


def erasure_items(target: ErasureTarget, seeds_per_cell: int, other_cells_every: int = 1
                  ) -> tuple[list[GridItem], list[GridItem]]:
    """The canonical grid, and the synonym-only prompts of the target's cells.

    `other_cells_every` n > 1 keeps every target cell but only the other cells (o, s) with (o + s) % n == 0: a
    diagonal lattice that still spans every object and style, for a quick look (the demo)."""
    if other_cells_every < 1:
        raise ValueError(f"other_cells_every must be at least 1, got {other_cells_every}")
    synonyms = [i for i in grid_items(seeds_per_cell, synonym=True) if target.label(i) == target.index]
    canonical = [i for i in grid_items(seeds_per_cell)
                 if target.label(i) == target.index or (i.obj + i.style) % other_cells_every == 0]
    return canonical, synonyms


def erasure_metrics(oracle: Oracle, target: ErasureTarget, items: list[GridItem], images: torch.Tensor,
                    syn_items: list[GridItem], syn_images: torch.Tensor, base_images: torch.Tensor,
                    drift: float) -> dict:
    """UA, UA-syn, IRA, CRA, ALT, FD and layout similarity of one model's images (BENCHMARK.md)."""
    axis, other = ("object", "style") if target.axis == "object" else ("style", "object")
    pred, syn_pred = oracle.predict(images), oracle.predict(syn_images)
    on_target = torch.tensor([target.label(i) == target.index for i in items])
    labels = {"object": torch.tensor([i.obj for i in items]), "style": torch.tensor([i.style for i in items])}
    keep = ~on_target
    feats_edit, feats_base = oracle.embed(images[keep]), oracle.embed(base_images[keep])
    return {
        "ua": float((pred[axis][on_target] != target.index).float().mean()),
        "ua_syn": float((syn_pred[axis] != target.index).float().mean()),
        "ira": float((pred[axis][keep] == labels[axis][keep]).float().mean()),
        "cra": float((pred[other][keep] == labels[other][keep]).float().mean()),
        "alt": None if target.alternative is None
        else float((pred[axis][on_target] == target.alternative).float().mean()),
        "fd": frechet_distance(feats_base, feats_edit),
        "drift": drift,
        "layout_ssim": float(ssim(images[on_target], base_images[on_target]).mean()),
    }


@torch.no_grad()
def unconditional_drift(denoiser, patches: list, n: int = 64, seed: int = 0) -> float:
    """Mean ‖ε_θ(x_t, ∅) − ε*(x_t, ∅)‖² over noised ground-truth renders at random timesteps."""
    from ..denoiser import patched

    x0, _ = render_labelled(HELDOUT_SEED0 + 50_000 + seed, n)
    g = torch.Generator().manual_seed(seed)
    sched = denoiser.scheduler()
    t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=g)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * (x0 * 2 - 1) + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
    empty = denoiser.encode([""]).expand(n)
    base = denoiser.predict_noise(xt, t, empty)
    with patched(denoiser, patches):
        edited = denoiser.predict_noise(xt, t, empty)
    return float((edited - base).square().mean())


def evaluate_erasure(denoiser, patches: list, oracle: Oracle, target: ErasureTarget, seeds_per_cell: int = 2,
                     steps: int = 25, guidance: float = 3.0, progress: Callable[[int, int], None] | None = None,
                     base: dict | None = None, other_cells_every: int = 1) -> tuple[dict, torch.Tensor]:
    """Metrics of the patched model with the base model's beside them, same prompts and seeds; and the
    patched model's canonical-grid images.

    `base` may carry images already generated for the base model (keys "images", "syn_images"), so that a
    benchmark of several methods generates them once. `other_cells_every`: see erasure_items."""
    from ..denoiser import patched

    items, syn_items = erasure_items(target, seeds_per_cell, other_cells_every)
    prompts = [i.prompt for i in items] + [i.prompt for i in syn_items]
    seeds = [i.seed for i in items] + [i.seed for i in syn_items]

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        images = denoiser.generate(prompts, seeds, steps=steps, guidance=guidance, progress=progress)
        return images[:len(items)], images[len(items):]

    if base is None or "images" not in base:
        base_images, base_syn = run()
        if base is not None:
            base.update(images=base_images, syn_images=base_syn)
    else:
        base_images, base_syn = base["images"], base["syn_images"]
    with patched(denoiser, patches):
        images, syn_images = run()
    report = erasure_metrics(oracle, target, items, images, syn_items, syn_images, base_images,
                             unconditional_drift(denoiser, patches))
    report["base"] = erasure_metrics(oracle, target, items, base_images, syn_items, base_syn, base_images, 0.0)
    on_target = sum(target.label(i) == target.index for i in items)
    report["image_counts"] = {"target": on_target, "synonym": len(syn_items), "other": len(items) - on_target}
    return report, images


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate hits/n: honest at small n and at 0 or n hits, where the normal
    approximation gives a zero-width interval."""
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    if not 0 <= hits <= n:
        raise ValueError(f"hits must be between 0 and n={n}, got {hits}")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def rate(hits: torch.Tensor) -> dict:
    """A share of a boolean tensor with its count and Wilson interval: {"rate", "n", "interval"}."""
    n, k = int(hits.numel()), int(hits.sum())
    return {"rate": round(k / n, 4), "n": n, "interval": list(wilson_interval(k, n))}


# -- protocol v2 (docs/benchmark.md): never score what a method was told to keep ----------------------------

PHRASING_FAMILIES = ("colour", "adjective", "comma", "second-style")


def phrasing(family: str, obj: int, style: int, k: int) -> str:
    """A target-cell prompt in a family the erasure training never used (it trains on "a circle" and "a shape with
    stripes"): a colour word, the adjective word order, the comma form, or a second style in the prompt. All are
    built from the toy captions' grammar, so the base model knows them."""
    from .world import COLOUR_NAMES, OBJECTS, STYLES, compose

    o, s = OBJECTS[obj], STYLES[style]
    colour = COLOUR_NAMES[k % len(COLOUR_NAMES)]
    if family == "colour":
        return compose(o.nouns[0], colour, s.nouns[0], s.adjectives[0], template=0)
    if family == "adjective":
        return compose(o.nouns[0], "", s.nouns[0], s.adjectives[0], template=1)
    if family == "comma":
        return compose(o.nouns[0], colour, s.nouns[0], s.adjectives[0], template=2)
    if family == "second-style":
        second = STYLES[(style + 1 + k) % len(STYLES)]
        return f"a {second.adjectives[0]} {o.nouns[0]} with {s.nouns[0]}"
    raise ValueError(f"unknown phrasing family {family!r}; use {', '.join(PHRASING_FAMILIES)}")


@dataclass(frozen=True)
class ProtocolCounts:
    """Images per model: the target's cells × `target_seeds` (canonical and synonym), every other cell ×
    `other_seeds`, and each phrasing family × the target's cells × `phrasing_seeds`."""

    target_seeds: int = 4
    other_seeds: int = 2
    phrasing_seeds: int = 2


def protocol_items(target: ErasureTarget, counts: ProtocolCounts = ProtocolCounts()) -> dict[str, list[GridItem]]:
    """The prompts and seeds of protocol v2, by group: "target", "synonym", "other", and "phrasing:<family>".
    Seeds are fixed per (group, cell, k), so every method and the base model see the same noise."""
    groups: dict[str, list[GridItem]] = {"target": [], "synonym": [], "other": []}
    n_styles = len(STYLE_NAMES)
    for o in range(len(OBJECT_NAMES)):
        for s in range(n_styles):
            cell = o * n_styles + s
            on_target = (o if target.axis == "object" else s) == target.index
            if on_target:
                for k in range(counts.target_seeds):
                    groups["target"].append(GridItem(prompt(o, s), o, s, EVAL_SEED0 + 10 * cell + k))
                    groups["synonym"].append(GridItem(prompt(o, s, synonym=1 + k), o, s, 20_000 + 10 * cell + k))
                for f, family in enumerate(PHRASING_FAMILIES):
                    groups.setdefault(f"phrasing:{family}", []).extend(
                        GridItem(phrasing(family, o, s, k), o, s, 30_000 + 1000 * f + 10 * cell + k)
                        for k in range(counts.phrasing_seeds))
            else:
                groups["other"].extend(GridItem(prompt(o, s), o, s, EVAL_SEED0 + 10 * cell + k)
                                       for k in range(counts.other_seeds))
    return groups


def split_retention(oracle_pred: dict[str, torch.Tensor], target: ErasureTarget, items: list[GridItem],
                    preserved: set[str]) -> dict[str, dict]:
    """IRA and CRA of non-target images, each on the concepts that preservation named and on the held-out rest.
    IRA: the target axis's accuracy on cells whose target-axis concept is in the split; CRA: the other axis's
    accuracy on cells whose other-axis concept is in the split."""
    axis, other = ("object", "style") if target.axis == "object" else ("style", "object")
    names = {"object": OBJECT_NAMES, "style": STYLE_NAMES}
    labels = {"object": torch.tensor([i.obj for i in items]), "style": torch.tensor([i.style for i in items])}
    out = {}
    for metric, ax in (("ira", axis), ("cra", other)):
        correct = oracle_pred[ax] == labels[ax]
        named = torch.tensor([names[ax][int(v)] in preserved for v in labels[ax]])
        for split, mask in (("heldout", ~named), ("preserved", named)):
            out[f"{metric}_{split}"] = rate(correct[mask]) if bool(mask.any()) else None
    return out


def protocol_metrics(oracle: Oracle, target: ErasureTarget, groups: dict[str, list[GridItem]],
                     images: dict[str, torch.Tensor], base_images: dict[str, torch.Tensor], preserved: set[str],
                     drift: float) -> dict:
    """Protocol v2's metrics of one model's images: every rate with n and its Wilson interval."""
    axis = target.axis
    pred = {g: oracle.predict(images[g]) for g in groups}
    erased = lambda g: pred[g][axis] != target.index  # noqa: E731
    report = {"ua": rate(erased("target")), "ua_syn": rate(erased("synonym")),
              "alt": None if target.alternative is None else rate(pred["target"][axis] == target.alternative),
              **split_retention(pred["other"], target, groups["other"], preserved),
              "phrasings": {g.split(":", 1)[1]: rate(erased(g)) for g in groups if g.startswith("phrasing:")},
              "fd": frechet_distance(oracle.embed(base_images["other"]), oracle.embed(images["other"])),
              "drift": drift,
              "layout_ssim": float(ssim(images["target"], base_images["target"]).mean())}
    return report


def evaluate_protocol(denoiser, patches: list, oracle: Oracle, target: ErasureTarget, preserved: list[str],
                      counts: ProtocolCounts = ProtocolCounts(), steps: int = 10, guidance: float = 3.0,
                      base: dict | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Protocol v2 for one patched model, with the base model's figures beside it ("base"). `base` may carry
    the base model's images from an earlier call (same target and counts), so a benchmark generates them once."""
    from ..denoiser import patched

    groups = protocol_items(target, counts)
    order = list(groups)
    prompts = [i.prompt for g in order for i in groups[g]]
    seeds = [i.seed for g in order for i in groups[g]]

    def run() -> dict[str, torch.Tensor]:
        flat = denoiser.generate(prompts, seeds, steps=steps, guidance=guidance, progress=progress)
        out, at = {}, 0
        for g in order:
            out[g], at = flat[at:at + len(groups[g])], at + len(groups[g])
        return out

    base = {} if base is None else base
    if "images" not in base:
        base["images"] = run()
    with patched(denoiser, patches):
        images = run()
    report = protocol_metrics(oracle, target, groups, images, base["images"], set(preserved),
                              unconditional_drift(denoiser, patches))
    report["base"] = protocol_metrics(oracle, target, groups, base["images"], base["images"], set(preserved), 0.0)
    report["image_counts"] = {g: len(v) for g, v in groups.items()}
    report["images"] = images
    return report


def strength_leak(denoiser, patches: list, oracle: Oracle, target: ErasureTarget, strength: float = 0.5,
                  counts: ProtocolCounts = ProtocolCounts(), steps: int = 10, guidance: float = 3.0) -> dict:
    """UA of the target's canonical prompts with every patch at `strength` (does a half-strength patch leak?)."""
    items = protocol_items(target, counts)["target"]
    from ..denoiser import patched

    with patched(denoiser, [(p, strength) for p, _ in patches]):
        images = denoiser.generate([i.prompt for i in items], [i.seed for i in items], steps=steps, guidance=guidance)
    return rate(oracle.predict(images)[target.axis] != target.index)


STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)  # the strength curve's grid: off, the slider's range, beyond it


def strength_curve(denoiser, patches: list, oracle: Oracle, target: ErasureTarget,
                   strengths: tuple[float, ...] = STRENGTHS, counts: ProtocolCounts = ProtocolCounts(),
                   steps: int = 10, guidance: float = 3.0) -> dict[str, dict]:
    """UA of the target's canonical prompts at each strength (keys "0.0", "0.25", ...): where the slider erases."""
    return {str(s): strength_leak(denoiser, patches, oracle, target, s, counts, steps, guidance) for s in strengths}


FULL_ERASURE_SLACK = 0.1  # "erases fully": UA within this of the patch's own UA at strength 1


def strength_card(curve: dict[str, dict]) -> dict:
    """A patch's metrics["strength"] from its strength curve: UA per strength and `erases_from`, the lowest grid
    strength from which every strength up to 1 keeps UA within FULL_ERASURE_SLACK of UA at 1 (None where UA at 1
    is under 0.5: the patch does not erase). What every host shows beside the slider (ErasurePatch.strength_note)."""
    ua = {k: v["rate"] for k, v in curve.items()}
    grid = sorted(float(k) for k in ua)
    full = ua.get("1.0")
    start = None
    if full is not None and full >= 0.5:
        for s in reversed([g for g in grid if 0 < g <= 1]):
            if ua[str(s)] < full - FULL_ERASURE_SLACK:
                break
            start = s
    return {"ua": ua, "erases_from": start, "n": next(iter(curve.values()))["n"], "judge": "the model's oracle",
            "slack": FULL_ERASURE_SLACK}
