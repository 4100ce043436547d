"""Every method, in a short run on the toy model: its loss falls and the target's images change."""
import pytest
import torch

from erasure_core.engine import TrainConfig, TrajectoryCache
from erasure_core.injection import attached
from erasure_core.layers import attn2_layers
from erasure_core.methods.all_but_one import train_all_but_one
from erasure_core.methods.memory import train_memory
from erasure_core.methods.uce import train_uce

SEEDS = [0, 1, 2, 3]


def config(**kw):
    base = dict(concept="a circle", steps=30, lr=2e-3, memory_lr=2e-2, tokens=4, batch=8, cache_seeds=4,
                cache_steps=10, layers="all", seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def circle_cache(toy_model):
    c = config()
    return TrajectoryCache.build(toy_model, toy_model.encode([c.concept]), toy_model.encode([""]),
                                 list(range(c.cache_seeds)), c.cache_steps, c.cache_guidance,
                                 alternative=toy_model.encode(["a square"]))


@pytest.fixture(scope="module")
def original(toy_model):
    return toy_model.generate(["a circle"] * len(SEEDS), SEEDS, steps=10)


def images_with(toy_model, patches):
    with attached(toy_model.unet, patches):
        return toy_model.generate(["a circle"] * len(SEEDS), SEEDS, steps=10)


def falls(losses, k=6):
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


@pytest.mark.parametrize("variant", ["memory", "memory-only"])
def test_memory_variants(toy_model, circle_cache, original, variant):
    c = config(method=variant, preserve=["a square"] if variant == "memory-only" else [])
    patch, losses, key = train_memory(toy_model, c, cache=circle_cache)
    assert key is None and patch.memory is not None and patch.memory.k.shape == (4, 128)
    assert (patch.deltas != {}) == (variant == "memory")
    # the memory step and erasure step alternate in variant (a): compare like with like
    assert falls(losses[1::2] if variant == "memory" else losses, k=3)
    assert (images_with(toy_model, [(patch, 1.0)]) - original).abs().mean() > 0.02


def test_key_mode_hides_and_the_key_restores(toy_model, circle_cache, original):
    patch, losses, key = train_memory(toy_model, config(method="memory-key", steps=80, memory_lr=5e-2),
                                      cache=circle_cache)
    assert patch.memory is None and patch.deltas and key.memory is not None and not key.deltas
    hidden = (images_with(toy_model, [(patch, 1.0)]) - original).abs().mean()
    restored = (images_with(toy_model, [(patch, 1.0), (key, 1.0)]) - original).abs().mean()
    assert hidden > 0.02
    assert restored < 0.7 * hidden, (float(hidden), float(restored))


def test_all_but_one_with_alternative(toy_model, circle_cache, original):
    patch, losses = train_all_but_one(toy_model, config(method="all-but-one", alternative="a square"),
                                      cache=circle_cache)
    assert falls(losses)
    assert (images_with(toy_model, [(patch, 1.0)]) - original).abs().mean() > 0.02


def test_uce_is_closed_form_and_changes_the_target(toy_model, original):
    patch = train_uce(toy_model, config(method="uce", preserve=["a square"]))
    assert patch.deltas and all(name.endswith(("to_k", "to_v")) for name in patch.deltas)
    assert (images_with(toy_model, [(patch, 1.0)]) - original).abs().mean() > 0.02
    # the edit maps the erased tokens towards the anchor's outputs and leaves the preserved ones nearly alone
    layer = next(iter(patch.deltas))
    modules = dict(toy_model.unet.named_modules())
    diffusers_name = {l.canonical: l.diffusers for l in attn2_layers(toy_model.unet)}[layer.rsplit(".", 1)[0]]
    w = modules[f"{diffusers_name}.{layer.rsplit('.', 1)[1]}"].weight
    n = len(toy_model.tokenizer("a circle").input_ids)
    erased, anchor = toy_model.encode(["a circle"]).context[0, :n], toy_model.encode([""]).context[0, :n]
    kept = toy_model.encode(["a square"]).context[0, :n]
    delta = patch.deltas[layer].full
    assert (erased @ (w + delta).T - anchor @ w.T).norm() < 0.5 * (erased @ w.T - anchor @ w.T).norm()
    assert (kept @ delta.T).norm() < 0.2 * (kept @ w.T).norm()


def test_esd_u_trains_only_outside_cross_attention(toy_model, circle_cache, original):
    from erasure_core.methods.esd import train_esd

    before = {k: v.clone() for k, v in toy_model.unet.state_dict().items()}
    patch, losses = train_esd(toy_model, config(method="esd-u", lr=1e-4), cache=circle_cache)
    assert falls(losses)
    assert all(torch.equal(v, before[k]) for k, v in toy_model.unet.state_dict().items())
    assert patch.deltas and not any(".attn2." in name or name.startswith(("time_embed.", "out."))
                                    for name in patch.deltas)
    assert any(d.full.dim() == 4 for d in patch.deltas.values())  # ResBlock convs, not only linear layers
    assert (images_with(toy_model, [(patch, 1.0)]) - original).abs().mean() > 0.02
