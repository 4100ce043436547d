"""One training request: what a user asks for, in the words of any front end (CLI flags, ComfyUI node inputs, the
WebUI tab's fields), turned into a TrainConfig in one place, with every check and default.

- The method comes from the registry; a method that takes no alternative drops one and says so in `notes`, a
  method that needs one asks for it.
- Preservation: "auto" keeps the model vocabulary's default (every other concept of the toy world) or, on a model
  without a vocabulary, the AUTO_PRESERVE words of the shipped word list nearest the concept
  (erasure_core.candidates); "none" or "" keeps nothing, anything else is a list split at commas and new lines.
- On a model with a vocabulary, concept names become its training prompts ("circle" -> "a circle"), and a name
  it does not know is refused with the known ones listed.
- Several concepts, separated by commas or new lines, are erased by one patch; none of them may also be
  preserved, and "auto" preservation leaves them out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import memory_estimate
from .candidates import nearest_concepts
from .engine import TrainConfig
from .layers import SELECTION_MODES, select_layers
from .methods import DEFAULT_METHOD, TrainResult, get_method
from .vocabulary import vocabulary_of

PRESERVE_AUTO = "auto"
PRESERVE_NONE = "none"
AUTO_PRESERVE = 8  # neighbours kept by "auto" on a model without a vocabulary: each costs one anchor pass per x_t


class RequestError(ValueError):
    """A request that cannot be trained as given; the message says what to change."""


@dataclass
class TrainRequest:
    concept: str                   # one, or several separated by commas or new lines
    method: str = DEFAULT_METHOD
    alternative: str = ""
    preserve: str = PRESERVE_AUTO  # "auto", "none", or names separated by commas or new lines
    steps: int = 200
    lr: float | None = None         # weight deltas; None or 0: the method's default
    memory_lr: float | None = None  # memory tokens; None or 0: the method's default
    tokens: int = 8
    layers: str = "all"             # mid, midout, all, or attn2 layer names separated by commas
    seed: int = 0
    batch: int | None = None        # None: CHECKPOINT_BATCH for a real checkpoint, the engine's 8 for the toy
    cache_seeds: int | None = None
    cache_steps: int | None = None
    gradient_checkpointing: bool | None = None  # None: on for a real checkpoint, off for the toy
    cache_on_cpu: bool = False      # the trajectory cache in RAM instead of GPU memory
    on_top_of: list = field(default_factory=list)  # earlier ErasurePatches this erasure is trained on top of
    sae: str = ""  # SAeUron: a shared SAE file, or the folder the front end keeps patches in (reused from there)


# The default batch for real checkpoints (the engine's 8 is the toy model's): one concept with `memory` at SD1.5
# size, 512 px, rose 3.7 GB above the loaded model at batch 1 and 14.2 GB at batch 4 (CPU, fp32;
# bench/train_memory.py), so 8 would need about 28 GB.
CHECKPOINT_BATCH = 1
LATENT_SCALE = 8  # pixels per latent cell of the SD VAEs, for the advice's resolution


@dataclass
class TrainPlan:
    """A validated request: the config to train, the names to record in the patch, and notes for the user."""

    config: TrainConfig
    concepts: list[str]
    alternative: str
    preserve: list[str]
    notes: list[str] = field(default_factory=list)
    on_top_of: list = field(default_factory=list)  # earlier patches, attached while training (train_patch)

    @property
    def concept(self) -> str:
        """The concepts as the user would say them: "circle", or "circle, star"."""
        return ", ".join(self.concepts)

    @property
    def earlier_concepts(self) -> list[str]:
        """What the earlier patches erase, which this run keeps erased."""
        return [c for p in self.on_top_of for c in p.concepts]

    @property
    def earlier_digest(self) -> str:
        """The earlier patches' content, for the checkpoint key: on top of another patch is another run."""
        from .patch import content_digest

        return "".join(content_digest(p) for p in self.on_top_of)

    def label(self, result: TrainResult) -> TrainResult:
        """Record the user's names (not the prompts trained on) in the patch, and in its key if there is one."""
        result.patch.concepts = list(dict.fromkeys([*self.earlier_concepts, *self.concepts]))
        result.patch.alternative = self.alternative
        result.patch.preserve = list(self.preserve)
        result.patch.title = result.patch.title or f"erase {', '.join(result.patch.concepts)}"
        if result.key is not None:
            result.key.concepts, result.key.method = list(self.concepts), self.config.method
        return result


def split_list(text: str) -> list[str]:
    """Names separated by commas or new lines, blanks dropped."""
    return [part.strip() for line in (text or "").splitlines() for part in line.split(",") if part.strip()]


def _whole(label: str, value, low: int) -> int:
    if value is None or isinstance(value, bool) or not float(value).is_integer() or value < low:
        raise RequestError(f"{label} must be a whole number of at least {low}, got {value}")
    return int(value)


def _rate(label: str, value) -> float | None:
    if value is None or value == 0:
        return None
    if not math.isfinite(value) or not 0 < value < 1:
        raise RequestError(f"{label} must be between 0 and 1 (0: the method's default), got {value}")
    return float(value)


def prepare(request: TrainRequest, model) -> TrainPlan:
    """Check a request against the registry and `model` (its layer names and vocabulary) and build its config."""
    concepts = list(dict.fromkeys(split_list(request.concept or "")))  # in order, each once
    if not concepts:
        raise RequestError("name the concept to erase (as you would prompt it: 'Van Gogh', 'a cat')")
    spec = get_method(request.method)
    notes = []
    alternative = (request.alternative or "").strip()
    if alternative and not spec.takes_alternative:
        notes.append(f"{spec.name} takes no alternative; {alternative!r} is ignored")
        alternative = ""
    if spec.needs_alternative and not alternative:
        raise RequestError(f"{spec.name} needs an alternative: what the erased concept should become")
    vocabulary = vocabulary_of(model)

    def prompt(name: str) -> str:
        if vocabulary is None:
            return name
        try:
            return vocabulary.prompt(name)
        except KeyError as exc:
            raise RequestError(exc.args[0]) from None

    concept_prompts = [prompt(c) for c in concepts]  # refuses a name the vocabulary lacks before anything else
    preserve_text = (request.preserve or "").strip()
    on_top_of = list(request.on_top_of or [])
    earlier = [c for p in on_top_of for c in p.concepts]
    erased = concepts + earlier  # the earlier ones stay erased
    if preserve_text.lower() == PRESERVE_AUTO:
        preserve = []
        if vocabulary is not None:
            for concept in concepts:
                preserve += [p for p in vocabulary.default_preserve(concept) if p not in erased + preserve]
        elif spec.takes_preserve:
            for concept in concepts:  # the budget shared out, none of the erased concepts' words
                preserve += nearest_concepts(model, concept, max(AUTO_PRESERVE // len(concepts), 2),
                                             exclude=[*erased, *preserve])
            notes.append(f"preserving the {len(preserve)} nearest concepts of the word list: {', '.join(preserve)}")
    elif preserve_text.lower() == PRESERVE_NONE:
        preserve = []
    else:
        preserve = split_list(preserve_text)
        both = [p for p in preserve if p in erased]
        if both:
            raise RequestError(f"{', '.join(map(repr, both))} cannot be both erased and preserved")
    if preserve and not spec.takes_preserve:
        notes.append(f"{spec.name} takes no preservation list; it is ignored")
        preserve = []
    layers_text = (request.layers or "all").strip()
    layers = layers_text if layers_text in SELECTION_MODES else split_list(layers_text)
    try:
        select_layers(model.layer_names(), layers)
    except ValueError as exc:
        raise RequestError(str(exc)) from None

    optional = {name: _whole(label, value, 1) for name, label, value in (
        ("batch", "batch size", request.batch), ("cache_seeds", "trajectory seeds", request.cache_seeds),
        ("cache_steps", "trajectory steps", request.cache_steps)) if value is not None}
    if vocabulary is None:  # a real checkpoint, not the toy world: sized for a consumer GPU or a CPU box
        optional.setdefault("batch", CHECKPOINT_BATCH)
        optional["gradient_checkpointing"] = request.gradient_checkpointing is not False
    elif request.gradient_checkpointing is not None:
        optional["gradient_checkpointing"] = request.gradient_checkpointing
    if request.cache_on_cpu:
        optional["cache_on_cpu"] = True
    config = TrainConfig(concept=concept_prompts[0], more_concepts=concept_prompts[1:], method=spec.name,
                         alternative=prompt(alternative) if alternative else "",
                         preserve=[prompt(p) for p in preserve], steps=_whole("steps", request.steps, 1),
                         lr=_rate("learning rate", request.lr), memory_lr=_rate("memory learning rate",
                                                                               request.memory_lr),
                         tokens=_whole("memory tokens", request.tokens, 1), layers=layers,
                         seed=_whole("seed", request.seed, 0), sae=request.sae, **optional)
    if spec.kind == "trained":
        _refuse_what_cannot_fit(model, config)
    if len(concepts) > 1:
        notes.append(f"one patch erases {len(concepts)} concepts: {', '.join(concepts)}")
    if on_top_of:
        _check_earlier(model, on_top_of, concepts, earlier)
        notes.append(f"trained on top of the earlier erasure of {', '.join(earlier) or 'unnamed concepts'}, which "
                     "stays attached and preserved as erased; the patch written holds both")
    return TrainPlan(config, concepts, alternative, preserve, notes, on_top_of)


def _check_earlier(model, patches: list, concepts: list[str], earlier: list[str]) -> None:
    """Earlier patches must fit the model, become one file with the new one, and not already erase what this run
    names."""
    from .patch import PatchError, why_not_combinable

    reason = why_not_combinable(patches)
    if reason:
        raise RequestError(f"cannot train on top of the earlier patch: {reason}")
    try:
        model.attach([(p, 1.0) for p in patches]).detach()
    except PatchError as exc:
        raise RequestError(f"the earlier patch does not fit this model: {exc}") from None
    again = [c for c in concepts if c in earlier]
    if again:
        raise RequestError(f"{', '.join(map(repr, again))} is already erased by the earlier patch")


def _refuse_what_cannot_fit(model, config: TrainConfig) -> None:
    """A run estimated to need more memory than is free is refused before it starts (erasure_core.memory_estimate),
    with what to lower; nothing else has happened yet."""
    network = getattr(model, "network", None)
    if network is None:
        return
    latent = model.sample_shape[-1]
    result = memory_estimate.check(network(), config.batch, latent, config.gradient_checkpointing)
    if not result.fits:
        raise RequestError(memory_estimate.advice(result, config.batch, latent * LATENT_SCALE,
                                                  config.gradient_checkpointing))
