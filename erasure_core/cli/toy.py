"""erasure toy-train, toy-words and toy-oracle: train the embedded toy model, its everyday words and its oracle."""
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

    p = sub.add_parser("toy-words", help="add everyday words (articles, picture words, plurals) and <|unk|> to the "
                       "toy tokenizer and learn their embeddings only; done once, the result is shipped")
    p.add_argument("--assets", default=None, help="the model folder to extend in place (default: the package's)")
    p.add_argument("--steps", type=positive_int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_words)

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


def run_words(args) -> int:
    from ..toy.model import ASSETS
    from ..toy.words import extend_toy_model

    done = extend_toy_model(Path(args.assets) if args.assets else ASSETS, steps=args.steps, seed=args.seed)
    print(f"added {done['added']} tokens (vocabulary {done['vocabulary']}); loss per 50 steps {done['losses']}")
    return 0


def run_oracle(args) -> int:
    from ..toy.classifier import train_oracle

    acc = train_oracle(steps=args.steps, seed=args.seed)
    print("held-out accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    return 0
