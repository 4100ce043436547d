"""erasure_core.sae: the batch-TopK autoencoder SAeUron edits, trained from streamed rows, and its edit."""
import torch

from erasure_core.sae import (ConceptFeatures, SAETrainer, SparseAutoencoder, block_outputs, bucket_of, edit,
                              select_features)


def sparse_rows(n: int, atoms: torch.Tensor, seed: int) -> torch.Tensor:
    """Each row a positive mix of 3 of the atoms: data an SAE with enough features can represent exactly."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.rand(n, len(atoms), generator=g).argsort(1)[:, :3]
    coef = torch.zeros(n, len(atoms)).scatter(1, pick, 0.5 + torch.rand(n, 3, generator=g))
    return coef @ atoms


def test_the_streamed_sae_learns_to_reconstruct_sparse_data():
    atoms = torch.nn.functional.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    trainer = SAETrainer(dim=16, expansion=4, k=4, lr=1e-2, batch=256, buffer=8)
    held_out = sparse_rows(2000, atoms, seed=99)
    for chunk in range(60):  # fed like a sampler's hook: small chunks, never all at once
        trainer.feed(sparse_rows(500, atoms, seed=chunk).view(5, 100, 16))
    sae = trainer.finish()
    nmse = (sae.decode(sae.encode(held_out)) - held_out).pow(2).sum(1).mean() / held_out.var(0).sum()
    assert sae.features == 64 and trainer.steps >= 100
    assert nmse < 0.15, float(nmse)
    active = (sae.encode(held_out) > 0).sum(1).float().mean()
    assert 1 <= active <= 12, float(active)  # about k per row at inference, from the learned threshold


def _toy_sae(dim=8, features=16, seed=0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.nn.functional.normalize(torch.randn(features, dim, generator=g), dim=1)
    return SparseAutoencoder(w_dec.T.clone(), torch.zeros(features), w_dec, torch.zeros(dim), k=4, threshold=0.0)


def test_the_edit_sets_selected_features_that_fire_and_leaves_other_rows_exactly():
    sae = _toy_sae()
    rows = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([50, 950])
    nothing = ConceptFeatures(torch.zeros(10, 16, dtype=torch.bool), torch.ones(10, 16), torch.zeros(10, 16), -1.0)
    assert torch.equal(edit(sae, nothing, rows, t), rows)
    selected = torch.zeros(10, 16, dtype=torch.bool)
    selected[9, 3] = True  # feature 3, only in the last bucket (t 900-999)
    features = ConceptFeatures(selected, torch.full((10, 16), 2.0), torch.zeros(10, 16), -1.0)
    out = edit(sae, features, rows, t)
    assert torch.equal(out[0], rows[0])  # t = 50: another bucket
    z = sae.encode(rows[1])
    fired = z[:, 3] > 0
    assert fired.any() and (~fired).any()
    expected = rows[1] + ((-2.0 - z[:, 3]) * fired)[:, None] * sae.w_dec[3]
    assert torch.allclose(out[1], expected, atol=1e-6)
    assert torch.equal(edit(sae, features, rows, t, strength=0.0), rows)


def test_features_are_chosen_by_their_share_of_the_concept_over_their_share_of_the_rest():
    concept = torch.tensor([[4.0, 1.0, 1.0, 2.0]])
    other = torch.tensor([[4.0, 1.0, 1.0, 0.1]])
    chosen = select_features(concept, other, per_bucket=2, multiplier=-1.0)
    assert chosen.selected.tolist() == [[False, False, False, True]]  # feature 0 fires as much on the rest
    assert bucket_of(torch.tensor([0, 99, 100, 999])).tolist() == [0, 0, 1, 9]


def test_block_outputs_sees_each_unet_call_with_its_timesteps(toy_model):
    block = toy_model.unet.up_blocks[0].attentions[1]
    seen = []
    with block_outputs(toy_model.unet, block, lambda t, rows: seen.append((t.tolist(), tuple(rows.shape)))):
        toy_model.generate(["a circle"], [0], steps=3, guidance=3.0)
    scheduler = toy_model.scheduler()
    scheduler.set_timesteps(3)
    assert [t for t, _ in seen] == [[int(s)] * 2 for s in scheduler.timesteps]  # both halves of the CFG batch
    assert all(shape == (2, 64, 128) for _, shape in seen)


def test_rows_the_sink_returns_replace_the_blocks_output(toy_model):
    block = toy_model.unet.up_blocks[0].attentions[1]
    plain = toy_model.generate(["a circle"], [0], steps=3, guidance=3.0)
    with block_outputs(toy_model.unet, block, lambda t, rows: rows.clone()):
        same = toy_model.generate(["a circle"], [0], steps=3, guidance=3.0)
    with block_outputs(toy_model.unet, block, lambda t, rows: torch.zeros_like(rows)):
        zeroed = toy_model.generate(["a circle"], [0], steps=3, guidance=3.0)
    assert torch.equal(same, plain) and not torch.allclose(zeroed, plain, atol=1e-3)
