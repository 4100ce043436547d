"""The training engine on the toy model: cache, loss, resume, and a real change in the target's images."""
import torch

from erasure_core.engine import TrainConfig, TrajectoryCache
from erasure_core.injection import attached
from erasure_core.methods.esd import train_esd


def small_config(**kw):
    base = dict(concept="a circle", method="esd-x", steps=24, lr=2e-3, batch=8, cache_seeds=4, cache_steps=10,
                layers="all", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def build_cache(model, config):
    return TrajectoryCache.build(model, model.encode([config.concept]), model.encode([""]),
                                 list(range(config.cache_seeds)), config.cache_steps, config.cache_guidance)


def test_esd_lowers_its_loss_and_changes_the_target(toy_model):
    config = small_config()
    cache = build_cache(toy_model, config)
    assert len(cache) == config.cache_seeds * config.cache_steps
    before_weights = {k: v.clone() for k, v in toy_model.unet.state_dict().items()}
    patch, losses = train_esd(toy_model, config, cache=cache)
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6
    assert all(torch.equal(v, before_weights[k]) for k, v in toy_model.unet.state_dict().items())
    assert patch.deltas and all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in patch.deltas)
    plain = toy_model.generate(["a circle"] * 2, [0, 1], steps=10)
    with attached(toy_model.unet, [(patch, 1.0)]):
        erased = toy_model.generate(["a circle"] * 2, [0, 1], steps=10)
    assert (plain - erased).abs().mean() > 0.02


def test_resumed_run_equals_uninterrupted_run(toy_model, tmp_path):
    config = small_config(steps=10, method="esd-x-strict")
    cache = build_cache(toy_model, config)
    full, full_losses = train_esd(toy_model, config, cache=cache)
    ckpt = tmp_path / "run.pt"
    calls = {"n": 0}

    def cancel_after_four():
        calls["n"] += 1
        return calls["n"] > 4

    from erasure_core.engine import Cancelled

    try:
        train_esd(toy_model, config, cache=cache, checkpoint=ckpt, cancel=cancel_after_four)
        raise AssertionError("expected cancellation")
    except Cancelled:
        pass
    resumed, resumed_losses = train_esd(toy_model, config, cache=cache, checkpoint=ckpt)
    assert resumed_losses == full_losses
    for name, delta in full.deltas.items():
        assert torch.equal(resumed.deltas[name].full, delta.full)


def test_preservation_keeps_the_preserved_prompt_closer_to_the_original(toy_model):
    """The same ESD run with and without "a square" preserved: the square's prediction moves less with it."""
    from erasure_core.denoiser import patched

    config = small_config(method="esd-x-strict", steps=24, lr=5e-3)
    cache = build_cache(toy_model, config)
    free, _ = train_esd(toy_model, config, cache=cache)
    kept, _ = train_esd(toy_model, small_config(method="esd-x-strict", steps=24, lr=5e-3, preserve=["a square"],
                                                preserve_weight=5.0), cache=cache)
    assert cache.eps_preserve is not None and cache.eps_preserve.shape[1] == 1
    square = toy_model.encode(["a square"]).expand(len(cache))

    def square_shift(patch):
        with torch.no_grad(), patched(toy_model, [(patch, 1.0)]):
            return (toy_model.predict_noise(cache.x_t, cache.t, square) - cache.eps_preserve[:, 0]).square().mean()

    assert square_shift(kept) < 0.5 * square_shift(free)


def test_the_learning_rate_defaults_per_method_and_an_explicit_one_wins():
    from dataclasses import replace

    assert TrainConfig(concept="a circle", method="esd-x").delta_lr == 1e-3
    esd_u = TrainConfig(concept="a circle", method="esd-u")
    assert esd_u.delta_lr == 1e-4 and esd_u.lr is None
    assert replace(TrainConfig(concept="a circle"), method="esd-u").delta_lr == 1e-4  # how the benchmark builds it
    assert TrainConfig(concept="a circle", method="esd-u", lr=5e-4).delta_lr == 5e-4
