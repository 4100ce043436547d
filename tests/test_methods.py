"""Every registered method, trained briefly on the toy model and judged by the oracle.

The unedited model draws a circle for "a circle" on every one of TARGET_SEEDS, and the prompted object for each
of OTHERS (checked first, so that every verdict below can fail). With a method's patch attached, the circle must
be gone from most target seeds, and the other prompts must keep their objects.

The thresholds come from oracle counts measured with exactly these settings (trajectory cache of conftest, the
configs in CASES, 10 DDIM steps at guidance 3), on 6 target seeds and 6 other prompts (base model: 6/6 circles,
6/6 others right). Circles left on the 6 target seeds, measured: memory 1, memory-only 1, memory-key 0,
all-but-one → square 0 (6 squares), all-but-one 1, esd-x 0, esd-x-strict 0, esd-u 2, uce 1, uce → square 0
(6 squares), rece 1, adversarial-preservation 0, prune-esd 1, sdd 1, forget-me-not 0; every method kept 6 of 6
other prompts.
So MAX_LEFT = 2 and MIN_KEPT = 5 leave each method a margin of one seed; ESD-u, which erases a single object only
partly (as in bench/results/tuning.md), is allowed 3.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch

from erasure_core.denoiser import patched
from erasure_core.engine import TrainConfig
from erasure_core.layers import attn2_layers
from erasure_core.methods import get_method, method_names
from erasure_core.toy.world import OBJECT_NAMES

TARGET = "a circle"
TARGET_SEEDS = [100, 101, 102, 103, 104, 105]  # not the cache's seeds (0-3): noise the training never saw
OTHERS = [("a square", 100), ("a square", 101), ("a triangle", 100), ("a triangle", 101), ("a star", 100),
          ("a star", 101)]
SAMPLE_STEPS, GUIDANCE = 10, 3.0
PRESERVE = ["a square", "a triangle"]  # for the methods given a preservation list; "a star" is never preserved
MAX_LEFT = 2  # at most 2 of the 6 target seeds may still be judged circles (measured: 0 or 1)
MIN_KEPT = 5  # at least 5 of the 6 other prompts keep their object (measured: 6)


def config(method, **kw):
    # batch 4 and learning rates above the defaults, so that 10 to 80 steps erase (the suite's time budget)
    base = dict(concept=TARGET, method=method, steps=10, batch=4, tokens=4, cache_seeds=4, cache_steps=10, seed=0)
    base.update(kw)
    return TrainConfig(**base)


CASES = {
    "memory": config("memory", lr=5e-3, memory_lr=5e-2, steps=20),  # erasure steps alternate with memory steps
    # without a preservation list, memory-only at 20 steps erased the circle and every other object with it
    # (2 of 6 others kept): the tokens are appended to every prompt
    "memory-only": config("memory-only", memory_lr=5e-2, steps=20, preserve=PRESERVE),
    # the key restores only after 60 memory-steps-and-erasure-steps: 0 circles with the key at 40, 5 at 60, 6 at 80
    "memory-key": config("memory-key", lr=5e-3, memory_lr=5e-2, steps=80),
    "all-but-one → square": config("all-but-one", lr=5e-3, alternative="a square"),
    "all-but-one": config("all-but-one", lr=5e-3),
    "esd-x": config("esd-x", lr=5e-3),
    "esd-x-strict": config("esd-x-strict", lr=5e-3),  # = test_engine.small_config(): one run for both files
    # ESD-u moves every prompt: at 5e-4 without preservation it erased all 6 circles but kept only 4 of 8 others;
    # at batch 8, or 1e-4 to 4e-4, 3 to 5 circles were left
    "esd-u": config("esd-u", lr=5e-4, steps=20, preserve=PRESERVE),
    "uce": config("uce"),
    "uce → square": config("uce", alternative="a square"),
    "rece": config("rece", preserve=PRESERVE),
    # no list: the adversary's candidates come from the word list alone
    "adversarial-preservation": config("adversarial-preservation", lr=5e-3),
    "prune-esd": config("prune-esd", steps=30),  # pruned 1.7% of the attn2 weights
    # at 5e-3 the square turned into a cross on both seeds (4 of 6 kept); at 2e-3: 1 circle left, 6 of 6 kept
    "sdd": config("sdd", lr=2e-3, steps=20),
    # the paper's 35 steps at 5e-3 erased all 6 circles but turned a star into a cross; 50 at 3e-3 kept 6 of 6
    "forget-me-not": config("forget-me-not", lr=3e-3, steps=50),
}


@dataclass
class Verdict:
    target: list[str]  # the object the oracle saw for TARGET on each of TARGET_SEEDS
    others: list[str]  # ... and for each of OTHERS

    def count(self, name: str) -> int:
        return self.target.count(name)

    @property
    def kept(self) -> int:
        return sum(seen == prompt.removeprefix("a ") for seen, (prompt, _) in zip(self.others, OTHERS))


def judge(toy_model, oracle, patches=()) -> Verdict:
    prompts = [TARGET] * len(TARGET_SEEDS) + [p for p, _ in OTHERS]
    seeds = TARGET_SEEDS + [s for _, s in OTHERS]
    with patched(toy_model, list(patches)) if patches else nullcontext():
        images = toy_model.generate(prompts, seeds, steps=SAMPLE_STEPS, guidance=GUIDANCE)
    seen = [OBJECT_NAMES[i] for i in oracle.predict(images)["object"]]
    verdict = Verdict(seen[:len(TARGET_SEEDS)], seen[len(TARGET_SEEDS):])
    print(verdict)  # shown when a test fails
    return verdict


@pytest.fixture(scope="module")
def base(toy_model, oracle):
    return judge(toy_model, oracle)


def assert_erased(verdict: Verdict, base: Verdict, max_left: int = MAX_LEFT) -> None:
    assert base.target == ["circle"] * len(TARGET_SEEDS) and base.kept == len(OTHERS), f"the base model: {base}"
    assert verdict.count("circle") <= max_left, f"circles left: {verdict}"
    assert verdict.kept >= MIN_KEPT, f"other prompts lost their object: {verdict}"


def train(trained, case: str):
    """The case's run (shared through conftest's `trained`), checked against its method's spec."""
    cfg = CASES[case]
    result = trained(cfg)
    spec = get_method(cfg.method)
    assert (result.key is not None) == spec.makes_key
    assert len(result.losses) == (cfg.steps if spec.kind == "trained" else 0)
    assert result.patch.method == cfg.method and result.patch.concepts == [TARGET]
    return result


# SAeUron is judged on a style (tests/test_sae.py): the toy's SAE block erases styles; objects only partly, as
# in the paper (bench/results/saeuron_toy.json). DuMo too (tests/test_dumo.py): its branch, trained from zero,
# erases a style in 40 steps, the circle not in the 100 steps tried (the benchmark's rows train 200)
JUDGED_ELSEWHERE = {"saeuron", "dumo"}


def test_every_registered_method_is_judged():
    assert set(method_names()) <= {c.method for c in CASES.values()} | JUDGED_ELSEWHERE


def test_the_unedited_model_draws_every_prompt(base):
    assert base.target == ["circle"] * len(TARGET_SEEDS), base
    assert base.kept == len(OTHERS), base


def test_memory_erases(toy_model, oracle, trained, base):
    patch = train(trained, "memory").patch
    assert patch.memory.k.shape == (4, 128) and patch.deltas
    assert all(name.endswith(("to_k", "to_v")) for name in patch.deltas)
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)


def test_memory_only_erases_with_the_tokens_alone(toy_model, oracle, trained, base):
    patch = train(trained, "memory-only").patch
    assert patch.memory.k.shape == (4, 128) and not patch.deltas
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)


def test_memory_key_hides_and_the_key_restores(toy_model, oracle, trained, base):
    result = train(trained, "memory-key")
    patch, key = result.patch, result.key
    assert patch.memory is None and patch.deltas and key.memory is not None and not key.deltas
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)
    restored = judge(toy_model, oracle, [(patch, 1.0), (key, 1.0)])
    # measured 6 of 6 circles again (5 of 6 at 60 steps)
    assert restored.count("circle") >= 4, restored


def test_all_but_one_turns_the_target_into_the_alternative(toy_model, oracle, trained, base):
    patch = train(trained, "all-but-one → square").patch
    assert patch.deltas and all(name.endswith(("to_k", "to_v")) for name in patch.deltas)
    verdict = judge(toy_model, oracle, [(patch, 1.0)])
    assert_erased(verdict, base)
    assert verdict.count("square") >= 4, verdict  # measured 6 of 6


def test_all_but_one_without_an_alternative_erases(toy_model, oracle, trained, base):
    patch = train(trained, "all-but-one").patch
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)


@pytest.mark.parametrize("case, projections", [("esd-x", ("to_q", "to_k", "to_v", "to_out.0")),
                                               ("esd-x-strict", ("to_k", "to_v"))])
def test_esd_x_erases_on_its_projections(toy_model, oracle, trained, base, case, projections):
    patch = train(trained, case).patch
    layers = toy_model.layer_names()
    assert set(patch.deltas) == {f"{layer}.{p}" for layer in layers for p in projections}
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)


def test_esd_u_trains_only_outside_cross_attention_and_erases_most(toy_model, oracle, trained, base):
    patch = train(trained, "esd-u").patch
    assert patch.deltas and not any(".attn2." in name or name.startswith(("time_embed.", "out."))
                                    for name in patch.deltas)
    assert any(d.full.dim() == 4 for d in patch.deltas.values())  # ResBlock convs, not only linear layers
    # ESD-u only partly erases a single object (2 of 6 circles left, measured; 1 to 2 from 10 to 40 steps)
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base, max_left=3)


def test_uce_erases(toy_model, oracle, trained, base):
    patch = train(trained, "uce").patch
    assert patch.deltas and all(name.endswith(("to_k", "to_v")) for name in patch.deltas)
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)


def test_uce_turns_the_target_into_the_alternative(toy_model, oracle, trained, base):
    verdict = judge(toy_model, oracle, [(train(trained, "uce → square").patch, 1.0)])
    assert_erased(verdict, base)
    assert verdict.count("square") >= 4, verdict  # measured 6 of 6


def test_uce_is_the_closed_form_edit(toy_model, trained):
    """Exact algebra, no sampling: the edit maps the erased tokens towards the anchor's outputs and leaves the
    preserved ones nearly alone."""
    patch = trained(config("uce", preserve=["a square"])).patch
    layer = next(iter(patch.deltas))
    modules = dict(toy_model.unet.named_modules())
    diffusers_name = {a.canonical: a.diffusers for a in attn2_layers(toy_model.unet)}[layer.rsplit(".", 1)[0]]
    w = modules[f"{diffusers_name}.{layer.rsplit('.', 1)[1]}"].weight
    n = len(toy_model.tokenizer("a circle").input_ids)
    erased, anchor = toy_model.encode(["a circle"]).context[0, :n], toy_model.encode([""]).context[0, :n]
    kept = toy_model.encode(["a square"]).context[0, :n]
    delta = patch.deltas[layer].full
    assert (erased @ (w + delta).T - anchor @ w.T).norm() < 0.5 * (erased @ w.T - anchor @ w.T).norm()
    assert (kept @ delta.T).norm() < 0.2 * (kept @ w.T).norm()


def test_rece_erases(toy_model, oracle, trained, base):
    patch = train(trained, "rece").patch
    record = patch.training["rece"]
    assert set(record) == {"rounds", "kept_round", "chosen_by"} and len(record["rounds"]) == 4
    assert record["chosen_by"] == "oracle"  # the toy world has one: each round's edit was drawn and judged
    verdicts = [(r["validation"]["target_left"] + r["validation"]["preserved_lost"], r["score"])
                for r in record["rounds"]]
    assert verdicts[record["kept_round"]] == min(verdicts)
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)


def test_rece_without_an_oracle_keeps_the_round_of_the_best_closed_form_score(toy_model, monkeypatch):
    from erasure_core.methods.rece import train_rece

    monkeypatch.setattr(toy_model, "vocabulary", None)
    record = train_rece(toy_model, CASES["rece"]).patch.training["rece"]
    assert record["chosen_by"] == "closed form" and "validation" not in record["rounds"][0]
    assert record["rounds"][record["kept_round"]]["score"] == min(r["score"] for r in record["rounds"])


def test_adversarial_preservation_erases_and_records_what_it_preserved(toy_model, oracle, trained, base):
    patch = train(trained, "adversarial-preservation").patch
    found = patch.training["adversarial_preservation"]
    assert found["candidates"] > 8 and sum(count for _, count in found["most_drawn"]) > 0
    assert "circle" not in found["strongest_at_end"]
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)


def test_prune_esd_erases_by_removing_weights_and_nothing_else(toy_model, oracle, trained, base):
    patch = train(trained, "prune-esd").patch
    weights = toy_model.projection_weights()
    for name, delta in patch.deltas.items():
        cut = delta.full != 0
        assert torch.equal(delta.full[cut], -weights[name].detach().float()[cut])  # pruned entries go to 0 exactly
    pruned = patch.training["prune"]
    assert pruned["pruned"] == sum(int((d.full != 0).sum()) for d in patch.deltas.values()) > 0
    assert 0 < pruned["share"] < 0.1
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)


def test_sdd_ships_the_bias_corrected_average_of_its_weights_and_erases(toy_model, oracle, trained, base):
    from erasure_core.methods.sdd import EMA_DECAY

    patch = train(trained, "sdd").patch
    assert patch.training["sdd"] == {"ema_decay": EMA_DECAY,
                                     "bias_correction": round(1 / (1 - EMA_DECAY ** CASES["sdd"].steps), 4)}
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)


def test_forget_me_not_erases_by_turning_the_attention_away(toy_model, oracle, trained, base, circle_cache):
    from erasure_core.attention_maps import cross_attention_maps
    from erasure_core.methods.forget_me_not import attention_mass, concept_positions

    patch = train(trained, "forget-me-not").patch
    assert {name.rsplit(".attn2.", 1)[1] for name in patch.deltas} == {"to_k"}  # keys alone: queries stay
    assert_erased(judge(toy_model, oracle, [(patch, 1.0)]), base)
    cond = toy_model.encode([TARGET] * 8)
    positions = concept_positions(toy_model, TARGET, cond.context.shape[1])
    assert positions == list(range(2, cond.context.shape[1]))  # "circle", EOS and the padding after it
    assert patch.training["forget_me_not"]["positions"] == positions
    batch = circle_cache.draw(8, torch.Generator().manual_seed(1))
    mass = []
    for patches in ([], [(patch, 1.0)]):
        with torch.no_grad(), patched(toy_model, patches), \
                cross_attention_maps(toy_model.cross_attention_modules(), positions) as maps:
            toy_model.predict_noise(batch.x_t, batch.t, cond)
        mass.append(float(attention_mass(maps)))
    assert mass[1] < 0.6 * mass[0], mass


def test_the_adversary_climbs_towards_the_candidate_the_edit_harms_most():
    from erasure_core.methods.adversarial_preservation import _Reversed, hard_gumbel_softmax

    harm_per_candidate = torch.tensor([0.1, 0.0, 1.0, 0.2])
    logits = torch.nn.Parameter(torch.zeros(4))
    optimiser, generator = torch.optim.Adam([logits], lr=0.1), torch.Generator().manual_seed(0)
    for _ in range(30):  # the model's optimiser descends the loss; through the reversal the logits ascend it
        draws = hard_gumbel_softmax(_Reversed.apply(logits), 8, 2.0, generator)
        optimiser.zero_grad()
        (draws @ harm_per_candidate).mean().backward()
        optimiser.step()
    assert logits.argmax() == 2 and logits[2] > 1.0


def test_rece_solves_for_the_embedding_that_regenerates_the_concept_and_erases_it_too(toy_model):
    """Exact algebra: the derived rows minimise Σ‖W'c' − Wc‖² + λ‖c'‖² (zero gradient), and the next round's edit
    takes them towards the anchor."""
    from erasure_core.methods.rece import DERIVATION_RIDGE, regenerating_rows
    from erasure_core.methods.uce import closed_form_edit, prompt_rows

    erased, anchors, kept = prompt_rows(toy_model, config("rece", preserve=PRESERVE))
    original = {k: w.detach().double() for k, w in toy_model.projection_weights().items()}
    edited = closed_form_edit(original, erased, anchors, kept)
    found = regenerating_rows(original, edited, erased).requires_grad_()
    objective = sum((found @ edited[k].T - erased @ w.T).square().sum() for k, w in original.items()) \
        + DERIVATION_RIDGE * found.square().sum()
    objective.backward()
    assert found.grad.abs().max() < 1e-6 * objective.item()
    found = found.detach()
    again = closed_form_edit(original, torch.cat([erased, found]), torch.cat([anchors, anchors]), kept)

    def to_anchor(weights):
        return sum(float((found @ weights[k].T - anchors @ w.T).norm()) for k, w in original.items())
    assert to_anchor(again) < 0.7 * to_anchor(edited)


# esd-u changes layers outside attn2 by design; saeuron and dumo change no layer (they act at generation time)
@pytest.mark.parametrize("method", [m for m in method_names() if m not in ("esd-u", "saeuron", "dumo")])
def test_layers_limits_the_deltas_as_well_as_the_memory(toy_model, method):
    from erasure_core.layers import select_layers
    from erasure_core.methods import train_patch

    mid = select_layers(toy_model.layer_names(), "mid")
    assert 0 < len(mid) < len(toy_model.layer_names())
    config = TrainConfig(concept="a circle", method=method, steps=2, batch=2, cache_seeds=1, cache_steps=2,
                         layers="mid", alternative="a square" if get_method(method).needs_alternative else "",
                         lr=0.5 if method == "prune-esd" else None)  # so that 2 steps prune something
    result = train_patch(toy_model, config)
    for patch in filter(None, (result.patch, result.key)):
        assert all(any(name.startswith(layer + ".") for layer in mid) for name in patch.deltas), sorted(patch.deltas)
        assert patch.memory is None or set(patch.layers) == set(mid)
        assert patch.deltas or patch.memory is not None
