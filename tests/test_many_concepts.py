"""Several concepts erased by one patch: one trajectory cache per concept, merged, with each record saying whose it
is; the closed-form methods solve for every concept's rows at once, the trained ones share one loop. Judged by the
oracle on seeds no cache uses (the unedited model draws every prompt below on each of them: checked first)."""
import pytest
import torch

from erasure_core.denoiser import patched
from erasure_core.engine import TrainConfig, TrajectoryCache, erased_prompts
from erasure_core.methods import train_patch
from erasure_core.request import RequestError, TrainRequest, prepare
from erasure_core.toy.world import OBJECT_NAMES

ERASED = ["a circle", "a star"]
KEPT = ["a square", "a triangle"]
SEEDS = [100, 101, 102, 103]


def seen(toy_model, oracle, patches=()) -> dict[str, list[str]]:
    prompts = [p for p in ERASED + KEPT for _ in SEEDS]
    with patched(toy_model, list(patches)):
        images = toy_model.generate(prompts, SEEDS * len(ERASED + KEPT), steps=10, guidance=3.0)
    names = [OBJECT_NAMES[i] for i in oracle.predict(images)["object"]]
    verdict = {p: names[i * len(SEEDS):(i + 1) * len(SEEDS)] for i, p in enumerate(ERASED + KEPT)}
    print(verdict)  # shown when a test fails
    return verdict


@pytest.fixture(scope="module")
def base(toy_model, oracle):
    verdict = seen(toy_model, oracle)
    assert all(names == [p.removeprefix("a ")] * len(SEEDS) for p, names in verdict.items()), verdict
    return verdict


@pytest.fixture(scope="module")
def two_concept_cache(toy_model):
    return TrajectoryCache.build(toy_model, toy_model.encode(ERASED), toy_model.encode([""]), list(range(4)), 10, 3.0)


def assert_both_erased(verdict, max_left: int, min_kept: int) -> None:
    for prompt in ERASED:
        assert verdict[prompt].count(prompt.removeprefix("a ")) <= max_left, (prompt, verdict)
    kept = sum(names.count(p.removeprefix("a ")) for p, names in verdict.items() if p in KEPT)
    assert kept >= min_kept, verdict


def test_the_cache_holds_each_concepts_own_trajectories(toy_model):
    empty = toy_model.encode([""])
    both = TrajectoryCache.build(toy_model, toy_model.encode(ERASED), empty, [0, 1], 3, 3.0)
    alone = [TrajectoryCache.build(toy_model, toy_model.encode([p]), empty, [0, 1], 3, 3.0) for p in ERASED]
    assert len(both) == sum(len(c) for c in alone) == 12
    assert both.concept_index.tolist() == [0] * 6 + [1] * 6
    for k, cache in enumerate(alone):
        part = both.concept_index == k
        assert torch.equal(both.x_t[part], cache.x_t) and torch.equal(both.eps_concept[part], cache.eps_concept)
    batch = both.draw(8, torch.Generator().manual_seed(0))
    cond, each = erased_prompts(toy_model.encode(ERASED), batch), toy_model.encode(ERASED).context
    assert all(torch.equal(cond.context[i], each[int(k)]) for i, k in enumerate(batch.concept_index))


def test_uce_erases_both_in_one_solve(toy_model, oracle, base):
    result = train_patch(toy_model, TrainConfig(concept=ERASED[0], more_concepts=ERASED[1:], method="uce",
                                                preserve=KEPT))
    assert result.patch.concepts == ERASED
    assert_both_erased(seen(toy_model, oracle, [(result.patch, 1.0)]), max_left=0, min_kept=7)


def test_a_trained_method_erases_both_in_one_loop(toy_model, oracle, base, two_concept_cache):
    config = TrainConfig(concept=ERASED[0], more_concepts=ERASED[1:], method="esd-x", lr=5e-3, steps=20, batch=4,
                         cache_seeds=4, cache_steps=10, preserve=KEPT)
    result = train_patch(toy_model, config, cache=two_concept_cache)
    assert len(result.losses) == 20 and result.patch.concepts == ERASED
    assert_both_erased(seen(toy_model, oracle, [(result.patch, 1.0)]), max_left=1, min_kept=7)


def test_forget_me_not_reads_each_concept_at_its_own_positions(toy_model, two_concept_cache):
    config = TrainConfig(concept="a circle", more_concepts=["a shape with stripes"], method="forget-me-not",
                         steps=2, batch=4, cache_seeds=4, cache_steps=10)
    cache = TrajectoryCache.build(toy_model, toy_model.encode(config.concepts), toy_model.encode([""]), [0], 2, 3.0)
    positions = train_patch(toy_model, config, cache=cache).patch.training["forget_me_not"]["positions"]
    length = toy_model.encode(["a circle"]).context.shape[1]
    assert positions == [list(range(2, length)), list(range(4, length))]  # "circle"..., "stripes"...


def test_a_request_names_several_concepts_with_commas(toy_model):
    plan = prepare(TrainRequest(concept="circle, star", method="uce"), toy_model)
    assert plan.concepts == ["circle", "star"] and plan.concept == "circle, star"
    assert plan.config.concepts == ["a circle", "a star"]
    assert "circle" not in plan.preserve and "star" not in plan.preserve and "square" in plan.preserve
    assert any("2 concepts" in note for note in plan.notes)
    assert prepare(TrainRequest(concept="circle,\ncircle", method="uce"), toy_model).concepts == ["circle"]
    with pytest.raises(RequestError, match="'star' cannot be both erased and preserved"):
        prepare(TrainRequest(concept="circle, star", method="uce", preserve="square, star"), toy_model)
    with pytest.raises(RequestError, match="unknown|known"):
        prepare(TrainRequest(concept="circle, qzx", method="uce"), toy_model)


# -- one erasure after another: --on-top-of ------------------------------------------------------------------

def _random_patch(toy_model, seed: int, memory: bool = True):
    from erasure_core.patch import ConceptMemory, ErasurePatch, WeightDelta

    g = torch.Generator().manual_seed(seed)
    layers, d = toy_model.layer_names(), toy_model.context_dim
    weights = toy_model.projection_weights()
    deltas = {f"{layer}.{proj}": WeightDelta(full=0.05 * torch.randn(weights[f"{layer}.{proj}"].shape, generator=g))
              for layer in layers[seed % 2::2] for proj in ("to_k", "to_v")}
    mem = ConceptMemory(torch.randn(3, d, generator=g), torch.randn(3, d, generator=g)) if memory else None
    return ErasurePatch(layers=layers if memory else [], memory=mem, deltas=deltas, concepts=[f"c{seed}"],
                        base_fingerprint=toy_model.fingerprint())


def test_a_combined_patch_acts_as_its_parts_attached_together(toy_model, tmp_path):
    from erasure_core.patch import PatchError, combine_patches, load_patch, save_patch

    parts = [_random_patch(toy_model, 1), _random_patch(toy_model, 2), _random_patch(toy_model, 3, memory=False)]
    combined = load_patch(save_patch(combine_patches(parts), tmp_path / "combined.safetensors"))
    assert combined.concepts == ["c1", "c2", "c3"] and combined.tokens == 6
    assert [e["concepts"] for e in combined.training["on_top_of"]] == [["c1"], ["c2"]]
    cond = toy_model.encode(["a circle", "a star"])
    x = torch.randn(2, *toy_model.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 700])
    with torch.no_grad():
        plain = toy_model.predict_noise(x, t, cond)
        for strength in (1.0, 0.5):
            with patched(toy_model, [(p, strength) for p in parts]):
                stacked = toy_model.predict_noise(x, t, cond)
            with patched(toy_model, [(combined, strength)]):
                one = toy_model.predict_noise(x, t, cond)
            assert (stacked - plain).abs().max() > 1e-2
            assert torch.allclose(one, stacked, atol=1e-5), strength
        with patched(toy_model, [(combined, 0.0)]):
            assert torch.equal(toy_model.predict_noise(x, t, cond), plain)
    mid_only = _random_patch(toy_model, 4)
    mid_only.layers, mid_only.memory = toy_model.layer_names()[:1], {toy_model.layer_names()[0]: mid_only.memory}
    with pytest.raises(PatchError, match="different layers"):
        combine_patches([parts[0], mid_only])


@pytest.fixture(scope="module")
def circle_by_uce(toy_model):
    return train_patch(toy_model, TrainConfig(concept="a circle", method="uce", preserve=KEPT)).patch


def test_a_trained_erasure_on_top_keeps_the_earlier_one(toy_model, oracle, base, circle_by_uce):
    config = TrainConfig(concept="a star", method="esd-x", lr=5e-3, steps=20, batch=4, cache_seeds=4,
                         cache_steps=10, preserve=KEPT)
    result = train_patch(toy_model, config, on_top_of=[circle_by_uce])
    patch = result.patch
    assert patch.concepts == ["a circle", "a star"] and patch.method == "esd-x"
    assert patch.training["on_top_of"] == [{"method": "uce", "concepts": ["a circle"]}]
    assert patch.preserve == [*KEPT, "a circle"]  # the earlier concept, preserved as the earlier patch draws it
    assert_both_erased(seen(toy_model, oracle, [(patch, 1.0)]), max_left=1, min_kept=7)


def test_train_on_top_of_from_the_command_line(toy_model, tmp_path, capsys):
    import json

    from erasure_core.cli import main

    first, both = tmp_path / "circle.safetensors", tmp_path / "both.safetensors"
    assert main(["train", "--concept", "circle", "--method", "uce", "--out", str(first)]) == 0
    assert main(["train", "--concept", "star", "--method", "uce", "--on-top-of", str(first),
                 "--out", str(both)]) == 0
    assert "trained on top of the earlier erasure of circle" in capsys.readouterr().err
    assert main(["inspect", str(both), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert json.loads(meta["erasure.concepts"]) == ["circle", "star"]
    assert meta["modelspec.title"] == "erase circle, star"
    assert main(["train", "--concept", "circle", "--method", "uce", "--on-top-of", str(first),
                 "--out", str(tmp_path / "again.safetensors")]) == 2
    assert "'circle' is already erased by the earlier patch" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not a patch")
    assert main(["train", "--concept", "star", "--method", "uce", "--on-top-of", str(tmp_path / "bad.safetensors"),
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "again.safetensors").exists() and not (tmp_path / "x.safetensors").exists()
