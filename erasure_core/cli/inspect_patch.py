"""erasure inspect: validate a patch file and print its metadata."""
from __future__ import annotations

import json

from .common import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="validate a patch file and print its metadata")
    p.add_argument("patch")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..patch import PatchError, load_patch

    try:
        patch = load_patch(args.patch)
    except PatchError as exc:
        raise UserError(str(exc)) from None
    meta = patch.metadata()
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    print(f"{args.patch}: valid erasure patch, format {meta['erasure.format_version']}")
    width = max(len(k) for k in meta)
    for key, value in meta.items():
        print(f"  {key:<{width}}  {value}")
    tensors = patch.tensors()
    shown = [f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in list(tensors.items())[:8]]
    more = f", and {len(tensors) - 8} more ({sum(v.numel() for v in tensors.values()):,} values in all)" \
        if len(tensors) > 8 else ""
    print(f"  {'tensors':<{width}}  " + ", ".join(shown) + more)
    print(f"  {'strength':<{width}}  {patch.strength_note()}")
    card = patch.metrics.get("attacks")
    if isinstance(card, dict) and card.get("target"):
        from ..attacks import robustness_card

        entries = {k: v for k, v in card.items() if isinstance(v, dict) and "asr" in v}
        print(robustness_card(card["target"], entries, title="stored in this patch" +
                              (" (quick budget)" if card.get("quick") else "")))
    return 0
