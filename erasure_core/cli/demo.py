"""erasure demo: the main job on the embedded toy model (erasure_core.toy.demo)."""
from __future__ import annotations

from pathlib import Path

from .common import UserError, load_model, positive_int, progress_bar


def add_parser(sub) -> None:
    from ..methods import DEFAULT_METHOD, method_names
    from ..toy.demo import BUDGETS

    p = sub.add_parser("demo", help="erase a concept from the toy model: before/after grid and metrics")
    p.add_argument("--concept", default="circle")
    p.add_argument("--method", choices=method_names(), default=DEFAULT_METHOD)
    p.add_argument("--alternative", default="auto",
                   help='what the concept becomes; "auto" (default): a neighbour on its axis (circle: square), "none"')
    p.add_argument("--budget", choices=tuple(BUDGETS), default="quick",
                   help="; ".join(f"{name}: {b.describe()}" for name, b in BUDGETS.items()) + " (default: quick)")
    p.add_argument("--steps", type=positive_int, help="training steps (default: the budget's)")
    p.add_argument("--sample-steps", type=positive_int, help="DDIM steps when generating (default: the budget's)")
    p.add_argument("--out-dir", default="demo")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..request import RequestError
    from ..toy.demo import BUDGETS, demo_alternative, run_demo

    model = load_model(None)  # the demo's prompts and metrics are the toy world's
    try:
        alternative = demo_alternative(model, args.concept, args.method, args.alternative)
        budget = BUDGETS[args.budget]
        request = budget.request(args.concept, args.method, alternative, args.steps)
        report = run_demo(model, Path(args.out_dir), request, sample_steps=args.sample_steps or budget.sample_steps,
                          other_cells_every=budget.other_cells_every, progress=progress_bar(f"train {args.method}"))
    except (RequestError, KeyError, ValueError) as exc:
        raise UserError(exc.args[0] if exc.args else str(exc)) from None
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for k in ("ua", "ua_syn", "ira", "cra", "alt"):
        print(f"{k:>7}: {fmt(report[k])}  (base {fmt(report['base'][k])})")
    return 0
