"""erasure evaluate: how well the base model draws its world, or what a patch erased (judged by the model
vocabulary's oracle)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .common import (UserError, add_patch_options, check_patches, load_model, load_patches, png_path,
                     positive_int, progress_bar, vocabulary_or_error)
from .generate import add_sampling_options, guidance_of


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="judge generations over the object x style grid with the oracle")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--seeds-per-cell", type=positive_int, default=2)
    p.add_argument("--grid", help="also write a PNG of the generations, objects x styles")
    add_patch_options(p, help="evaluate the erasure made by this patch (repeatable)")
    p.add_argument("--target", help="erased concept (default: the patch's)")
    p.add_argument("--alternative", help="expected replacement (default: the patch's)")
    p.add_argument("--strengths", action="store_true",
                   help="instead: UA of one patch at strengths 0, 0.25, ... 1.25, and from which strength it erases "
                        "fully (what the hosts show beside the slider)")
    p.add_argument("--write", action="store_true", help="with --strengths: store the result in the patch file")
    add_sampling_options(p)
    p.set_defaults(func=run)


def _write_json(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")


def run(args) -> int:
    if args.patch:
        return _evaluate_patches(args)
    from ..toy.evaluation import evaluate_base, markdown_table

    grid_png = png_path(args.grid, "--grid") if args.grid else None
    model = load_model(args.model, args.prediction_type)
    oracle = vocabulary_or_error(model, "evaluate").oracle()
    guidance = guidance_of(model, args.guidance)
    start = time.time()
    bar = progress_bar("evaluate")
    report, images = evaluate_base(lambda p, s: model.generate(p, s, steps=args.steps, guidance=guidance,
                                                               progress=bar),
                                   oracle, seeds_per_cell=args.seeds_per_cell)
    report["settings"].update(steps=args.steps, guidance=guidance, seconds=round(time.time() - start, 1))
    if grid_png:
        from ..imaging import save_grid
        from ..toy.world import OBJECT_NAMES, STYLE_NAMES

        first_seed = images[::args.seeds_per_cell]  # one image per object x style cell
        save_grid(first_seed, grid_png, ncols=len(STYLE_NAMES), scale=3, row_labels=list(OBJECT_NAMES),
                  col_labels=list(STYLE_NAMES), title="prompt: a {object} with {style}")
        print(f"wrote {grid_png}")
    print(markdown_table(report))
    print("classifier held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in report["classifier"].items()))
    _write_json(args.json, report)
    return 0


def _evaluate_patches(args) -> int:
    from ..toy.evaluation import ErasureTarget, evaluate_erasure

    patches = load_patches(args.patch, args.strength)
    target_name = args.target or (patches[0][0].concepts[0] if patches[0][0].concepts else "")
    alternative = args.alternative if args.alternative is not None else patches[0][0].alternative
    try:
        target = ErasureTarget.from_names(target_name, alternative)
    except (KeyError, ValueError) as exc:
        raise UserError(f"--target: {exc.args[0]}") from None
    if args.write and not args.strengths:
        raise UserError("--write stores the strength measurement: use it with --strengths")
    if args.strengths and len(patches) != 1:
        raise UserError("--strengths measures one patch; give one --patch")
    model = load_model(args.model, args.prediction_type)
    oracle = vocabulary_or_error(model, "evaluate").oracle()
    check_patches(model, patches)
    if args.strengths:
        return _strengths(args, model, oracle, patches[0][0], target, target_name)
    report, _ = evaluate_erasure(model, patches, oracle, target, args.seeds_per_cell, args.steps,
                                 guidance_of(model, args.guidance), progress=progress_bar("evaluate"))
    report.update(target=target_name, alternative=alternative or None, patches=[str(p) for p in args.patch])
    _write_json(args.json, report)
    keys = ("ua", "ua_syn", "ira", "cra", "alt", "fd", "drift", "layout_ssim")
    print("| metric | patched | base |\n|---|---|---|")
    for k in keys:
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        print(f"| {k} | {fmt(report[k])} | {fmt(report['base'][k])} |")
    return 0


def _strengths(args, model, oracle, patch, target, target_name: str) -> int:
    from ..toy.evaluation import STRENGTHS, ProtocolCounts, strength_card, strength_curve

    counts = ProtocolCounts(target_seeds=args.seeds_per_cell)
    card = strength_card(strength_curve(model, [(patch, 1.0)], oracle, target, STRENGTHS, counts, args.steps,
                                        guidance_of(model, args.guidance)))
    print("| strength | UA |\n|---|---|")
    for s, ua in card["ua"].items():
        print(f"| {float(s):g} | {ua:.2f} |")
    patch.metrics["strength"] = card
    print(patch.strength_note())
    _write_json(args.json, {"patch": args.patch[0], "target": target_name, "strength": card})
    if args.write:
        from ..patch import save_patch

        save_patch(patch, args.patch[0])
        print(f"stored the strength card in {args.patch[0]} (erasure.metrics)")
    return 0
