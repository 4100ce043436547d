"""erasure toy-train and toy-oracle: train the embedded toy model and its oracle."""
from __future__ import annotations

from pathlib import Path

from .common import finite_float, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("toy-train", help="train the toy model (resumes from the run folder's checkpoint)")
    p.add_argument("--run-dir", default="runs/toy")
    p.add_argument("--steps", type=positive_int, default=9000)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--lr", type=finite_float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-minutes", type=finite_float, default=5.0)
    p.add_argument("--ship", action="store_true", help="copy the result into the package assets")
    p.set_defaults(func=run_train)

    p = sub.add_parser("toy-oracle", help="train the oracle classifier on ground-truth renders")
    p.add_argument("--steps", type=positive_int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_oracle)


def run_train(args) -> int:
    from ..toy.train import ship, train

    export = train(Path(args.run_dir), steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                   checkpoint_minutes=args.checkpoint_minutes)
    if args.ship:
        ship(export)
        print(f"shipped {export} into the package assets")
    print(f"exported EMA weights to {export}")
    return 0


def run_oracle(args) -> int:
    from ..toy.classifier import train_oracle

    acc = train_oracle(steps=args.steps, seed=args.seed)
    print("held-out accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    return 0
