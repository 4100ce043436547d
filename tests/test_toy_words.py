"""The toy model's everyday words (toy/words.py): they draw what the prompt says, and learning them changes no
weight the model had."""
import pytest
import torch

from erasure_core.toy.world import OBJECT_NAMES, STYLE_NAMES


@pytest.mark.parametrize("prompt, axis, name", [("a picture of stripes", "style", "stripes"),
                                                ("an image showing a circle", "object", "circle")])
def test_prompts_with_everyday_words_draw_their_concept(toy_model, oracle, prompt, axis, name):
    """Both templates were held out of the words' training (words.HELD_OUT); before the words they drew 0 of 8."""
    images = toy_model.generate([prompt] * 8, list(range(8)), steps=10)
    names = OBJECT_NAMES if axis == "object" else STYLE_NAMES
    assert (oracle.predict(images)[axis] == names.index(name)).float().mean() >= 0.75


def test_learning_the_words_moves_only_their_embedding_rows():
    from erasure_core.toy.model import load_toy_model
    from erasure_core.toy.words import ORIGINAL_VOCAB_SIZE, train_word_embeddings

    model = load_toy_model()
    modules = {"unet": model.unet, "text": model.text_encoders[0]}
    before = {f"{m}.{k}": v.clone() for m, mod in modules.items() for k, v in mod.state_dict().items()}
    train_word_embeddings(model, steps=2, batch=4, lr=1e-2)
    after = {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.state_dict().items()}
    table = next(k for k in after if k.endswith("token_embedding.weight"))
    assert all(torch.equal(before[k], after[k]) for k in after if k != table)
    assert torch.equal(before[table][:ORIGINAL_VOCAB_SIZE], after[table][:ORIGINAL_VOCAB_SIZE])
    assert not torch.equal(before[table][ORIGINAL_VOCAB_SIZE:], after[table][ORIGINAL_VOCAB_SIZE:])


def test_the_word_training_never_sees_a_held_out_template():
    from erasure_core.toy.words import HELD_OUT, TRAIN_TEMPLATES, check_prompts, training_batch

    assert not set(HELD_OUT) & set(TRAIN_TEMPLATES)
    captions = {c for step in range(20) for c in training_batch(step, 16, seed=0)[1]}
    assert not captions & {p for p, _, _ in check_prompts()}
