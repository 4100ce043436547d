"""erasure ui: the Concept Erasure training tab as a local web app (needs the `ui` extra: gradio)."""
from __future__ import annotations

from pathlib import Path

from .common import UserError, add_model_option, load_model


def add_parser(sub) -> None:
    p = sub.add_parser("ui", help="the Concept Erasure training tab as a local web app")
    add_model_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--patch-dir", default="erasures", help="where trained patches are written")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib.util

    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:
        raise UserError("erasure ui needs gradio: pip install 'concept-erasure[ui]'")
    from ..ui import launch

    launch(load_model(args.model, args.prediction_type), Path(args.patch_dir), host=args.host, port=args.port)
    return 0
