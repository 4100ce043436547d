"""The `erasure` command line. User errors exit with status 2 and one line on stderr."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 2.0


class UserError(Exception):
    """Bad input from the user: reported in one line, never as a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, as for every other user error
        raise UserError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _load_model(path: str | None):
    """The toy model by default; otherwise a toy-model folder or a local diffusers pipeline folder."""
    from .toy.model import ASSETS, load_toy_model

    folder = Path(path) if path else ASSETS
    if (folder / "model_index.json").is_file():
        from .backends.diffusers_backend import load_pipeline_folder

        try:
            return load_pipeline_folder(folder)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the pipeline in {folder}: {str(exc).splitlines()[0]}") from None
    needed = ("unet.safetensors", "text_encoder.safetensors", "unet_config.json", "text_config.json", "tokenizer")
    missing = [n for n in needed if not (folder / n).exists()]
    if missing:
        raise UserError(f"{folder} is neither a diffusers pipeline folder (model_index.json) nor a toy-model "
                        f"folder (missing {', '.join(missing)})")
    return load_toy_model(folder)


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=1, desc=desc, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _png_path(text: str, option: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise UserError(f"{option} must end in .png, got {text!r}")
    return path


def cmd_generate(args) -> int:
    from .imaging import save_grid

    out = _png_path(args.out, "--out")
    if args.n > 256:
        raise UserError(f"--n is at most 256, got {args.n}")
    patches = _load_patches(args.patch, args.strength)
    model = _load_model(args.model)
    seeds = list(range(args.seed, args.seed + args.n))
    with _attached_or_error(model, patches):
        images = model.generate([args.prompt] * args.n, seeds, steps=args.steps, guidance=args.guidance,
                                progress=_progress_bar("generate"))
    title = f'"{args.prompt}" seeds {seeds[0]}..{seeds[-1]}'
    if patches:
        title += " with " + ", ".join(f"{Path(p).stem}@{s:g}" for p, (_, s) in zip(args.patch, patches))
    save_grid(images, out, ncols=min(args.n, 8), scale=4, title=title)
    print(f"wrote {out}")
    return 0


def _load_patches(paths: list[str] | None, strengths: list[float] | None):
    """Load and validate every patch before any model work, so bad input costs nothing."""
    from .patch import PatchError, load_patch

    paths = paths or []
    strengths = strengths or [1.0] * len(paths)
    if len(strengths) != len(paths):
        raise UserError(f"give one --strength per --patch ({len(paths)} patches, {len(strengths)} strengths)")
    try:
        return [(load_patch(p), s) for p, s in zip(paths, strengths)]
    except PatchError as exc:
        raise UserError(str(exc)) from None


@contextlib.contextmanager
def _attached_or_error(model, patches):
    """Attach patches to the model's UNet for the duration; compatibility problems are user errors."""
    if not patches:
        yield
        return
    from .injection import attach
    from .patch import PatchError

    try:
        handle = attach(model.unet, patches)
    except PatchError as exc:
        raise UserError(str(exc)) from None
    for warning in handle.warnings:
        print(f"erasure: warning: {warning}", file=sys.stderr)
    try:
        yield
    finally:
        handle.detach()


def cmd_inspect(args) -> int:
    from .patch import PatchError, load_patch

    try:
        patch = load_patch(args.patch)
    except PatchError as exc:
        raise UserError(str(exc)) from None
    meta = patch.metadata()
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(f"{args.patch}: valid erasure patch, format {meta['erasure.format_version']}")
    width = max(len(k) for k in meta)
    for key, value in meta.items():
        print(f"  {key:<{width}}  {value}")
    print(f"  {'tensors':<{width}}  " + ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
                                               for k, v in patch.tensors().items()))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_base, markdown_table
    from .toy.classifier import load_oracle

    grid_png = _png_path(args.grid, "--grid") if args.grid else None
    model = _load_model(args.model)
    oracle = load_oracle()
    start = time.time()
    bar = _progress_bar("evaluate")
    report, images = evaluate_base(lambda p, s: model.generate(p, s, steps=args.steps, guidance=args.guidance,
                                                       progress=bar),
                           oracle, seeds_per_cell=args.seeds_per_cell)
    report["settings"].update(steps=args.steps, guidance=args.guidance, seconds=round(time.time() - start, 1))
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    if grid_png:
        from .imaging import save_grid
        from .toy.world import OBJECT_NAMES, STYLE_NAMES

        first_seed = images[::args.seeds_per_cell]  # one image per object x style cell
        save_grid(first_seed, grid_png, ncols=len(STYLE_NAMES), scale=3, row_labels=list(OBJECT_NAMES),
                  col_labels=list(STYLE_NAMES), title="prompt: a {object} with {style}")
        print(f"wrote {grid_png}")
    print(markdown_table(report))
    print("classifier held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in report["classifier"].items()))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def cmd_toy_train(args) -> int:
    from .toy.train import ship, train

    export = train(Path(args.run_dir), steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                   checkpoint_minutes=args.checkpoint_minutes)
    if args.ship:
        ship(export)
        print(f"shipped {export} into the package assets")
    print(f"exported EMA weights to {export}")
    return 0


def cmd_toy_oracle(args) -> int:
    from .toy.classifier import train_oracle

    acc = train_oracle(steps=args.steps, seed=args.seed)
    print("held-out accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="erasure", description="Concept erasure for Stable Diffusion-style models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def sampling_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="model folder (default: the embedded toy model)")
        p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS, help="DDIM steps")
        p.add_argument("--guidance", type=_finite_float, default=DEFAULT_GUIDANCE, help="classifier-free guidance")

    p = sub.add_parser("generate", help="generate a grid of images for a prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=_positive_int, default=8, help="number of images (seeds seed..seed+n-1)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--patch", action="append", help="erasure patch to apply (repeatable)")
    p.add_argument("--strength", action="append", type=_finite_float,
                   help="strength of the matching --patch (repeatable; default 1)")
    sampling_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="validate a patch file and print its metadata")
    p.add_argument("patch")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("evaluate", help="judge generations over the object x style grid with the oracle")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--seeds-per-cell", type=_positive_int, default=2)
    p.add_argument("--grid", help="also write a PNG of the generations, objects x styles")
    sampling_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("toy-train", help="train the toy model (resumes from the run folder's checkpoint)")
    p.add_argument("--run-dir", default="runs/toy")
    p.add_argument("--steps", type=_positive_int, default=9000)
    p.add_argument("--batch", type=_positive_int, default=32)
    p.add_argument("--lr", type=_finite_float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-minutes", type=_finite_float, default=5.0)
    p.add_argument("--ship", action="store_true", help="copy the result into the package assets")
    p.set_defaults(func=cmd_toy_train)

    p = sub.add_parser("toy-oracle", help="train the oracle classifier on ground-truth renders")
    p.add_argument("--steps", type=_positive_int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_toy_oracle)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"erasure: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erasure: interrupted", file=sys.stderr)
        return 130
