"""The word list's candidate concepts: nearest the target, one per group, never the target or its synonyms."""
import torch

from erasure_core.candidates import SYNONYM_CEILING, nearest_concepts, word_list
from erasure_core.denoiser import Conditioning


class VectorDenoiser:
    """encode() gives each word a fixed direction (a 1-token context); the empty prompt is the zero vector."""

    def __init__(self, directions: dict[str, list[float]]) -> None:
        self.directions = {w: torch.tensor(v) for w, v in directions.items()}

    def encode(self, prompts):
        zero = torch.zeros(len(next(iter(self.directions.values()))))
        return Conditioning(torch.stack([self.directions.get(p, zero) for p in prompts])[:, None, :])


def test_the_shipped_list_has_a_few_thousand_distinct_words():
    words = word_list()
    assert 2000 <= len(words) <= 5000 and len(set(words)) == len(words)
    assert {"impressionism", "watercolor", "portrait", "dog", "car"} <= set(words)


def test_one_neighbour_per_group_nearest_first_never_the_target_or_a_synonym():
    directions = {"cat": [1, 0, 0, 0], "kitty": [1, 0.01, 0, 0],             # kitty: a synonym, above the ceiling
                  "dog": [0.8, 0.6, 0, 0], "puppy": [0.79, 0.61, 0.01, 0],    # one group
                  "car": [0.1, 0, 1, 0], "truck": [0.12, 0, 0.99, 0],         # another
                  "idea": [0, 0, 0, 1]}
    model = VectorDenoiser(directions)
    words = tuple(directions)
    picked = nearest_concepts(model, "cat", 3, words=words)
    assert picked[0] in ("dog", "puppy") and {"dog", "puppy"} & set(picked[1:]) == set()
    assert "cat" not in picked and "kitty" not in picked
    assert float(torch.nn.functional.cosine_similarity(torch.tensor([1., 0, 0, 0]), torch.tensor([1, 0.01, 0, 0]),
                                                       dim=0)) >= SYNONYM_CEILING
    assert "idea" in picked and ("car" in picked) != ("truck" in picked)
    assert nearest_concepts(model, "cat", 3, exclude=["dog", "puppy"], words=words)[0] in ("car", "truck")
    assert nearest_concepts(model, "cat", 3, words=words) == picked  # deterministic


def test_a_synonym_of_one_word_of_the_prompt_is_never_a_candidate():
    directions = {"a shape with stripes": [1, 1, 0, 0], "stripes": [0, 1, 0, 0], "lines": [0, 1, 0.01, 0],
                  "dots": [0.6, 0.4, 0.6, 0], "idea": [0, 0, 0, 1]}
    picked = nearest_concepts(VectorDenoiser(directions), "a shape with stripes", 3, words=("lines", "dots", "idea"))
    assert picked == ["dots", "idea"]


def test_the_word_lists_encoding_is_made_once_per_text_encoder():
    directions = {"cat": [1, 0, 0], "dog": [0.8, 0.6, 0], "car": [0, 0.2, 1], "a photo": [0, 1, 0], "art": [1, 1, 1]}
    model = VectorDenoiser(directions)
    encoded = []
    original = model.encode
    model.encode = lambda prompts: (encoded.extend(prompts), original(prompts))[1]
    words = ("dog", "car")
    first = nearest_concepts(model, "cat", 2, words=words)
    assert encoded.count("dog") == 1
    assert nearest_concepts(model, "cat", 2, words=words) == first and encoded.count("dog") == 1
    nearest_concepts(model, "cat", 2, exclude=["car"], words=words)  # another exclusion: the same encoding
    assert encoded.count("dog") == 1
    directions["art"] = [0, 0, 1]  # another encoder (a LoRA on the text encoder): the probes differ
    model.directions = {w: torch.tensor(v, dtype=torch.float) for w, v in directions.items()}
    nearest_concepts(model, "cat", 2, words=words)
    assert encoded.count("dog") == 2
