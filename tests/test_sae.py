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


# --- SAeUron as a method and a patch (erasure_core.methods.saeuron) ---------------------------------------------

import shutil  # noqa: E402

import pytest  # noqa: E402

from erasure_core.denoiser import patched  # noqa: E402
from erasure_core.engine import TrainConfig  # noqa: E402
from erasure_core.methods import train_patch  # noqa: E402
from erasure_core.patch import PatchError, load_patch, save_patch  # noqa: E402
from erasure_core import ui as erasure_ui  # noqa: E402
from erasure_core.sae import SAE_SUFFIX  # noqa: E402
from erasure_core.toy.world import OBJECT_NAMES, STYLE_NAMES  # noqa: E402

STRIPES = "a shape with stripes"
HELD_OUT_SEEDS = list(range(6000, 6008))  # no feature mean (5000+) or SAE training seed (0-191)
# not preserved, so what they keep is kept unnamed: (prompt, object, style)
UNNAMED = [("a circle with zigzags", "circle", "zigzag"), ("a star with bars", "star", "bars"),
           ("a triangle with hatching", "triangle", "hatching"), ("a square with no pattern", "square", "plain")]


@pytest.fixture(scope="module")
def stripes_patch(toy_model):
    # the toy model's shipped SAE (toy.sae.safetensors) is found by the method: only the features are chosen here
    return train_patch(toy_model, TrainConfig(concept=STRIPES, method="saeuron", cache_steps=10,
                                              preserve=["a shape with checkers", "a shape with dots"])).patch


def _seen(toy_model, oracle, patches):
    prompts = [STRIPES] * len(HELD_OUT_SEEDS) + [p for p, _, _ in UNNAMED for _ in range(2)]
    seeds = HELD_OUT_SEEDS + [6000, 6001] * len(UNNAMED)
    with patched(toy_model, patches):
        pred = oracle.predict(toy_model.generate(prompts, seeds, steps=10, guidance=3.0))
    n = len(HELD_OUT_SEEDS)
    left = int((pred["style"][:n] == STYLE_NAMES.index("stripes")).sum())
    kept = sum(int(pred["object"][n + 2 * i + j] == OBJECT_NAMES.index(o) and
                   pred["style"][n + 2 * i + j] == STYLE_NAMES.index(s)) for i, (_, o, s) in enumerate(UNNAMED)
               for j in range(2))
    return left, kept


def test_saeuron_erases_a_style_at_generation_and_keeps_what_nobody_named(toy_model, oracle, stripes_patch):
    assert _seen(toy_model, oracle, []) == (8, 8)  # the unedited model draws all of them
    patch = stripes_patch
    assert not patch.deltas and patch.memory is None and patch.required_features() == ["sae"]
    assert patch.feature_meta["sae"]["block"] == "output_blocks.1.1" and patch.training["sae"]["reused"]
    left, kept = _seen(toy_model, oracle, [(patch, 1.0)])
    assert left <= 1 and kept >= 7, (left, kept)  # measured: 0 left, 8 of 8 kept


def test_a_saeuron_patch_file_shares_its_sae_and_refuses_a_missing_or_altered_one(toy_model, stripes_patch,
                                                                                  tmp_path):
    dots = train_patch(toy_model, TrainConfig(concept="a shape with dots", method="saeuron", cache_steps=4)).patch
    save_patch(stripes_patch, tmp_path / "stripes.safetensors")
    save_patch(dots, tmp_path / "dots.safetensors")
    (sae_file,) = tmp_path.glob(f"*{SAE_SUFFIX}")  # written once, beside both
    assert (tmp_path / "stripes.safetensors").stat().st_size < sae_file.stat().st_size / 4
    loaded = load_patch(tmp_path / "stripes.safetensors")
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([900, 300])
    cond = toy_model.encode([STRIPES, "a circle"])
    outputs = []
    for patch in (stripes_patch, loaded):
        with torch.no_grad(), patched(toy_model, [(patch, 1.0)]):
            outputs.append(toy_model.predict_noise(x, t, cond))
    assert torch.equal(*outputs)
    elsewhere = tmp_path / "alone"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "stripes.safetensors", elsewhere)
    with pytest.raises(PatchError, match="needs its sparse autoencoder .* put it beside the patch"):
        load_patch(elsewhere / "stripes.safetensors")
    data = bytearray(sae_file.read_bytes())
    data[-8:] = bytes(8)  # the last values of b_dec
    (elsewhere / sae_file.name).write_bytes(bytes(data))
    with pytest.raises(PatchError, match="do not match its fingerprint"):
        load_patch(elsewhere / "stripes.safetensors")
    with pytest.raises(PatchError, match="is SAeUron's sparse autoencoder, not a patch"):
        load_patch(sae_file)
    assert erasure_ui.list_patches(tmp_path) == ["alone/stripes", "dots", "stripes"]  # what hosts offer: no SAE


def test_saeuron_strength_zero_and_detach_are_bit_identical(toy_model, stripes_patch):
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([950, 500])
    cond = toy_model.encode([STRIPES, STRIPES])
    with torch.no_grad():
        plain = toy_model.predict_noise(x, t, cond)
        with patched(toy_model, [(stripes_patch, 0.0)]):
            assert torch.equal(toy_model.predict_noise(x, t, cond), plain)
        with patched(toy_model, [(stripes_patch, 1.0)]):
            full = toy_model.predict_noise(x, t, cond)
        with patched(toy_model, [(stripes_patch, 0.5)]):
            half = toy_model.predict_noise(x, t, cond)
        assert torch.equal(toy_model.predict_noise(x, t, cond), plain)
    assert 0 < (half - plain).abs().max() < (full - plain).abs().max()


def test_gradients_pass_through_a_saeuron_edit(toy_model, stripes_patch):
    """Concept inversion and training on top of a patch differentiate through the edited block."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cond = toy_model.encode([STRIPES])
    context = cond.context.detach().clone().requires_grad_(True)
    with patched(toy_model, [(stripes_patch, 1.0)]):
        toy_model.predict_noise(x, torch.tensor([500]), type(cond)(context, cond.extra)).pow(2).mean().backward()
    assert context.grad is not None and context.grad.abs().max() > 0


def test_training_on_top_of_a_saeuron_patch_is_refused_before_it_starts(toy_model, stripes_patch):
    """One file cannot hold an SAE edit and weight deltas together (combine_patches), so say so up front."""
    from erasure_core.request import RequestError, TrainRequest, prepare

    with pytest.raises(RequestError, match="cannot train on top of the earlier patch: .*side by side"):
        prepare(TrainRequest(concept="circle", method="uce", on_top_of=[stripes_patch]), toy_model)


def test_the_trainer_takes_rows_made_in_inference_mode():
    """ComfyUI runs nodes under torch.inference_mode(): the SAE of a Train node is fed rows made there."""
    trainer = SAETrainer(dim=8, expansion=2, k=2, lr=1e-2, batch=16, buffer=2)
    with torch.inference_mode():
        for i in range(6):
            trainer.feed(torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(i)))
    sae = trainer.finish()
    assert trainer.steps >= 6 and torch.isfinite(sae.w_dec).all() and not sae.w_dec.is_inference()


def test_cancelling_while_the_sae_trains_stops_it_as_every_method_stops(toy_model):
    from erasure_core.engine import Cancelled
    from erasure_core.methods.saeuron import default_block, train_sae

    with pytest.raises(Cancelled):
        train_sae(toy_model, default_block(toy_model), TrainConfig(concept=STRIPES, method="saeuron"),
                  cancel=lambda: True)
