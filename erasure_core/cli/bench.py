"""erasure bench: several methods on several targets of the toy world, side by side with the same seeds, under
protocol v2 (docs/benchmark.md)."""
from __future__ import annotations

from pathlib import Path

from .common import UserError, load_model, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark methods side by side on the toy model (JSON + Markdown table)")
    p.add_argument("--methods", default="all", help='comma-separated methods; "all" (default): every registered one')
    p.add_argument("--targets", default="circle,stripes,star,dots", help="comma-separated concepts to erase")
    p.add_argument("--alternatives", default="auto",
                   help='target:alternative pairs the methods that take one map the target to; "auto" (default): '
                        'circle:square, star:cross, stripes:checker, dots:grid, else the next concept of the axis; '
                        '"" for none')
    p.add_argument("--steps", type=positive_int, default=200, help="training steps of every trained method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preserve", choices=("both", "named", "none"), default="both",
                   help="named: preserve only each target's fixed named neighbours; none: preserve nothing; "
                        "both (default): a row of each")
    p.add_argument("--attacks", nargs="?", const="inversion,ringabell,unlearndiff", default="",
                   help="also attack every named-preservation patch (default when given: all three)")
    p.add_argument("--no-stack", action="store_true", help="skip stacking each method's first two patches")
    p.add_argument("--multi", action="store_true",
                   help="erase every --targets concept at once, in sequence (--on-top-of) and by stacking single "
                        "patches, per method; writes <out-dir>/multi/multi.json and multi.md")
    p.add_argument("--target-seeds", type=positive_int, default=4, help="seeds per target cell (protocol: ≥ 4)")
    p.add_argument("--other-seeds", type=positive_int, default=2, help="seeds per other cell (protocol: ≥ 2)")
    p.add_argument("--phrasing-seeds", type=positive_int, default=2, help="seeds per target cell and phrasing")
    p.add_argument("--sample-steps", type=positive_int, default=10)
    p.add_argument("--out-dir", default="bench/results/v2", help="patches, bench.json and bench.md go here; "
                                                             "a rerun with the same settings resumes")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine import TrainConfig
    from ..methods import method_names
    from ..attacks import ATTACKS
    from ..toy.benchmark import PRESERVE_MODES, markdown, run_benchmark
    from ..toy.evaluation import ProtocolCounts
    from ..toy.vocabulary import ToyVocabulary
    from ..toy.world import concept

    vocabulary = ToyVocabulary()
    methods = list(method_names()) if args.methods.strip() == "all" else \
        [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {unknown[0] if unknown else 'none given'}; "
                        f"use {', '.join(method_names())}")
    if not targets:
        raise UserError("--targets: give at least one concept")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if any(a not in ATTACKS for a in attacks):
        raise UserError(f"--attacks: unknown {next(a for a in attacks if a not in ATTACKS)}; "
                        f"use {', '.join(ATTACKS)}")
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
    counts = ProtocolCounts(args.target_seeds, args.other_seeds, args.phrasing_seeds)
    if args.multi:
        from ..toy.multi_benchmark import markdown as multi_markdown, run_multi_benchmark

        if len(targets) < 2:
            raise UserError("--multi erases several --targets at once: give at least two")
        out = Path(args.out_dir) / "multi"
        results = run_multi_benchmark(model, model.vocabulary.oracle(), methods, targets, config, out, counts,
                                      args.sample_steps, attacks,
                                      progress=lambda what: print(f"bench: {what}", flush=True))
        print(multi_markdown(results))
        print(f"wrote {out / 'multi.json'} and {out / 'multi.md'}")
        return 0
    results = run_benchmark(model, model.vocabulary.oracle(), methods, targets, config, Path(args.out_dir),
                            alternatives, PRESERVE_MODES if args.preserve == "both" else (args.preserve,),
                            counts, args.sample_steps, attacks, stack=not args.no_stack,
                            progress=lambda what: print(f"bench: {what}", flush=True))
    print(markdown(results))
    print(f"wrote {Path(args.out_dir) / 'bench.json'} and {Path(args.out_dir) / 'bench.md'}")
    return 0
