"""erasure train: train an erasure patch (every method in the registry)."""
from __future__ import annotations

import argparse

from pathlib import Path

from .common import UserError, add_model_option, finite_float, load_model, positive_int, progress_bar


def add_parser(sub) -> None:
    from ..methods import DEFAULT_METHOD, method_names, methods_help
    from ..request import TrainRequest

    defaults = TrainRequest(concept="")
    p = sub.add_parser("train", help="train an erasure patch")
    p.add_argument("--concept", required=True, help="concept to erase (toy model: an object or style name); several, "
                   "separated by commas, are erased by one patch")
    p.add_argument("--method", choices=method_names(), default=DEFAULT_METHOD,
                   help=f"default {DEFAULT_METHOD}. " + methods_help())
    p.add_argument("--alternative", default="",
                   help="concept that replaces the erased one (methods that take one; the others ignore it)")
    p.add_argument("--preserve", default=defaults.preserve,
                   help='concepts to keep, separated by commas; "auto" (default): the model\'s own default (every '
                        'other concept of the toy world; on a model without a vocabulary, the 8 nearest concepts '
                        'of the shipped word list); "none"')
    p.add_argument("--steps", type=positive_int, default=defaults.steps)
    p.add_argument("--lr", type=finite_float, default=None,
                   help="learning rate of weight deltas (default: the method's: " + ", ".join(
                       f"{s.name} {s.delta_lr:g}" for s in map(_spec, method_names()) if s.delta_lr) + ")")
    p.add_argument("--memory-lr", type=finite_float, default=None,
                   help="learning rate of memory tokens (default: the method's)")
    p.add_argument("--tokens", type=positive_int, default=defaults.tokens, help="memory tokens m")
    p.add_argument("--layers", default=defaults.layers, help="mid, midout, all, or comma-separated layer names")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--batch", type=positive_int, default=None,
                   help="images per training step (default: 1 for a checkpoint, about 3.7 GB above the model at "
                        "SD1.5 size; 8 for the toy model)")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="train at this many pixels square (default: the model's own, 512 for SD1.5; 256 or 384 "
                        "need far less memory)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute the UNet's transformer blocks in the backward pass: far less memory, about a "
                        "third slower (default: on for a checkpoint, off for the toy model)")
    p.add_argument("--cache-on-cpu", action="store_true",
                   help="keep the sampled trajectories in RAM instead of GPU memory (each batch is moved over)")
    p.add_argument("--on-top-of", action="append", default=[], metavar="PATCH",
                   help="an earlier patch (repeatable) to train on top of: it stays attached while training, its "
                        "concepts are preserved as erased, and --out holds the earlier erasures and the new one")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same settings from its checkpoint (kept beside --out)")
    add_model_option(p)
    p.set_defaults(func=run)


def _spec(name: str):
    from ..methods import get_method

    return get_method(name)


def request_from_args(args):
    """The CLI's flags as a training request (erasure_core.request); --on-top-of files are loaded and validated."""
    from ..patch import PatchError, load_patch
    from ..request import TrainRequest

    earlier = []
    for path in args.on_top_of:
        try:
            earlier.append(load_patch(path))
        except (OSError, PatchError) as exc:
            raise UserError(f"--on-top-of {path}: {exc}") from None
    return TrainRequest(concept=args.concept, method=args.method, alternative=args.alternative,
                        preserve=args.preserve, steps=args.steps, lr=args.lr, memory_lr=args.memory_lr,
                        tokens=args.tokens, layers=args.layers, seed=args.seed, batch=args.batch,
                        gradient_checkpointing=args.gradient_checkpointing, cache_on_cpu=args.cache_on_cpu,
                        on_top_of=earlier)


def train_to_file(model, request, out: Path, resume: bool = False) -> Path:
    """Validate, train and write the patch (and its key). Nothing is written when anything fails."""
    import dataclasses
    import sys

    import torch

    from ..engine import checkpoint_path, discard_checkpoint
    from ..methods import train_patch
    from ..patch import save_patch
    from ..request import RequestError, prepare

    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors, got {str(out)!r}")
    try:  # SAeUron reuses an SAE of this model already beside the patches, else trains one
        plan = prepare(dataclasses.replace(request, sae=request.sae or str(out.parent)), model)
    except RequestError as exc:
        raise UserError(str(exc)) from None
    for note in plan.notes:
        print(f"erasure: note: {note}", file=sys.stderr)
    checkpoint = checkpoint_path(out.parent / ".erasure-checkpoints", plan.config, model.fingerprint(),
                                 plan.earlier_digest)
    if checkpoint.exists() and not resume:
        discard_checkpoint(checkpoint)  # a fresh run was asked for
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if resume and checkpoint.exists():
        print(f"erasure: resuming from {checkpoint}", file=sys.stderr)
    try:
        result = plan.label(train_patch(model, plan.config, progress=progress_bar(f"train {plan.config.method}"),
                                        checkpoint=checkpoint, on_top_of=plan.on_top_of))
    except torch.cuda.OutOfMemoryError:
        raise UserError("out of GPU memory: lower --batch, --resolution or --tokens, train fewer --layers, or use "
                        "a smaller model; "
                        "nothing was written") from None
    except KeyboardInterrupt:
        print(f"erasure: interrupted; `erasure train ... --resume` with the same settings continues from the "
              f"checkpoint of the last minute ({checkpoint})", file=sys.stderr)
        raise
    save_patch(result.patch, out)
    discard_checkpoint(checkpoint)
    if not any(checkpoint.parent.iterdir()):
        checkpoint.parent.rmdir()
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KB) in {result.seconds:.1f} s")
    if result.key is not None:
        key_path = save_patch(result.key, out.with_name(out.stem + ".key.safetensors"))
        print(f"wrote the key {key_path}: apply it together with the patch to restore the concept")
    return out


def run(args) -> int:
    from ..denoiser import at_resolution

    try:
        model = at_resolution(load_model(args.model, args.prediction_type), args.resolution or 0)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    train_to_file(model, request_from_args(args), Path(args.out), resume=args.resume)
    return 0
