"""The `erasure` command line: one module per command, each with `add_parser(subparsers)` and a `run(args)`.
User errors exit with status 2 and one line on stderr."""
from __future__ import annotations

import sys

from . import attack, bench, demo, evaluate, generate, inspect_patch, purify, toy, train, ui
from .common import Parser, UserError

COMMANDS = (generate, purify, inspect_patch, evaluate, train, demo, bench, attack, toy, ui)


def build_parser() -> Parser:
    parser = Parser(prog="erasure", description="Concept erasure for Stable Diffusion-style models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
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
