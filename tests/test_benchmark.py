"""The side-by-side benchmark (protocol v2) and the re-sampling reference: what they write, that they resume, and
that no held-out concept reaches training."""
import json
from dataclasses import replace

import torch

import pytest

from erasure_core.toy.benchmark import markdown, run_benchmark
from erasure_core.toy.evaluation import (PHRASING_FAMILIES, ErasureTarget, ProtocolCounts, erasure_items,
                                         protocol_items, rate, wilson_interval)
from erasure_core.toy.world import concept, training_prompt
from erasure_core.toy.vocabulary import ToyVocabulary
from erasure_core.cli import main
from erasure_core.engine import ResamplingSource, TrainConfig
from erasure_core.methods import train_patch


TINY = ProtocolCounts(target_seeds=1, other_seeds=1, phrasing_seeds=1)


def test_benchmark_writes_v2_rows_with_intervals_and_base_values_and_resumes(toy_model, oracle, tmp_path,
                                                                            monkeypatch):
    import erasure_core.attacks as attacks

    # the control rate is test_attacks' (and a third of this test's time); here it is only carried into the row
    monkeypatch.setattr(attacks, "control_rate", lambda *a: {"rate": 0.25, "n": 4, "interval": [0.05, 0.7]})
    config = TrainConfig(concept="", steps=2)
    # what a row holds and that it resumes; the rates' meaning is tested where they are computed: 1 step does
    results = run_benchmark(toy_model, oracle, ["uce"], ["stripes"], config, tmp_path, {"stripes": "checker"},
                            preserve_modes=("named",), counts=TINY, sample_steps=1, stack=False)
    (row,) = results["rows"]
    assert row["target"] == "stripes" and row["method"] == "uce" and row["preserve"] == "named"
    assert row["patch_bytes"] == (tmp_path / "stripes-uce-named.safetensors").stat().st_size
    for key in ("ua", "ua_syn", "ira_heldout", "cra_heldout", "ira_preserved", "cra_preserved", "ua_half_strength"):
        entry = row[key]
        assert 0.0 <= entry["interval"][0] <= entry["rate"] <= entry["interval"][1] <= 1.0 and entry["n"] > 0
    assert row["ua"]["n"] == 8 and row["ira_heldout"]["n"] == 4 * 8 and row["cra_heldout"]["n"] == 5 * 7
    assert set(row["phrasings"]) == set(PHRASING_FAMILIES) and set(row["base"]["phrasings"]) == set(PHRASING_FAMILIES)
    assert row["alt"]["n"] == 8 and row["base"]["drift"] == 0.0 and row["drift"] > 0.0
    table = (tmp_path / "bench.md").read_text()
    assert table.startswith("| target | method | preserve | UA | held-out IRA | held-out CRA |")
    assert "| stripes | *unedited* |" in table and "| stripes → checker | uce | named |" in table
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == results["rows"]
    # a rerun with the same settings finds the row done and trains nothing
    (tmp_path / "stripes-uce-named.safetensors").unlink()
    again = run_benchmark(toy_model, oracle, ["uce"], ["stripes"], config, tmp_path, {"stripes": "checker"},
                          preserve_modes=("named",), counts=TINY, sample_steps=1, stack=False)
    assert again["rows"] == results["rows"] and not (tmp_path / "stripes-uce-named.safetensors").exists()
    assert markdown(again) + "\n" == table
    assert 0.0 < row["train_cpu_share"] <= 1.5
    for share, marked in ((0.4, True), (0.95, False)):  # 0.4: something else had most of the CPU
        again["rows"][0]["train_cpu_share"] = share
        (line,) = [x for x in markdown(again).splitlines() if x.startswith("| stripes → checker | uce |")]
        assert ("‡ |" in line) == marked == ("‡ trained while other work" in markdown(again))


def test_a_patch_left_by_an_interrupted_run_is_reused_only_with_its_measurements(toy_model, tmp_path, monkeypatch):
    """A run killed after a patch was saved but before its row: the patch is reused with the time, CPU share and
    memory measured when it was trained; one that recorded none of them is trained again, not timed as a load."""
    from erasure_core.patch import load_patch, save_patch
    import erasure_core.toy.benchmark as benchmark

    path, config = tmp_path / "stripes-uce-named.safetensors", TrainConfig(concept="", steps=2)
    train = lambda: benchmark._train(toy_model, config, "stripes", "uce", ["dots"], {}, path)  # noqa: E731
    _, first, memory, _ = train()
    trained, real = [], benchmark.train_patch
    monkeypatch.setattr(benchmark, "train_patch", lambda *a, **k: trained.append(1) or real(*a, **k))
    _, again, reused, _ = train()
    assert not trained and (again.seconds, reused.cpu_share, reused.peak_bytes) == (
        round(first.seconds, 2), round(memory.cpu_share, 2), memory.peak_bytes)
    patch = load_patch(path)
    del patch.training["cpu_share"]  # as written before the measurements were recorded
    save_patch(patch, path)
    benchmark._train(toy_model, config, "stripes", "uce", ["dots"], {}, path, measured=False)  # stacking: no times
    assert not trained
    train()
    assert trained == [1]


def test_a_training_setting_added_later_at_its_default_keeps_the_earlier_rows(tmp_path):
    from erasure_core.toy.benchmark import _earlier_state, _settings

    def settings(config):
        return _settings(config, TINY, 2, ("named",), [], "cpu")

    config = TrainConfig(concept="", steps=2)
    earlier = settings(config)
    del earlier["train"]["gradient_checkpointing"]  # as written before the field existed
    del earlier["train"]["candidate_exclude"]  # ... and a list field, whose default comes from a factory
    (tmp_path / "bench.json").write_text(json.dumps({"settings": earlier, "rows": [{"done": 1}]}))
    assert _earlier_state(tmp_path / "bench.json", settings(config))["rows"] == [{"done": 1}]
    other = settings(replace(config, gradient_checkpointing=True))  # the field at another value: rows anew
    assert _earlier_state(tmp_path / "bench.json", other)["rows"] == []


def test_a_changed_attack_setting_reruns_only_that_attack_on_finished_rows(toy_model, oracle, tmp_path, monkeypatch):
    import erasure_core.attacks as attacks

    calls = []

    def fake_report(denoiser, oracle, patches, target, names, base_entries=None, **_):
        calls.append((target, tuple(names), len(patches)))
        for n in names:
            base_entries.setdefault(n, ({"asr": 1.0, "n": 1, "interval": [0.2, 1.0]}, None))
        return {n: {"asr": 0.0, "n": 1, "interval": [0.0, 0.8], "base_asr": 1.0, "run": len(calls)} for n in names}

    monkeypatch.setattr(attacks, "attack_report", fake_report)
    # what this test follows is the attacks; the judging is the first test's (and costs most of the time), so
    # the model draws blank images here
    monkeypatch.setattr(toy_model, "generate", lambda prompts, *a, **k: torch.zeros(len(prompts), 3, 32, 32))
    nothing = {"rate": 0.0, "n": 1, "interval": [0.0, 0.8]}
    monkeypatch.setattr(attacks, "control_rate", lambda *a: nothing)
    monkeypatch.setattr("erasure_core.toy.benchmark.strength_curve", lambda *a, **k: {"0.5": nothing})
    config = TrainConfig(concept="", steps=2)
    run = lambda: run_benchmark(toy_model, oracle, ["uce"], ["star"], config, tmp_path,  # noqa: E731
                                preserve_modes=("named", "none"), counts=TINY, sample_steps=2,
                                attacks=["inversion", "ringabell"], stack=False)
    first = run()
    assert calls == [("star", ("inversion", "ringabell"), 1)]
    named_row, none_row = first["rows"]
    assert set(named_row["attacks"]) == {"inversion", "ringabell"} and "attacks" not in none_row
    default = attacks.settings_for
    monkeypatch.setattr(attacks, "settings_for", lambda name, quick=False: replace(default(name, quick), seed=7)
                        if name == "ringabell" else default(name, quick))
    trained = []
    monkeypatch.setattr("erasure_core.toy.benchmark.train_patch", lambda *a: trained.append(a))
    second = run()  # only Ring-A-Bell changed: it alone runs again, nothing is trained or judged again
    assert calls[1:] == [("star", ("ringabell",), 1)] and not trained
    row = second["rows"][0]
    assert list(row["attacks"]) == ["inversion", "ringabell"]
    assert row["attacks"]["inversion"]["run"] == 1 and row["attacks"]["ringabell"]["run"] == 2
    assert {k: v for k, v in row.items() if k != "attacks"} == {k: v for k, v in named_row.items() if k != "attacks"}
    assert second["settings"]["attacks"]["ringabell"]["seed"] == 7 and set(second["base_attacks"]["star"]) == {
        "inversion", "ringabell"}
    run()  # the same settings again: nothing to do
    assert len(calls) == 2


def test_stacked_patches_both_erase_and_report_retention_named_by_neither(toy_model, oracle):
    from erasure_core.toy.benchmark import _stacked_report

    patches = [(train_patch(toy_model, TrainConfig(concept=training_prompt(t), method="uce")).patch, 1.0)
               for t in ("circle", "stripes")]
    stacked = _stacked_report(toy_model, oracle, patches, "circle", "stripes", TINY, steps=4)
    for target in ("circle", "stripes"):  # both erasures hold with both patches attached, judged by the oracle
        assert stacked[f"ua_{target}"]["rate"] >= 0.75 and stacked["base"][f"ua_{target}"]["rate"] <= 0.25
    held = stacked["ira_heldout_circle_axis"]
    assert held["n"] == 3 * 7  # star, cross, ring (named by neither) x every style but the erased stripes
    assert {"cra_heldout_circle_axis", "ira_heldout_stripes_axis"} <= set(stacked)


def test_multi_trains_four_concepts_three_ways_and_resumes(toy_model, oracle, tmp_path, monkeypatch):
    """The bookkeeping of `bench --multi`: what each way trains and attaches, the preservation, the resume. The
    judging itself is joint_report, checked with the oracle above; erasing several concepts at once and in
    sequence is checked with the oracle in test_many_concepts.py."""
    import erasure_core.toy.multi_benchmark as multi

    judged = {}

    def fake_report(denoiser, oracle, patches, targets, named, counts, steps, base=None):
        judged[len(judged)] = [p for p, _ in patches]
        return {**{f"ua_{t}": {"rate": 1.0, "interval": [0.9, 1.0], "n": 8} for t in targets},
                "base": {f"ua_{t}": {"rate": 0.0, "interval": [0.0, 0.1], "n": 8} for t in targets}}

    monkeypatch.setattr(multi, "joint_report", fake_report)
    targets = ["circle", "star", "stripes", "dots"]
    prompts = [training_prompt(t) for t in targets]
    results = multi.run_multi_benchmark(toy_model, oracle, ["uce"], targets, TrainConfig(concept=""), tmp_path, TINY)
    assert [r["way"] for r in results["rows"]] == ["together", "sequence", "stacked"]
    together, sequence, stacked = judged.values()
    assert len(together) == 1 and together[0].concepts == prompts
    assert len(sequence) == 1 and sequence[0].concepts == prompts and len(sequence[0].training["on_top_of"]) == 1
    assert [p.concepts for p in stacked] == [[p] for p in prompts]
    named = results["settings"]["named"]
    assert named == ["square", "cross", "checker", "grid", "triangle", "zigzag"]  # 3 per axis: the rest held out
    assert together[0].preserve == [training_prompt(n) for n in named]
    assert set(sequence[0].preserve) == {training_prompt(n) for n in named} | set(prompts[:3])
    assert "one_concept_seconds" in results["rows"][2] and "| uce | sequence |" in (tmp_path / "multi.md").read_text()
    monkeypatch.setattr(multi, "train_patch", lambda *a, **k: pytest.fail("a finished way was trained again"))
    assert multi.run_multi_benchmark(toy_model, oracle, ["uce"], targets, TrainConfig(concept=""), tmp_path,
                                     TINY)["rows"] == results["rows"]


@pytest.mark.parametrize("target", ["circle", "star", "stripes", "dots"])
def test_no_held_out_concept_ever_reaches_a_training_request(toy_model, tmp_path, monkeypatch, target):
    import erasure_core.toy.benchmark as bench

    seen = []
    monkeypatch.setattr(bench, "train_patch", lambda model, config: _record(seen, model, config))
    named = ToyVocabulary().named_neighbours(target)
    heldout = set(ToyVocabulary().concepts()) - set(named) - {target}
    assert len(named) == 6 and len(heldout) == 9 and ToyVocabulary().default_alternative(target) in named
    for mode, kept in (("named", named), ("none", [])):
        bench._train(toy_model, TrainConfig(concept="", steps=1), target, "uce", kept,
                     {target: ToyVocabulary().default_alternative(target)}, tmp_path / f"{mode}.safetensors")
    trained_on = {w for config in seen for prompt in [config.concept, config.alternative, *config.preserve]
                  for w in prompt.split()}
    assert not trained_on & {w for name in heldout for w in training_prompt(name).split()} - {"a", "shape", "with"}
    assert seen[1].preserve == []
    for config, kept in zip(seen, (named, [])):  # nor may a candidate search (Adversarial Preservation's) find one
        scored_as_held_out = set(ToyVocabulary().concepts()) - set(kept) - {target}
        assert set(config.candidate_exclude) == {noun for name in scored_as_held_out for noun in concept(name).nouns}


def _record(seen, model, config):
    from erasure_core.methods import train_patch

    seen.append(config)
    return train_patch(model, config)


def test_protocol_items_have_enough_images_and_fixed_seeds():
    items = protocol_items(ErasureTarget.from_names("circle", "square"))
    assert len(items["target"]) == len(items["synonym"]) == 32 and len(items["other"]) == 56 * 2
    assert {k for k in items if k.startswith("phrasing:")} == {f"phrasing:{f}" for f in PHRASING_FAMILIES}
    assert all(len(items[f"phrasing:{f}"]) == 16 for f in PHRASING_FAMILIES)
    assert all("circle" not in i.prompt for i in items["synonym"])
    seeds = [i.seed for group in items.values() for i in group]
    assert len(seeds) == len(set(seeds)) and items == protocol_items(ErasureTarget.from_names("circle", "square"))


def test_wilson_intervals_on_known_counts():
    assert wilson_interval(0, 10) == (0.0, 0.2775)
    assert wilson_interval(5, 10) == (0.2366, 0.7634)
    assert wilson_interval(10, 10) == (0.7225, 1.0)
    assert rate(torch.tensor([True, False, False, False])) == {"rate": 0.25, "n": 4,
                                                              "interval": list(wilson_interval(1, 4))}
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@pytest.mark.parametrize("target", ["circle", "stripes"])
def test_a_sparse_evaluation_keeps_every_target_cell_and_spans_every_other_concept(target):
    erased = ErasureTarget.from_names(target)
    full, synonyms = erasure_items(erased, 1)
    sparse, sparse_synonyms = erasure_items(erased, 1, other_cells_every=3)
    on_target = lambda items: [i for i in items if erased.label(i) == erased.index]  # noqa: E731
    assert on_target(sparse) == on_target(full) and len(on_target(full)) == 8 and sparse_synonyms == synonyms
    others = [i for i in sparse if erased.label(i) != erased.index]
    assert len(others) in (18, 19) and set(others) <= set(full)  # 18 or 19: the lattice cells off the target row
    same_axis = {erased.label(i) for i in others}
    other_axis = {i.style if erased.axis == "object" else i.obj for i in others}
    assert same_axis == set(range(8)) - {erased.index} and other_axis == set(range(8))
    with pytest.raises(ValueError, match="at least 1"):
        erasure_items(erased, 1, other_cells_every=0)


def test_the_demo_grid_shows_every_target_cell_and_as_many_other_evaluated_cells():
    from erasure_core.toy.demo import grid_rows

    erased = ErasureTarget.from_names("circle")
    items, _ = erasure_items(erased, 1, other_cells_every=3)
    on, off = grid_rows(erased, items)
    assert sorted(items[k].style for k in on) == list(range(8)) and all(items[k].obj == 0 for k in on)
    assert len(off) == 8 and len(set(off)) == 8 and all(items[k].obj != 0 for k in off)
    assert len({items[k].obj for k in off}) >= 5  # spread over the other objects, not the first few


def test_preserved_concepts_are_every_other_concept_own_axis_first():
    default_preserve = ToyVocabulary().default_preserve
    assert default_preserve("circle")[:7] == ["square", "triangle", "diamond", "star", "cross", "heart", "ring"]
    assert default_preserve("circle")[7:] == ["plain", "stripes", "dots", "checker", "grid", "zigzag", "bars",
                                             "hatching"]
    assert "stripes" not in default_preserve("stripes") and len(default_preserve("stripes")) == 15


def test_bench_refuses_unknown_methods_and_concepts(tmp_path, capsys):
    assert main(["bench", "--methods", "magic", "--out-dir", str(tmp_path)]) == 2
    assert "unknown magic" in capsys.readouterr().err
    assert main(["bench", "--targets", "octagon", "--out-dir", str(tmp_path)]) == 2
    assert "octagon" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_resampling_source_draws_fresh_frozen_model_states(toy_model):
    source = ResamplingSource(toy_model, toy_model.encode(["a circle"]), toy_model.encode([""]), steps=4,
                              guidance=3.0)
    g = torch.Generator().manual_seed(0)
    first, second = source.draw(2, g), source.draw(2, g)
    assert first.x_t.shape == (2, *toy_model.sample_shape) and first.eps_concept.shape == first.x_t.shape
    assert not torch.equal(first.x_t, second.x_t)  # new noise every draw
    # the record's predictions are the frozen model's at that x_t
    with torch.no_grad():
        again = toy_model.predict_noise(first.x_t, first.t, toy_model.encode(["a circle"]).expand(2))
    assert torch.allclose(again, first.eps_concept, atol=1e-5)
