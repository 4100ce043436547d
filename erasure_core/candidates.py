"""Candidate concepts from the shipped English word list: what Adversarial Preservation searches over, and what
`--preserve auto` keeps on a model that has no vocabulary of its own.

The words nearest the target in the space the UNet reads (the text encoder's whole context, minus the empty
prompt's, so that the positions every prompt shares do not count) are grouped by k-means, and each group gives
its word nearest the group's centre: a spread of neighbours rather than forty spellings of one. Words of the target
prompt itself, and near-synonyms (cosine similarity at or above SYNONYM_CEILING to the prompt or to any of its
words), are never candidates: preserving them would fight the erasure. The list
(erasure_core/assets/words/english.txt) is built by bench/make_word_list.py.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch

WORD_LIST = Path(__file__).parent / "assets" / "words" / "english.txt"
POOL = 512              # the words nearest the target that are grouped
SYNONYM_CEILING = 0.95  # at or above this similarity a word is taken to name the target itself
ENCODE_BATCH = 256
KMEANS_ROUNDS = 25


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    return tuple(w.strip() for w in WORD_LIST.read_text(encoding="utf-8").splitlines() if w.strip())


PROBE = ["", "a photo", "art"]  # what identifies a text encoder: its contexts for these
_WORD_FEATURES: dict[tuple, torch.Tensor] = {}  # (encoder's probe digest, words) -> features; the last few only


@torch.no_grad()
def _features(denoiser, prompts: list[str], progress=None) -> torch.Tensor:
    """Unit-length (context − empty context), flattened: one row per prompt. `progress(done, total)`."""
    empty = denoiser.encode([""]).context.float().flatten(1)
    rows = []
    for i in range(0, len(prompts), ENCODE_BATCH):
        rows.append(denoiser.encode(prompts[i:i + ENCODE_BATCH]).context.float().flatten(1) - empty)
        if progress:
            progress(min(i + ENCODE_BATCH, len(prompts)), len(prompts))
    return torch.nn.functional.normalize(torch.cat(rows), dim=1).cpu()


def _word_features(denoiser, words: list[str], progress=None) -> torch.Tensor:
    """_features of the word list, computed once per text encoder and process: a host encodes prompts one by one
    (ComfyUI: about 0.1 s each on a CPU), and `auto` and a candidate search both ask. A changed encoder (a LoRA
    on CLIP) gives other contexts for the probe prompts, hence another key."""
    probe = denoiser.encode(PROBE).context.float().cpu().contiguous()
    key = (hashlib.sha256(probe.numpy().tobytes()).hexdigest(), tuple(words))
    if key not in _WORD_FEATURES:
        while len(_WORD_FEATURES) >= 2:
            _WORD_FEATURES.pop(next(iter(_WORD_FEATURES)))
        _WORD_FEATURES[key] = _features(denoiser, words, progress)
    return _WORD_FEATURES[key]


def _kmeans(points: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Cluster labels of unit rows under cosine k-means, started k-means++-style from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    centres = [points[0]]  # the nearest word first: it is always a centre's seed
    for _ in range(1, k):
        distance = 1 - (points @ torch.stack(centres).T).max(dim=1).values
        centres.append(points[torch.multinomial(distance.clamp(min=1e-12), 1, generator=generator)[0]])
    centres = torch.stack(centres)
    for _ in range(KMEANS_ROUNDS):
        labels = (points @ centres.T).argmax(dim=1)
        for c in range(k):
            members = points[labels == c]
            if len(members):
                centres[c] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return (points @ centres.T).argmax(dim=1)


def nearest_concepts(denoiser, target: str, count: int, exclude: list[str] | tuple[str, ...] = (),
                     words: tuple[str, ...] | None = None, progress=None) -> list[str]:
    """Up to `count` words of the list near `target`, one per k-means group of the POOL nearest, nearest first.
    `exclude`: words (or phrases, whose every word counts) that may not be picked. `progress(done, total)` follows
    the encoding of the list (the slow part, once per text encoder)."""
    banned = {w.lower() for phrase in (target, *exclude) for w in phrase.replace(",", " ").split()}
    words = list(words or word_list())
    allowed = [i for i, w in enumerate(words) if w.lower() not in banned and
               not any(part in banned for part in w.lower().split())]
    if not allowed or count < 1:
        return []
    pool = [words[i] for i in allowed]
    features = _word_features(denoiser, words, progress)[allowed]  # the whole list's, so every caller shares them
    # the prompt, and each of its words alone: "lines" is far from "a shape with stripes" but next to "stripes"
    own_words = [w for w in target.replace(",", " ").split() if len(w) >= 3 and w.isalpha()]
    targets = _features(denoiser, [target, *own_words])
    similarity = features @ targets[0]
    synonym = (features @ targets.T).max(dim=1).values >= SYNONYM_CEILING
    order = [i for i in similarity.argsort(descending=True).tolist() if not synonym[i]][:POOL]
    if not order:
        return []
    points = features[order]
    labels = _kmeans(points, min(count, len(order)))
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        centre = torch.nn.functional.normalize(points[members].mean(0), dim=0)
        chosen.append(order[int(members[(points[members] @ centre).argmax()])])
    chosen.sort(key=lambda i: -float(similarity[i]))
    return [pool[i] for i in chosen]
