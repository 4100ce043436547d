"""Contexts padded by repetition: ComfyUI and Forge pad the conds of one batch to a common length by repeating
each. Attention over the plain text is unchanged by that, but appended memory is not, so the injection counts the
copies (`padding_repeats`) and appends the memory as many times."""
from __future__ import annotations

import math

import torch

COMFY_CHUNK = 77  # CLIP contexts come in chunks of 77 tokens; ComfyUI pads by repeating whole conds


def padding_repeats(context: torch.Tensor, chunk: int = COMFY_CHUNK) -> int:
    """How many times ComfyUI repeated the conds of this batch to pad them to one length (the fewest over rows).

    ComfyUI pads each cond to the least common multiple of the batch's lengths by repeating it (conds.py);
    plain attention is unchanged by that, but a memory appended once would lose weight against r copies of the
    text. A row's repeat count r is found as the number of identical copies of a period that is a multiple of
    `chunk`. The memory is appended min(r) times: exact for every row when all rows were padded alike (no
    padding included), and for the least-padded rows otherwise. Rows padded more than that see the memory
    with (min r)/r of its share; one length for all rows makes exactness for each impossible there."""
    length = context.shape[1]
    if length < 2 * chunk or length % chunk:
        return 1
    chunks = length // chunk
    best = None
    for row in context:
        repeats = 1
        for r in range(chunks, 1, -1):  # most copies first: the shortest period
            if chunks % r:
                continue
            period = length // r
            if torch.equal(row.view(r, period, -1), row[:period].unsqueeze(0).expand(r, -1, -1)):
                repeats = r
                break
        best = repeats if best is None else min(best, repeats)
        if best == 1:
            break
    return best or 1


def pad_by_repetition(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate contexts of different lengths the way ComfyUI does: repeat each to the lcm of the lengths."""
    length = 1
    for c in contexts:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in contexts])
