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
DEFAULT_GUIDANCE = 3.0


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
    """A tqdm bar driven by (done, total[, loss]) callbacks; created on first use, closed when done."""
    from tqdm import tqdm

    state: dict = {}

    def update(done: int, total: int, loss: float | None = None) -> None:
        bar = state.get("bar") or state.setdefault("bar", tqdm(total=total, desc=desc))
        bar.total, bar.n = total, done
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            state.clear()

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


def _check_patches(model, patches) -> None:
    """Refuse patches the model cannot take, as a user error; print warnings. Changes nothing."""
    from .injection import plan_injection
    from .patch import PatchError

    try:
        warnings = plan_injection(model.unet, patches).warnings
    except PatchError as exc:
        raise UserError(str(exc)) from None
    for warning in warnings:
        print(f"erasure: warning: {warning}", file=sys.stderr)


@contextlib.contextmanager
def _attached_or_error(model, patches):
    """Attach patches to the model's UNet for the duration, after checking them."""
    if not patches:
        yield
        return
    from .injection import attached

    _check_patches(model, patches)
    with attached(model.unet, patches):
        yield


def cmd_purify(args) -> int:
    """All-but-One purification of an image: invert under the original model, regenerate under the patched one."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from .imaging import save_grid
    from .purify import purify

    out = _png_path(args.out, "--out")
    patches = _load_patches(args.patch, args.strength)
    try:
        picture = Image.open(args.image).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read --image {args.image}: {exc}") from None
    model = _load_model(args.model)
    _check_patches(model, patches)
    size = model.image_size
    picture = picture.resize((size, size), Image.BICUBIC)
    image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    concepts = patches[0][0].concepts
    prompt = args.prompt if args.prompt is not None else _concept_prompt(model, concepts[0]) if concepts else ""
    latents = model.encode_image(image)
    purified = model.decode(purify(model, patches, latents, prompt, steps=args.steps, guidance=args.guidance,
                                   progress=_progress_bar("purify")))
    Image.fromarray((purified[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out)
    print(f"wrote {out}")
    if args.compare:
        save_grid(torch.cat([image, purified]), _png_path(args.compare, "--compare"), ncols=2,
                  scale=max(1, 256 // size), col_labels=["input", "purified"], title=f'purify with "{prompt}"')
        print(f"wrote {args.compare}")
    return 0


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
    tensors = patch.tensors()
    shown = [f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in list(tensors.items())[:8]]
    more = f", and {len(tensors) - 8} more ({sum(v.numel() for v in tensors.values()):,} values in all)" \
        if len(tensors) > 8 else ""
    print(f"  {'tensors':<{width}}  " + ", ".join(shown) + more)
    return 0


def cmd_evaluate(args) -> int:
    if args.patch:
        return _evaluate_patches(args)
    from .toy.evaluation import evaluate_base, markdown_table
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


def _methods() -> tuple[str, ...]:
    from .methods import METHODS

    return METHODS


def _concept_prompt(model, text: str) -> str:
    """On the toy model a world concept becomes its training prompt; elsewhere the text is the prompt."""
    if getattr(model, "name", "") == "toy":
        from .toy.world import concept, training_prompt

        try:
            concept(text)
        except KeyError as exc:
            raise UserError(exc.args[0]) from None
        return training_prompt(text)
    return text


def _preserve_list(model, target: str, text: str) -> list[str]:
    """--preserve: "auto" keeps every other concept of the toy world on the toy model (nothing elsewhere), "none"
    keeps nothing, otherwise a comma-separated list."""
    if text.strip() == "auto":
        if getattr(model, "name", "") != "toy":
            return []
        from .toy.benchmark import default_preserve

        try:
            return default_preserve(target)
        except KeyError as exc:
            raise UserError(exc.args[0]) from None
    return [] if text.strip() == "none" else [p.strip() for p in text.split(",") if p.strip()]


def cmd_train(args) -> int:
    import torch

    from .engine import TrainConfig
    from .methods import TAKES_ALTERNATIVE, train_patch
    from .patch import save_patch

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors, got {args.out!r}")
    model = _load_model(args.model)
    preserve = _preserve_list(model, args.concept, args.preserve)
    layers = args.layers if args.layers in ("mid", "midout", "all") else [n.strip() for n in args.layers.split(",")]
    try:
        from .layers import select_layers

        select_layers(model.layer_names(), layers)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    alternative = args.alternative if args.method in TAKES_ALTERNATIVE else ""  # ESD has no anchor
    config = TrainConfig(concept=_concept_prompt(model, args.concept), method=args.method,
                         alternative=_concept_prompt(model, alternative) if alternative else "",
                         preserve=[_concept_prompt(model, p) for p in preserve], steps=args.steps, lr=args.lr,
                         memory_lr=args.memory_lr, tokens=args.tokens, layers=layers, seed=args.seed)
    try:
        result = train_patch(model, config, progress=_progress_bar(f"train {args.method}"))
    except torch.cuda.OutOfMemoryError:
        raise UserError("out of GPU memory: lower --tokens, train fewer --layers, or use a smaller model; "
                        "nothing was written") from None
    patch, key = result.patch, result.key
    patch.concepts, patch.preserve = [args.concept], preserve
    patch.alternative = alternative
    save_patch(patch, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KB) in {patch.training['seconds']:.1f} s")
    if key is not None:
        key.concepts, key.method = [args.concept], "memory-key"
        key_path = save_patch(key, out.with_name(out.stem + ".key.safetensors"))
        print(f"wrote the key {key_path}: apply it together with the patch to restore the concept")
    return 0


def _evaluate_patches(args) -> int:
    from .toy.evaluation import ErasureTarget, evaluate_erasure
    from .toy.classifier import load_oracle

    patches = _load_patches(args.patch, args.strength)
    target_name = args.target or (patches[0][0].concepts[0] if patches[0][0].concepts else "")
    alternative = args.alternative if args.alternative is not None else patches[0][0].alternative
    try:
        target = ErasureTarget.from_names(target_name, alternative)
    except (KeyError, ValueError) as exc:
        raise UserError(f"--target: {exc.args[0]}") from None
    model = _load_model(args.model)
    _check_patches(model, patches)
    oracle = load_oracle()
    report, images = evaluate_erasure(model, patches, oracle, target, args.seeds_per_cell, args.steps, args.guidance,
                                      progress=_progress_bar("evaluate"))
    report.update(target=target_name, alternative=alternative or None, patches=[str(p) for p in args.patch])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    keys = ("ua", "ua_syn", "ira", "cra", "alt", "fd", "drift", "layout_ssim")
    print("| metric | patched | base |\n|---|---|---|")
    for k in keys:
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        print(f"| {k} | {fmt(report[k])} | {fmt(report['base'][k])} |")
    return 0


def cmd_demo(args) -> int:
    """The main job: erase a concept from the toy model, draw before/after, measure."""
    import torch

    from .toy.evaluation import ErasureTarget, evaluate_erasure
    from .imaging import save_grid
    from .injection import attached
    from .methods import TAKES_ALTERNATIVE
    from .patch import load_patch
    from .toy.classifier import load_oracle
    from .toy.world import prompt

    out_dir = Path(args.out_dir)
    if args.alternative == "auto":
        from .toy.benchmark import default_alternative

        args.alternative = default_alternative(args.concept) if _known(args.concept) else ""
    if args.alternative == "none" or args.method not in TAKES_ALTERNATIVE:
        args.alternative = ""
    try:
        target = ErasureTarget.from_names(args.concept, args.alternative)
    except (KeyError, ValueError) as exc:
        raise UserError(exc.args[0]) from None
    patch_path = out_dir / f"{args.concept}.safetensors"
    cmd_train(build_parser().parse_args(
        ["train", "--concept", args.concept, "--method", args.method, "--steps", str(args.steps),
         "--out", str(patch_path)] + (["--alternative", args.alternative] if args.alternative else [])))
    patches = [(load_patch(patch_path), 1.0)]
    model, oracle = _load_model(None), load_oracle()
    # four prompts naming the target, then four naming a neighbour on the same axis instead
    others = [i for i in range(8) if i != target.index][:4]
    partners = (1, 2, 3, 0) if target.axis == "object" else (0, 1, 4, 6)
    cells = [(target.index, p) for p in partners] + list(zip(others, partners))
    if target.axis == "style":
        cells = [(o, s) for s, o in cells]
    prompts = [prompt(o, s) for o, s in cells]
    seeds = [7, 8]
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = seeds * len(prompts)
    before = model.generate(all_prompts, all_seeds, steps=args.sample_steps)
    with attached(model.unet, patches):
        after = model.generate(all_prompts, all_seeds, steps=args.sample_steps)
    pairs = [torch.cat([before[i:i + 2], after[i:i + 2]]) for i in range(0, len(all_prompts), 2)]
    grid_path = save_grid(torch.cat(pairs), out_dir / "before_after.png", ncols=4, scale=3, row_labels=prompts,
                          col_labels=["original", "original", "erased", "erased"],
                          title=f"erase '{args.concept}' ({args.method}): same seeds, before | after")
    print(f"wrote {grid_path}")
    report, _ = evaluate_erasure(model, patches, oracle, target, seeds_per_cell=1, steps=args.sample_steps,
                                 progress=_progress_bar("evaluate"))
    report.update(target=args.concept, method=args.method, patch=str(patch_path))
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir / 'metrics.json'}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for k in ("ua", "ua_syn", "ira", "cra", "alt"):
        print(f"{k:>7}: {fmt(report[k])}  (base {fmt(report['base'][k])})")
    return 0


def _known(name: str) -> bool:
    from .toy.world import concept

    try:
        concept(name)
        return True
    except KeyError:
        return False


def cmd_bench(args) -> int:
    """Several methods on several targets, side by side with the same seeds: JSON and a Markdown table."""
    from .toy.benchmark import markdown, run_benchmark
    from .engine import TrainConfig
    from .methods import METHODS
    from .toy.classifier import load_oracle
    from .toy.world import concept

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {unknown[0] if unknown else 'none given'}; use {', '.join(METHODS)}")
    alternatives = {}
    if args.alternatives.strip() == "auto":
        from .toy.benchmark import default_alternative

        args.alternatives = ",".join(f"{t}:{default_alternative(t)}" for t in targets if _known(t))
    for pair in filter(None, (a.strip() for a in (args.alternatives or "").split(","))):
        target, _, alternative = pair.partition(":")
        alternatives[target.strip()] = alternative.strip()
    try:
        for name in targets + list(alternatives) + list(alternatives.values()):
            concept(name)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    if not targets:
        raise UserError("--targets: give at least one concept")
    model, oracle = _load_model(None), load_oracle()
    config = TrainConfig(concept="", steps=args.steps, seed=args.seed)
    results = run_benchmark(model, oracle, methods, targets, config, Path(args.out_dir), alternatives,
                            preserve=not args.no_preserve, seeds_per_cell=args.seeds_per_cell,
                            sample_steps=args.sample_steps, progress=lambda what: print(f"bench: {what}", flush=True))
    print(markdown(results))
    print(f"wrote {Path(args.out_dir) / 'bench.json'} and {Path(args.out_dir) / 'bench.md'}")
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


def cmd_ui(args) -> int:
    """The Concept Erasure tab as a standalone app (gradio), training on the toy model or --model."""
    from .ui import launch

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    model = _load_model(args.model)
    launch(model, Path(args.patch_dir), host=args.host, port=args.port)
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

    p = sub.add_parser("purify", help="remove erased concepts from an image (All-but-One purification)")
    p.add_argument("--image", required=True, help="input image (resized to the model's resolution)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--patch", action="append", required=True, help="erasure patch (repeatable)")
    p.add_argument("--strength", action="append", type=_finite_float)
    p.add_argument("--prompt", help="what the image shows (default: the patch's erased concept)")
    p.add_argument("--compare", help="also write an input | purified PNG here")
    p.add_argument("--model", help="model folder (default: the embedded toy model)")
    p.add_argument("--steps", type=_positive_int, default=50, help="DDIM inversion steps")
    p.add_argument("--guidance", type=_finite_float, default=1.0,
                   help="guidance of inversion and regeneration (1 keeps the inversion exact)")
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("inspect", help="validate a patch file and print its metadata")
    p.add_argument("patch")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("evaluate", help="judge generations over the object x style grid with the oracle")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--seeds-per-cell", type=_positive_int, default=2)
    p.add_argument("--grid", help="also write a PNG of the generations, objects x styles")
    p.add_argument("--patch", action="append", help="evaluate the erasure made by this patch (repeatable)")
    p.add_argument("--strength", action="append", type=_finite_float)
    p.add_argument("--target", help="erased concept (default: the patch's)")
    p.add_argument("--alternative", help="expected replacement (default: the patch's)")
    sampling_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train an erasure patch")
    p.add_argument("--concept", required=True, help="concept to erase (toy model: an object or style name)")
    p.add_argument("--method", choices=_methods(), default="memory")
    p.add_argument("--alternative", default="",
                   help="concept that replaces the erased one (memory variants, all-but-one, uce)")
    p.add_argument("--preserve", default="auto",
                   help='comma-separated concepts to keep; "auto" (default): on the toy model every other concept '
                        'of the toy world, elsewhere none; "none"')
    p.add_argument("--steps", type=_positive_int, default=200)
    p.add_argument("--lr", type=_finite_float, default=None,
                   help="learning rate of weight deltas (default: 1e-3; esd-u 1e-4)")
    p.add_argument("--memory-lr", type=_finite_float, default=1e-2, help="learning rate of memory tokens")
    p.add_argument("--tokens", type=_positive_int, default=8, help="memory tokens m")
    p.add_argument("--layers", default="all", help="mid, midout, all, or comma-separated layer names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--model", help="model folder (default: the embedded toy model)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="erase a concept from the toy model: before/after grid and metrics")
    p.add_argument("--concept", default="circle")
    p.add_argument("--method", choices=_methods(), default="memory")
    p.add_argument("--alternative", default="auto",
                   help='what the concept becomes; "auto" (default): a neighbour on its axis (circle: square), "none"')
    p.add_argument("--steps", type=_positive_int, default=200, help="training steps")
    p.add_argument("--sample-steps", type=_positive_int, default=20, help="DDIM steps when generating")
    p.add_argument("--out-dir", default="demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmark methods side by side on the toy model (JSON + Markdown table)")
    p.add_argument("--methods", default="memory,all-but-one,esd-x,uce", help="comma-separated methods")
    p.add_argument("--targets", default="circle,stripes,star,dots", help="comma-separated concepts to erase")
    p.add_argument("--alternatives", default="auto",
                   help='target:alternative pairs the methods that take one map the target to; "auto" (default): '
                        'circle:square, star:cross, stripes:checker, dots:grid, else the next concept of the axis; '
                        '"" for none')
    p.add_argument("--steps", type=_positive_int, default=200, help="training steps of every trained method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-preserve", action="store_true",
                   help="do not preserve the toy world's other concepts")
    p.add_argument("--seeds-per-cell", type=_positive_int, default=1)
    p.add_argument("--sample-steps", type=_positive_int, default=20)
    p.add_argument("--out-dir", default="bench/results", help="patches, bench.json and bench.md go here; "
                                                             "a rerun with the same settings resumes")
    p.set_defaults(func=cmd_bench)

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

    p = sub.add_parser("ui", help="the Concept Erasure training tab as a local web app")
    p.add_argument("--model", help="model folder (default: the embedded toy model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--patch-dir", default="erasures", help="where trained patches are written")
    p.set_defaults(func=cmd_ui)
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
