from erasure_core.toy.classifier import HELDOUT_SEED0, accuracy, augment, render_labelled


def test_oracle_is_accurate_on_held_out_renders(oracle):
    acc = accuracy(oracle, *render_labelled(HELDOUT_SEED0 + 5000, 400))
    assert min(acc.values()) >= 0.97, acc


def test_oracle_survives_generation_like_artefacts(oracle):
    import torch

    x, y = render_labelled(HELDOUT_SEED0 + 9000, 200)
    acc = accuracy(oracle, augment(x, torch.Generator().manual_seed(1)), y)
    assert min(acc.values()) >= 0.9, acc
