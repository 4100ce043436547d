"""erasure attack: try to bring an erased concept back with three attacks from the literature, and print the
patch's robustness card (erasure_core.attacks)."""
from __future__ import annotations

import json
from pathlib import Path

from .common import UserError, add_model_option, load_model, load_patches, progress_bar, vocabulary_or_error


def add_parser(sub) -> None:
    from ..attacks import ATTACKS

    p = sub.add_parser("attack", help="attack a patch: concept inversion, Ring-A-Bell, UnlearnDiffAtk (toy model)")
    p.add_argument("--patch", required=True, help="the erasure patch to attack")
    p.add_argument("--target", help="the erased concept (default: the patch's)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {', '.join(ATTACKS)}")
    p.add_argument("--quick", action="store_true",
                   help="tiny budgets and 4 sampling steps (a smoke test; the rates are not comparable)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--write", action="store_true",
                   help="store the results in the patch's erasure.metrics, so a shared patch carries its card")
    add_model_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..attacks import ATTACKS, QUICK_BUDGET, AttackBudget, attack_report, robustness_card
    from ..toy.world import concept

    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise UserError(f"--attacks: unknown {unknown[0] if unknown else 'none given'}; use {', '.join(ATTACKS)}")
    (patch, _), = load_patches([args.patch], None)
    target = args.target or (patch.concepts[0] if patch.concepts else "")
    if not target:
        raise UserError("--target: the patch names no concept; give the erased one")
    try:
        target = concept(target).name
    except KeyError as exc:
        raise UserError(f"--target: {exc.args[0]}") from None
    if args.json and Path(args.json).is_dir():
        raise UserError(f"--json: {args.json} is a folder")
    model = load_model(args.model, args.prediction_type)
    oracle = vocabulary_or_error(model, "attack").oracle()
    from .common import check_patches

    check_patches(model, [(patch, 1.0)])
    report = attack_report(model, oracle, [(patch, 1.0)], target, names, quick=args.quick,
                           budget=QUICK_BUDGET if args.quick else AttackBudget(),
                           progress=lambda name: progress_bar(name))
    print(robustness_card(target, report, title=Path(args.patch).name))
    result = {"patch": args.patch, "target": target, "quick": args.quick, "attacks": report}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.write:
        from ..patch import save_patch

        patch.metrics["attacks"] = {"target": target, "quick": args.quick,
                                    **{n: {k: e[k] for k in ("asr", "n", "interval", "base_asr", "control_rate",
                                                             "settings")} for n, e in report.items()}}
        save_patch(patch, args.patch)
        print(f"stored the card in {args.patch} (erasure.metrics)")
    return 0
