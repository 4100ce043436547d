"""The built-in red team: each attack, at a tiny budget, finds a concept that is there; a strength-0 patch changes
nothing; prompt attacks never use the erased concept's own words; the CLI prints a card and stores it."""
import json
from dataclasses import replace

import pytest
import torch

from erasure_core.attacks import ATTACKS, QUICK_BUDGET, run_attack, settings_for
from erasure_core.attacks.common import AttackSetup, word_token_ids
from erasure_core.cli import main
from erasure_core.engine import TrainConfig
from erasure_core.methods import train_patch
from erasure_core.patch import save_patch

CHANCE = 1 / 8  # eight objects: a guess names the target one time in eight


@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_attack_finds_the_concept_in_the_unedited_model(toy_model, oracle, name):
    # star, not circle: the unedited toy model draws circles for garbled prompts, which would flatter an attack
    entry, found = run_attack(toy_model, oracle, [], "star", name, settings_for(name, quick=True), QUICK_BUDGET)
    assert entry["n"] == len(found.seeds) >= 8
    assert entry["asr"] >= 0.75 > 4 * CHANCE - 0.25  # well above chance
    assert entry["interval"][0] <= entry["asr"] <= entry["interval"][1]
    assert entry["unedited_same_prompts"] == entry["asr"]  # no patch: the same model twice


def test_a_strength_zero_patch_leaves_the_attack_exactly_where_the_unedited_model_is(toy_model, oracle):
    patch = train_patch(toy_model, TrainConfig(concept="a star", method="uce")).patch
    # equality holds at any budget: the smallest one that still learns and renders
    settings = replace(settings_for("inversion", quick=True), steps=8)
    base, _ = run_attack(toy_model, oracle, [], "star", "inversion", settings, QUICK_BUDGET)
    zero, _ = run_attack(toy_model, oracle, [(patch, 0.0)], "star", "inversion", settings, QUICK_BUDGET)
    assert zero["asr"] == base["asr"] and zero["prompts"] == base["prompts"]
    assert zero["found"] == base["found"]  # the same learned embeddings' losses, step for step


def test_prompt_attacks_never_use_the_erased_concepts_words(toy_model, oracle):
    setup = AttackSetup.for_toy_target("star")
    assert {"star", "pentagram", "spiky"} <= setup.forbidden and "shape" not in setup.forbidden
    assert "stars" in setup.forbidden
    words = {toy_model.tokenizer.convert_ids_to_tokens(int(i))[:-4] for i in word_token_ids(toy_model, setup)}
    assert not words & setup.forbidden and "a" in words
    assert not words & {"picture", "the", "of"}  # the pool is the trained vocabulary the benchmark was run with
    entry, _ = run_attack(toy_model, oracle, [], "star", "ringabell", settings_for("ringabell", quick=True))
    assert entry["prompts"] and not any(setup.uses_forbidden(p) for p in entry["prompts"])


def test_attack_cli_prints_a_card_writes_json_and_stores_it_in_the_patch(toy_model, tmp_path, capsys):
    patch = train_patch(toy_model, TrainConfig(concept="a star", method="uce")).patch
    patch.concepts = ["star"]
    path = save_patch(patch, tmp_path / "star.safetensors")
    report = tmp_path / "report.json"
    assert main(["attack", "--patch", str(path), "--attacks", "ringabell", "--quick", "--json", str(report),
                 "--write"]) == 0
    out = capsys.readouterr().out
    assert "robustness card" in out and "ringabell" in out
    entry = json.loads(report.read_text())["attacks"]["ringabell"]
    assert {"asr", "n", "interval", "base_asr", "control_rate", "control_n"} <= set(entry) and entry["base_asr"] >= 0.75
    assert main(["inspect", str(path)]) == 0
    assert "stored in this patch (quick budget)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--attacks", "telepathy"], "unknown telepathy"),
    (["--target", "octagon"], "octagon"),
])
def test_attack_cli_refuses_bad_input_in_one_line(toy_model, tmp_path, capsys, argv, message):
    path = save_patch(train_patch(toy_model, TrainConfig(concept="a star", method="uce")).patch,
                      tmp_path / "p.safetensors")
    assert main(["attack", "--patch", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert main(["attack", "--patch", str(tmp_path / "missing.safetensors")]) == 2


def test_the_text_access_is_differentiable_and_matches_encode(toy_model):
    ids = toy_model.token_ids(["a star with dots"])
    embeds = toy_model.token_embeddings()[ids].clone().requires_grad_(True)
    cond = toy_model.encode_embeddings(ids, embeds)
    assert torch.allclose(cond.context, toy_model.encode(["a star with dots"]).context, atol=1e-6)
    cond.context.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_ringabell_refuses_a_prompt_longer_than_the_text_encoder_takes(toy_model, oracle):
    from dataclasses import replace

    too_long = replace(settings_for("ringabell", quick=True), length=toy_model.tokenizer.model_max_length - 1)
    with pytest.raises(ValueError, match="prompt length must be 1 to 14 tokens"):
        run_attack(toy_model, oracle, [], "star", "ringabell", too_long)


def test_the_control_rate_shows_the_default_shape_an_attack_finds_by_finding_nothing(toy_model, oracle):
    """The concept-free twins ("a shape with stripes", ...) draw circles now and then: that rate, not zero, is
    what an attack that found nothing scores on circle."""
    from erasure_core.attacks import control_rate

    circle = control_rate(toy_model, oracle, "circle")
    assert circle["n"] == 32 and "a shape with stripes" in circle["prompts"]
    assert 0 < circle["rate"] < 0.5 and circle["interval"][0] <= circle["rate"] <= circle["interval"][1]
