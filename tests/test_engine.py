"""The training engine on the toy model: what the trajectory cache holds and draws, resuming a run, the
preservation term, and the per-method learning rates. Whether each method erases is judged in test_methods.py."""
import pytest
import torch

from conftest import CIRCLE_CACHE
from erasure_core.engine import Cancelled, TrainConfig
from erasure_core.methods import train_patch
from erasure_core.sampling import cfg, seeded_noise


def small_config(**kw):
    # the same settings as test_methods.py's esd-x-strict run, so the `trained` memo trains it once for both files
    base = dict(concept="a circle", method="esd-x-strict", steps=10, lr=5e-3, batch=4, tokens=4, cache_seeds=4,
                cache_steps=10, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_the_cache_records_the_frozen_samplers_trajectories(toy_model, circle_cache):
    """Exact: row block k is DDIM step k of every seed, and its ε are the frozen model's at that x_t."""
    seeds, steps, guidance = CIRCLE_CACHE["seeds"], CIRCLE_CACHE["steps"], CIRCLE_CACHE["guidance"]
    n = len(seeds)
    assert len(circle_cache) == n * steps
    for name in ("t", "eps_uncond", "eps_concept", "eps_alternative"):
        assert len(getattr(circle_cache, name)) == n * steps
    sched = toy_model.scheduler()
    sched.set_timesteps(steps)
    assert torch.equal(circle_cache.x_t[:n], seeded_noise(seeds, toy_model.sample_shape) * sched.init_noise_sigma)
    assert torch.equal(circle_cache.t, sched.timesteps.repeat_interleave(n))
    for k in (0, steps - 1):
        rows = slice(k * n, (k + 1) * n)
        x, t = circle_cache.x_t[rows], circle_cache.t[rows]
        with torch.no_grad():
            for name, prompt in (("eps_uncond", ""), ("eps_concept", "a circle"), ("eps_alternative", "a square")):
                expected = toy_model.predict_noise(x, t, toy_model.encode([prompt]).expand(n))
                torch.testing.assert_close(getattr(circle_cache, name)[rows], expected, atol=1e-5, rtol=1e-4)
    # and step k + 1 starts where the sampler's step from step k lands
    rows = slice(0, n)
    step = sched.step(cfg(circle_cache.eps_uncond[rows], circle_cache.eps_concept[rows], guidance),
                      sched.timesteps[0], circle_cache.x_t[rows]).prev_sample
    torch.testing.assert_close(circle_cache.x_t[n:2 * n], step)


def test_a_draw_is_rows_of_the_cache_chosen_by_the_generator(circle_cache):
    batch = circle_cache.draw(6, torch.Generator().manual_seed(5))
    idx = torch.randint(0, len(circle_cache), (6,), generator=torch.Generator().manual_seed(5))
    for name in ("x_t", "t", "eps_uncond", "eps_concept", "eps_alternative", "eps_preserve"):
        stored = getattr(circle_cache, name)
        drawn = getattr(batch, name)
        assert (drawn is None) == (stored is None), name
        if stored is not None:
            assert torch.equal(drawn, stored[idx]), name
    again = circle_cache.draw(6, torch.Generator().manual_seed(5))
    assert torch.equal(again.x_t, batch.x_t)


def test_resumed_run_equals_uninterrupted_run(toy_model, circle_cache, trained, tmp_path):
    config = small_config()
    full = trained(config)
    ckpt = tmp_path / "run.pt"
    calls = {"n": 0}

    def cancel_after_four():
        calls["n"] += 1
        return calls["n"] > 4

    with pytest.raises(Cancelled):
        train_patch(toy_model, config, cache=circle_cache, checkpoint=ckpt, cancel=cancel_after_four)
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    resumed = train_patch(toy_model, config, cache=circle_cache, checkpoint=ckpt)
    assert resumed.losses == full.losses and len(full.losses) == config.steps
    assert resumed.patch.deltas.keys() == full.patch.deltas.keys()
    for name, delta in full.patch.deltas.items():
        assert torch.equal(resumed.patch.deltas[name].full, delta.full)


def test_a_cancelled_run_keeps_its_cache_and_the_resumed_run_samples_nothing(toy_model, tmp_path, monkeypatch):
    import erasure_core.engine as engine

    config = TrainConfig(concept="a circle", method="esd-x", steps=4, batch=2, cache_seeds=1, cache_steps=3,
                         preserve=["a square"])
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Cancelled):
        train_patch(toy_model, config, checkpoint=ckpt, cancel=lambda: True)
    assert engine.cache_path(ckpt).exists()
    stored = engine.TrajectoryCache.load(engine.cache_path(ckpt), "cpu")
    assert stored.preserved == ["a square"] and stored.eps_preserve.shape[1] == 1  # the anchors too
    monkeypatch.setattr(engine, "sample_trajectories", lambda *a, **k: pytest.fail("sampled the cache again"))
    monkeypatch.setattr(engine.TrajectoryCache, "add_preserved", lambda *a, **k: pytest.fail("anchors again"))
    resumed = train_patch(toy_model, config, checkpoint=ckpt)
    assert len(resumed.losses) == 4
    engine.discard_checkpoint(ckpt)
    assert not ckpt.exists() and not engine.cache_path(ckpt).exists()


def test_a_cache_kept_in_ram_hands_each_batch_to_the_models_device(toy_model, tmp_path):
    """cache_on_cpu: the tensors stay in RAM and every draw goes to the model's device ('meta' stands in for a
    GPU on a CPU machine); the trained patch is the same, and a run resumes across the setting."""
    from dataclasses import replace

    import erasure_core.engine as engine

    config = TrainConfig(concept="a circle", method="esd-x", steps=3, batch=2, cache_seeds=1, cache_steps=3,
                         preserve=["a square"], cache_on_cpu=True)
    in_ram = train_patch(toy_model, config)
    on_device = train_patch(toy_model, replace(config, cache_on_cpu=False))
    assert in_ram.losses == on_device.losses
    assert all(torch.equal(d.full, on_device.patch.deltas[k].full) for k, d in in_ram.patch.deltas.items())
    assert engine.checkpoint_path(tmp_path, config, "f") == \
        engine.checkpoint_path(tmp_path, replace(config, cache_on_cpu=False), "f")
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Cancelled):
        train_patch(toy_model, config, checkpoint=ckpt, cancel=lambda: True)
    stored = engine.TrajectoryCache.load(engine.cache_path(ckpt), device="meta", storage="cpu")
    assert stored.x_t.device.type == "cpu" and stored.eps_preserve.device.type == "cpu"
    batch = stored.draw(2, torch.Generator().manual_seed(0))
    drawn = (batch.x_t, batch.t, batch.eps_uncond, batch.eps_concept, batch.eps_preserve)
    assert all(t.device.type == "meta" for t in drawn)


@pytest.mark.parametrize("method, stages", [
    ("esd-x", ["sampling the frozen model's trajectories", "the preserved prompts' anchors", "training"]),
    ("uce", ["closed-form edit of the projections"]),
])
def test_progress_moves_through_every_phase_of_a_run(toy_model, method, stages):
    seen = []
    config = TrainConfig(concept="a circle", method=method, steps=3, batch=2, cache_seeds=1, cache_steps=2,
                         preserve=["a square"])
    train_patch(toy_model, config, progress=lambda done, total, loss, stage: seen.append((stage, done, total)))
    assert list(dict.fromkeys(s for s, _, _ in seen)) == stages
    for stage in stages:
        done = [d for s, d, _ in seen if s == stage]
        totals = {t for s, _, t in seen if s == stage}
        assert done == sorted(done) and len(totals) == 1 and done[-1] == totals.pop() and len(done) >= 2


def test_preservation_keeps_the_preserved_prompt_closer_to_the_original(toy_model, circle_cache, trained):
    """The same ESD run with and without "a square" preserved: the square's prediction moves less with it, and
    the circle's as much as without (the term steers the edit, it does not just shrink it)."""
    from erasure_core.denoiser import patched

    free = trained(small_config()).patch
    kept = trained(small_config(preserve=["a square"], preserve_weight=5.0)).patch
    x_t, t = circle_cache.x_t, circle_cache.t
    prompts = {p: toy_model.encode([p]).expand(len(circle_cache)) for p in ("a square", "a circle")}
    with torch.no_grad():
        original = {p: toy_model.predict_noise(x_t, t, cond) for p, cond in prompts.items()}

    def shift(patch, prompt):
        with torch.no_grad(), patched(toy_model, [(patch, 1.0)]):
            return float((toy_model.predict_noise(x_t, t, prompts[prompt]) - original[prompt]).square().mean())

    # measured with these settings: the square's shift 0.52 of the free run's (0.49 to 0.52 for weights 5 to 20:
    # ten Adam steps move the deltas as far either way, preservation only turns them), the circle's 1.03
    square = shift(kept, "a square") / shift(free, "a square")
    circle = shift(kept, "a circle") / shift(free, "a circle")
    assert square < 0.75, square
    assert circle > 0.75, circle


def test_the_learning_rate_defaults_per_method_and_an_explicit_one_wins():
    from dataclasses import replace

    assert TrainConfig(concept="a circle", method="esd-x").delta_lr == 1e-3
    esd_u = TrainConfig(concept="a circle", method="esd-u")
    assert esd_u.delta_lr == 1e-4 and esd_u.lr is None
    assert replace(TrainConfig(concept="a circle"), method="esd-u").delta_lr == 1e-4  # how the benchmark builds it
    assert TrainConfig(concept="a circle", method="esd-u", lr=5e-4).delta_lr == 5e-4
    memory = TrainConfig(concept="a circle", method="memory")
    assert memory.memory_lr is None and memory.memory_rate == 1e-2
    assert TrainConfig(concept="a circle", method="memory", memory_lr=5e-2).memory_rate == 5e-2
    assert TrainConfig(concept="a circle", method="esd-x").memory_rate is None  # ESD has no memory
    assert TrainConfig(concept="a circle", method="uce").delta_lr is None  # closed form: no rate at all
