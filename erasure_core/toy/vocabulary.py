"""The toy world's vocabulary (erasure_core.vocabulary.Vocabulary): 8 objects and 8 styles, their training prompts,
the default preservation and alternatives, and the oracle."""
from __future__ import annotations

from .world import OBJECT_NAMES, STYLE_NAMES, concept, prompt, training_prompt

# what the demo and the benchmark turn a target into: a neighbour on the same axis
DEFAULT_ALTERNATIVES = {"circle": "square", "star": "cross", "stripes": "checker", "dots": "grid"}


class ToyVocabulary:
    name = "toy"

    def concepts(self) -> list[str]:
        return list(OBJECT_NAMES) + list(STYLE_NAMES)

    def prompt(self, concept_name: str) -> str:
        return training_prompt(concept_name)

    def prompts(self) -> list[str]:
        """Every cell of the world (object x style), canonical and with two synonyms: 192 prompts."""
        return [prompt(o, s, synonym=k) for o in range(len(OBJECT_NAMES)) for s in range(len(STYLE_NAMES))
                for k in range(3)]

    def default_preserve(self, target: str) -> list[str]:
        """Every other concept of the world, the target's axis first. Keeping only the target's own axis lost the
        other axis (erasing a style cost objects: bench/results/tuning.md)."""
        c = concept(target)
        own, other = (OBJECT_NAMES, STYLE_NAMES) if c.axis == "object" else (STYLE_NAMES, OBJECT_NAMES)
        return [n for n in own if n != c.name] + list(other)

    def named_neighbours(self, target: str) -> list[str]:
        """The benchmark's fixed preservation set under protocol v2 (docs/benchmark.md): 3 of the 7 other concepts
        of the target's axis (the default alternative and the next two in axis order) and 3 of the 8 of the other
        axis (every third, from the first). Everything else is held out: no training sees it."""
        c = concept(target)
        own, other = (OBJECT_NAMES, STYLE_NAMES) if c.axis == "object" else (STYLE_NAMES, OBJECT_NAMES)
        alternative = self.default_alternative(target)
        start = own.index(c.name)
        following = [own[(start + k) % len(own)] for k in range(1, len(own))]
        return [alternative, *[n for n in following if n != alternative][:2], *other[::3]]

    def default_alternative(self, target: str) -> str:
        c = concept(target)
        if c.name in DEFAULT_ALTERNATIVES:
            return DEFAULT_ALTERNATIVES[c.name]
        names = OBJECT_NAMES if c.axis == "object" else STYLE_NAMES
        return names[(names.index(c.name) + 1) % len(names)]

    def oracle(self):
        from .classifier import load_oracle

        return load_oracle()

    def shows(self, images, prompt: str):
        c = next((concept(n) for n in self.concepts() if training_prompt(n) == prompt), None)
        if c is None:
            raise KeyError(f"{prompt!r} is no concept's training prompt")
        if not hasattr(self, "_oracle"):
            self._oracle = self.oracle()
        names = OBJECT_NAMES if c.axis == "object" else STYLE_NAMES
        return self._oracle.predict(images)[c.axis] == names.index(c.name)
