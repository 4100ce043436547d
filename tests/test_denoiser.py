import torch

from erasure_core.denoiser import Conditioning, sample_trajectories, to_epsilon
from erasure_core.sampling import seeded_noise


def test_to_epsilon_recovers_noise_from_v_and_x0_predictions():
    alphas = torch.linspace(0.99, 0.01, 1000)
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(to_epsilon(v, xt, t, alphas, "v_prediction"), eps, atol=1e-5)
    assert torch.allclose(to_epsilon(x0, xt, t, alphas, "sample"), eps, atol=1e-4)
    assert to_epsilon(eps, xt, t, alphas, "epsilon") is eps


def test_trajectory_records_are_the_frozen_models_predictions(toy_model):
    concept, empty, alt = toy_model.encode(["a circle"]), toy_model.encode([""]), toy_model.encode(["a square"])
    noise = seeded_noise([5, 6], toy_model.sample_shape)
    records = list(sample_trajectories(toy_model, concept, empty, noise, steps=4, guidance=3.0, alternative=alt))
    assert len(records) == 4
    sched = toy_model.scheduler()
    sched.set_timesteps(4)
    assert torch.equal(records[0].x_t, noise * sched.init_noise_sigma)
    assert [int(r.t[0]) for r in records] == [int(t) for t in sched.timesteps]
    r = records[2]
    with torch.no_grad():
        for cond, eps in ((empty, r.eps_uncond), (concept, r.eps_concept), (alt, r.eps_alternative)):
            assert torch.allclose(toy_model.predict_noise(r.x_t, r.t, cond.expand(2)), eps, atol=1e-4)
    # the trajectory moves: later states differ from the start
    assert (records[-1].x_t - records[0].x_t).abs().mean() > 0.01


def test_conditioning_expand_and_cat():
    c = Conditioning(torch.randn(1, 4, 8), {"pooled": torch.randn(1, 3)})
    e = c.expand(3)
    assert e.context.shape == (3, 4, 8) and e.extra["pooled"].shape == (3, 3)
    both = Conditioning.cat([e, c])
    assert len(both) == 4 and torch.equal(both.extra["pooled"][3], c.extra["pooled"][0])
