"""erasure bench: several methods on several targets of the toy world, side by side with the same seeds."""
from __future__ import annotations

from pathlib import Path

from .common import UserError, load_model, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark methods side by side on the toy model (JSON + Markdown table)")
    p.add_argument("--methods", default="memory,all-but-one,esd-x,uce", help="comma-separated methods")
    p.add_argument("--targets", default="circle,stripes,star,dots", help="comma-separated concepts to erase")
    p.add_argument("--alternatives", default="auto",
                   help='target:alternative pairs the methods that take one map the target to; "auto" (default): '
                        'circle:square, star:cross, stripes:checker, dots:grid, else the next concept of the axis; '
                        '"" for none')
    p.add_argument("--steps", type=positive_int, default=200, help="training steps of every trained method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-preserve", action="store_true",
                   help="do not preserve the toy world's other concepts")
    p.add_argument("--seeds-per-cell", type=positive_int, default=1)
    p.add_argument("--sample-steps", type=positive_int, default=20)
    p.add_argument("--out-dir", default="bench/results", help="patches, bench.json and bench.md go here; "
                                                             "a rerun with the same settings resumes")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine import TrainConfig
    from ..methods import method_names
    from ..toy.benchmark import markdown, run_benchmark
    from ..toy.vocabulary import ToyVocabulary
    from ..toy.world import concept

    vocabulary = ToyVocabulary()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {unknown[0] if unknown else 'none given'}; "
                        f"use {', '.join(method_names())}")
    if not targets:
        raise UserError("--targets: give at least one concept")
    alternatives = {}
    try:
        for name in targets:
            concept(name)
        if args.alternatives.strip() == "auto":
            alternatives = {t: vocabulary.default_alternative(t) for t in targets}
        else:
            for pair in filter(None, (a.strip() for a in args.alternatives.split(","))):
                target, _, alternative = pair.partition(":")
                alternatives[concept(target.strip()).name] = concept(alternative.strip()).name
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    model = load_model(None)  # the benchmark's grid and oracle are the toy world's
    config = TrainConfig(concept="", steps=args.steps, seed=args.seed)
    results = run_benchmark(model, model.vocabulary.oracle(), methods, targets, config, Path(args.out_dir),
                            alternatives, preserve=not args.no_preserve, seeds_per_cell=args.seeds_per_cell,
                            sample_steps=args.sample_steps, progress=lambda what: print(f"bench: {what}", flush=True))
    print(markdown(results))
    print(f"wrote {Path(args.out_dir) / 'bench.json'} and {Path(args.out_dir) / 'bench.md'}")
    return 0
