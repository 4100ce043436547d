"""The side-by-side benchmark and the re-sampling reference: what they write, and that they resume."""
import json

import torch

import pytest

from erasure_core.toy.benchmark import markdown, run_benchmark
from erasure_core.toy.evaluation import ErasureTarget, erasure_items
from erasure_core.toy.vocabulary import ToyVocabulary
from erasure_core.cli import main
from erasure_core.engine import ResamplingSource, TrainConfig


def test_benchmark_writes_rows_with_base_values_and_resumes(toy_model, oracle, tmp_path):
    config = TrainConfig(concept="", steps=2)
    results = run_benchmark(toy_model, oracle, ["uce"], ["stripes"], config, tmp_path, seeds_per_cell=1,
                            sample_steps=2)
    (row,) = results["rows"]
    assert row["target"] == "stripes" and row["method"] == "uce"
    assert row["patch_bytes"] == (tmp_path / "stripes-uce.safetensors").stat().st_size
    for key in ("ua", "ua_syn", "ira", "cra", "fd", "drift"):
        assert 0.0 <= row[key] and key in row["base"]
    assert row["base"]["drift"] == 0.0 and row["drift"] > 0.0
    table = (tmp_path / "bench.md").read_text()
    assert table.startswith("| target | method |") and "| stripes | uce |" in table
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == results["rows"]
    # a rerun with the same settings finds the row done and trains nothing
    (tmp_path / "stripes-uce.safetensors").unlink()
    again = run_benchmark(toy_model, oracle, ["uce"], ["stripes"], config, tmp_path, seeds_per_cell=1, sample_steps=2)
    assert again["rows"] == results["rows"] and not (tmp_path / "stripes-uce.safetensors").exists()
    assert markdown(again) + "\n" == table


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
