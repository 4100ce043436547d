"""What a model may know about its own world: its concepts, how to prompt for one, what to preserve and what to
steer to by default, and an oracle that judges images. The core asks a model for `vocabulary` (None for a real
checkpoint, whose concepts are open-ended) and never checks which model it is."""
from __future__ import annotations

from typing import Protocol


class Vocabulary(Protocol):
    name: str

    def concepts(self) -> list[str]:
        """Every concept the model's world has, by name."""
        ...

    def prompt(self, concept: str) -> str:
        """The prompt a method trains on for a concept ("circle" -> "a circle"). Raises KeyError with a message
        that lists the known concepts when the name is not one of them."""
        ...

    def prompts(self) -> list[str]:
        """A varied set of the world's prompts, unlabelled (what SAeUron's sparse autoencoder is trained on)."""
        ...

    def default_preserve(self, target: str) -> list[str]:
        """Concept names kept intact by default when `target` is erased ("auto" preservation)."""
        ...

    def default_alternative(self, target: str) -> str:
        """What `target` becomes by default for methods that take an alternative."""
        ...

    def oracle(self):
        """A judge of generated images for this world (the toy world's classifier)."""
        ...

    def shows(self, images, prompt: str):
        """For each image (N,3,H,W in [0,1]), whether the oracle sees the concept whose training prompt is
        `prompt` (a bool tensor). Raises KeyError for a prompt that is no concept's."""
        ...


def vocabulary_of(model) -> Vocabulary | None:
    return getattr(model, "vocabulary", None)


def concept_prompt(model, text: str) -> str:
    """A concept as the prompt to train on: the vocabulary's prompt where the model has one, else the text."""
    vocabulary = vocabulary_of(model)
    return vocabulary.prompt(text) if vocabulary is not None else text
