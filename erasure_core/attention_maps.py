"""The cross-attention probabilities a denoiser computes while it predicts: what Forget-Me-Not minimises.

Every host's attn2 runs `q = to_q(x)` and then `k = to_k(context)` on its own modules (diffusers' attention
processors, the LDM CrossAttention of A1111, Forge and ComfyUI) before whichever attention kernel it uses, and the
fused kernels (SDPA, xformers) never expose the probabilities. So forward hooks on `to_q` and `to_k` take their
outputs, with every patch attached before the hooks were registered (deltas, memory tokens appended to the keys),
and recompute softmax(q·kᵀ/√d) per head, keeping only the chosen context positions.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

__all__ = ["cross_attention_maps", "word_positions"]


@contextmanager
def cross_attention_maps(layers: Mapping[str, torch.nn.Module],
                         positions: Sequence[int]) -> Iterator[list[torch.Tensor]]:
    """While open, every call of an attn2 module in `layers` (canonical name -> module with `heads`, `to_q` and
    `to_k`, as Denoiser.cross_attention_modules gives) appends its attention probabilities at the context
    `positions`: a tensor (batch, heads, queries, len(positions)) that gradients flow through.

    Open it inside the block that attaches the patches: torch runs forward hooks in the order they were
    registered, and these must see the patched projections' outputs."""
    if not positions:
        raise ValueError("no context positions to read the attention at")
    maps: list[torch.Tensor] = []
    handles = []
    index = torch.as_tensor(list(positions), dtype=torch.long)

    def hooks(attn2: torch.nn.Module, name: str):
        heads = getattr(attn2, "heads", None)
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"the cross-attention layer {name} does not say how many heads it has")
        query: list[torch.Tensor] = []

        def took_q(module, args, output):
            query[:] = [output]

        def took_k(module, args, output):
            if not query:  # a host that projects keys without queries first: nothing to pair them with
                return
            q = query.pop()
            batch, _, inner = q.shape
            d = inner // heads
            q = q.view(batch, -1, heads, d).transpose(1, 2)
            k = output.view(output.shape[0], -1, heads, d).transpose(1, 2).expand(batch, -1, -1, -1)
            if index.max() >= k.shape[2]:
                raise ValueError(f"position {int(index.max())} is past the {k.shape[2]} context positions of {name}")
            probabilities = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(dim=-1)
            maps.append(probabilities[..., index.to(probabilities.device)])

        return took_q, took_k

    try:
        for name, attn2 in layers.items():
            took_q, took_k = hooks(attn2, name)
            handles.append(attn2.to_q.register_forward_hook(took_q))
            handles.append(attn2.to_k.register_forward_hook(took_k))
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def word_positions(prompt_length, prompt: str, skip: frozenset[str] = frozenset()) -> list[int]:
    """The context positions of the prompt's words, BOS being position 0, leaving out the words in `skip` (when
    that would leave none, every word counts). `prompt_length(text)` is the denoiser's: BOS to EOS, so a prefix
    of i words ends its tokens at prompt_length(prefix) - 2. The tokenizer never merges across spaces."""
    words = prompt.split()
    spans = []
    for i, word in enumerate(words):
        start = prompt_length(" ".join(words[:i])) - 1
        end = prompt_length(" ".join(words[:i + 1])) - 1
        spans.append((word.strip(",.;:!?").lower(), range(start, end)))
    kept = [span for word, span in spans if word not in skip] or [span for _, span in spans]
    return [p for span in kept for p in span]
