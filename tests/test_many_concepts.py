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
