"""What the three attacks share: the erased concept as an attacker sees it (its words, the prompts and images of
its cells), token-level prompt building, generation from a conditioning, and judging by the oracle.

An attack only needs a denoiser with text access (`token_ids`, `token_embeddings`, `encode_embeddings`, `generate_from`:
the diffusers backend, so the toy model and local pipeline folders) and, for its score, the model's oracle."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..denoiser import Conditioning

Progress = Callable[[int, int], None]


@dataclass
class Found:
    """What an attack hands to generation: one conditioning per generation, what a person would type (or a
    description where nothing can be typed), and the seeds."""

    cond: object
    prompts: list[str]
    seeds: list[int]
    detail: dict


@dataclass
class AttackSetup:
    """The erased concept of the toy world, from the attacker's side.

    `cells` are the other axis's concepts: each attack prompts and renders the target once per cell ("a circle
    with stripes", "a circle with dots", ...), so that what it finds is not one picture's accident."""

    target: str
    axis: str                  # "object" or "style"
    index: int                 # the target's class on its axis (what the oracle must not see)
    word: str                  # the canonical word ("circle", "stripes")
    neutral_word: str          # what the concept-free twin prompt says instead ("shape", "pattern")
    forbidden: frozenset[str]  # words that name the target and nothing else: no prompt attack may use them
    cells: list[int]           # other-axis indices
    pool_size: int | None = None  # prompt attacks draw only token ids below this (None: the whole vocabulary)

    @classmethod
    def for_toy_target(cls, name: str) -> "AttackSetup":
        from ..toy.words import ORIGINAL_VOCAB_SIZE, PLURALS
        from ..toy.world import OBJECT_NAMES, OBJECTS, STYLE_NAMES, STYLES, concept

        c = concept(name)
        words = lambda k: {w for phrase in k.nouns + k.adjectives for w in phrase.split()} | \
            ({PLURALS[k.name]} if k.name in PLURALS else set())  # noqa: E731
        others = set().union(*(words(k) for k in OBJECTS + STYLES if k.name != c.name))
        own_names = OBJECT_NAMES if c.axis == "object" else STYLE_NAMES
        other_names = STYLE_NAMES if c.axis == "object" else OBJECT_NAMES
        # The pool stays the vocabulary the toy model was trained with, which every benchmark v2 row was
        # attacked with; the everyday words added later (toy/words.py) are fillers and plurals.
        return cls(c.name, c.axis, own_names.index(c.name), c.nouns[0],
                   "shape" if c.axis == "object" else "pattern", frozenset(words(c) - others),
                   list(range(len(other_names))), pool_size=ORIGINAL_VOCAB_SIZE)

    def cell_prompt(self, cell: int, word: str | None = None) -> str:
        """The cell's prompt with `word` in the target's place (default: the target's own word)."""
        from ..toy.world import OBJECTS, STYLES

        word = self.word if word is None else word
        if self.axis == "object":
            return f"a {word} with {STYLES[cell].nouns[0]}"
        return f"a {OBJECTS[cell].nouns[0]} with {word}"

    def cell_parts(self, cell: int) -> tuple[str, str]:
        """The cell's prompt split around the target's word: (before, after)."""
        before, _, after = self.cell_prompt(cell, "\0").partition("\0")
        return before.strip(), after.strip()

    def renders(self, per_cell: int, seed: int) -> tuple[torch.Tensor, list[int]]:
        """Ground-truth pictures of the target, `per_cell` per cell: images (N,3,H,W) in [0,1] and their cells."""
        from ..toy.world import render_batch

        images, cells = [], []
        for cell in self.cells:
            fixed = {"obj": self.index, "style": cell} if self.axis == "object" else {"obj": cell, "style": self.index}
            seeds = [seed + 1000 * cell + k for k in range(per_cell)]
            images.append(torch.from_numpy(render_batch(seeds, **fixed)[0]))
            cells += [cell] * per_cell
        return torch.cat(images), cells

    def uses_forbidden(self, text: str) -> bool:
        return any(w in self.forbidden for w in re.findall(r"[a-z-]+", text.lower()))


def word_token_ids(denoiser, setup: AttackSetup) -> torch.Tensor:
    """Ids of whole-word tokens that a prompt attack may use: no special tokens, none of the target's own words.
    Whole words only, so that the found prompt, typed as text, tokenizes back to the same ids."""
    tok = denoiser.tokenizer
    special = set(tok.all_special_ids)
    allowed = []
    for token, i in tok.get_vocab().items():
        if i in special or not token.endswith("</w>") or (setup.pool_size is not None and i >= setup.pool_size):
            continue
        word = token[:-len("</w>")]
        if re.fullmatch(r"[a-z][a-z-]*", word) and word not in setup.forbidden:
            allowed.append(i)
    return torch.tensor(sorted(allowed))


def compose_ids(denoiser, before: str, slots: int, after: str, slot_id: int) -> tuple[torch.Tensor, list[int]]:
    """Token ids (T,) of "before <slots> after" with BOS, EOS and padding as `encode` builds them, and the slot
    positions. The slots hold `slot_id` until an attack puts its embeddings there."""
    tok = denoiser.tokenizer
    words = lambda text: tok(text, add_special_tokens=False).input_ids if text else []  # noqa: E731
    head, tail = [tok.bos_token_id, *words(before)], [*words(after), tok.eos_token_id]
    ids = head + [slot_id] * slots + tail
    length = tok.model_max_length
    if len(ids) > length:
        raise ValueError(f"the prompt needs {len(ids)} tokens; the model takes {length}")
    ids += [tok.pad_token_id] * (length - len(ids))
    return torch.tensor(ids), list(range(len(head), len(head) + slots))


def with_slots(table: torch.Tensor, ids: torch.Tensor, positions: list[int], slot_embeds: torch.Tensor
               ) -> torch.Tensor:
    """Input embeddings (B,T,d) of `ids` (B,T) with `slot_embeds` (k,d) written into the slot positions."""
    embeds = table[ids].clone()
    embeds[:, positions] = slot_embeds.to(embeds.dtype)
    return embeds


def words_of(denoiser, ids: torch.Tensor) -> str:
    """Whole-word token ids back to text."""
    return denoiser.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()


def denoising_loss(denoiser, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator) -> torch.Tensor:
    """The diffusion training loss ‖ε − ε_θ(x_t, t, c)‖² at random timesteps: what inversion and UnlearnDiffAtk
    lower through the (patched) model."""
    sched = denoiser.scheduler()
    n = len(x0)
    t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    a = sched.alphas_cumprod[t].to(x0.device, x0.dtype).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return (denoiser.predict_noise(x_t, t.to(x0.device), cond) - noise).square().mean()


def generate_from(denoiser, cond: Conditioning, seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
    """Images (N,3,H,W) in [0,1] for one conditioning per seed, sampled as `generate` samples prompts."""
    return denoiser.generate_from(lambda i, j: Conditioning(cond.context[i:j].detach(),
                                                            {k: v[i:j].detach() for k, v in cond.extra.items()}),
                                  seeds, steps, guidance)
