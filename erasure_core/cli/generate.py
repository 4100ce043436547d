"""erasure generate: a grid of images for one prompt, optionally with patches applied."""
from __future__ import annotations

from pathlib import Path

from .common import (UserError, add_model_option, add_patch_options, attached_or_error, finite_float, load_model,
                     load_patches, png_path, positive_int, progress_bar)

DEFAULT_STEPS = 25


def add_sampling_options(p, steps: int = DEFAULT_STEPS) -> None:
    add_model_option(p)
    p.add_argument("--steps", type=positive_int, default=steps, help="DDIM steps")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help="classifier-free guidance (default: the model's; the toy model's is 3)")


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate a grid of images for a prompt")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=positive_int, default=8, help="number of images (seeds seed..seed+n-1)")
    p.add_argument("--out", required=True, help="output PNG")
    add_patch_options(p)
    add_sampling_options(p)
    p.set_defaults(func=run)


def guidance_of(model, guidance: float | None) -> float:
    return guidance if guidance is not None else model.default_guidance


def run(args) -> int:
    from ..imaging import save_grid

    out = png_path(args.out, "--out")
    if args.n > 256:
        raise UserError(f"--n is at most 256, got {args.n}")
    patches = load_patches(args.patch, args.strength)
    model = load_model(args.model, args.prediction_type)
    seeds = list(range(args.seed, args.seed + args.n))
    with attached_or_error(model, patches):
        images = model.generate([args.prompt] * args.n, seeds, steps=args.steps,
                                guidance=guidance_of(model, args.guidance), progress=progress_bar("generate"))
    title = f'"{args.prompt}" seeds {seeds[0]}..{seeds[-1]}'
    if patches:
        title += " with " + ", ".join(f"{Path(p).stem}@{s:g}" for p, (_, s) in zip(args.patch, patches))
    save_grid(images, out, ncols=min(args.n, 8), scale=4, title=title)
    print(f"wrote {out}")
    return 0
