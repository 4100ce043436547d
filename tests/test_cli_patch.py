"""`erasure inspect` and `erasure generate --patch` on the toy model."""
import numpy as np
import pytest
import torch
from PIL import Image

from erasure_core.cli import main
from erasure_core.patch import ConceptMemory, ErasurePatch, model_fingerprint, save_patch


@pytest.fixture(scope="module")
def toy_patch(tmp_path_factory, toy_model):
    g = torch.Generator().manual_seed(0)
    d = toy_model.context_dim
    patch = ErasurePatch(layers=toy_model.layer_names(), memory=ConceptMemory(3 * torch.randn(4, d, generator=g),
                                                                              3 * torch.randn(4, d, generator=g)),
                         concepts=["circle"], base_model="toy", base_fingerprint=model_fingerprint(toy_model.unet))
    return save_patch(patch, tmp_path_factory.mktemp("p") / "circle.safetensors")


def _generate(tmp_path, name, *extra):
    out = tmp_path / name
    code = main(["generate", "--prompt", "a circle with dots", "--n", "2", "--steps", "4", "--out", str(out), *extra])
    return code, out


def pixels(path):
    return np.asarray(Image.open(path))


def test_inspect_prints_metadata(toy_patch, capsys):
    assert main(["inspect", str(toy_patch)]) == 0
    out = capsys.readouterr().out
    assert "valid erasure patch" in out and '["circle"]' in out and "erasure.memory.k (4, 128)" in out


def test_patch_strength_zero_is_identity_and_one_changes_images(toy_patch, tmp_path):
    _, plain = _generate(tmp_path, "plain.png")
    _, zero = _generate(tmp_path, "zero.png", "--patch", str(toy_patch), "--strength", "0")
    _, one = _generate(tmp_path, "one.png", "--patch", str(toy_patch))
    a, z, o = pixels(plain), pixels(zero), pixels(one)
    # the title line differs; compare the image rows below it
    assert np.array_equal(a[20:], z[20:])
    assert np.abs(a[20:].astype(int) - o[20:].astype(int)).mean() > 1


def test_other_fingerprint_warns_but_works(tmp_path, toy_model, capsys):
    patch = ErasurePatch(layers=toy_model.layer_names()[:1],
                         memory=ConceptMemory(torch.zeros(2, 128), torch.zeros(2, 128)),
                         base_model="another-toy", base_fingerprint="0123456789abcdef")
    path = save_patch(patch, tmp_path / "other.safetensors")
    code, out = _generate(tmp_path, "g.png", "--patch", str(path))
    assert code == 0 and out.exists()
    assert "warning" in capsys.readouterr().err


@pytest.mark.parametrize("kind, message", [("wrong_dim", "768-d text context"), ("wrong_layer", "lacks"),
                                           ("pickle", "pickle"), ("strengths", "one --strength per --patch")])
def test_bad_patches_are_user_errors_and_nothing_is_written(kind, message, tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    extra = ["--patch", str(path)]
    if kind == "wrong_dim":
        save_patch(ErasurePatch(layers=["middle_block.1.transformer_blocks.0.attn2"],
                                memory=ConceptMemory(torch.zeros(2, 768), torch.zeros(2, 768))), path)
    elif kind == "wrong_layer":
        save_patch(ErasurePatch(layers=["input_blocks.1.1.transformer_blocks.0.attn2"],
                                memory=ConceptMemory(torch.zeros(2, 128), torch.zeros(2, 128))), path)
    elif kind == "pickle":
        torch.save({"k": torch.zeros(1)}, path)
    else:
        save_patch(ErasurePatch(layers=["middle_block.1.transformer_blocks.0.attn2"],
                                memory=ConceptMemory(torch.zeros(2, 128), torch.zeros(2, 128))), path)
        extra += ["--strength", "1", "--strength", "0.5"]
    code, out = _generate(tmp_path, "g.png", *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["inspect", str(path)]) == (0 if kind in ("wrong_dim", "wrong_layer", "strengths") else 2)


def test_train_then_evaluate_a_patch(tmp_path, capsys):
    import json

    patch = tmp_path / "circle.safetensors"
    assert main(["train", "--concept", "circle", "--method", "uce", "--preserve", "square, stripes",
                 "--out", str(patch)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(patch), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["erasure.method"] == "uce" and json.loads(meta["erasure.preserve"]) == ["square", "stripes"]
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--patch", str(patch), "--seeds-per-cell", "1", "--steps", "2",
                 "--json", str(report_path)]) == 0  # the report's shape only: 2 sampling steps do
    report = json.loads(report_path.read_text())
    for key in ("ua", "ua_syn", "ira", "cra", "alt", "fd", "drift"):
        assert key in report and key in report["base"]
    assert report["alt"] is None and report["target"] == "circle"
    assert report["base"]["fd"] == 0.0 and report["base"]["drift"] == 0.0
    assert 0.0 <= report["ua"] <= 1.0 and report["drift"] > 0.0


def test_the_strength_measurement_finds_where_a_uce_patch_stops_erasing_and_the_patch_keeps_it(tmp_path, capsys):
    """The issue's observation: a UCE circle patch erases at 1 and leaks most circles at 0.5. The card stored in
    the patch says so, and `inspect` shows it. (UA here is the share of target prompts the oracle does not call
    circles.)"""
    import json

    patch = tmp_path / "circle.safetensors"
    assert main(["train", "--concept", "circle", "--method", "uce", "--out", str(patch)]) == 0
    report = tmp_path / "strength.json"
    assert main(["evaluate", "--patch", str(patch), "--strengths", "--write", "--seeds-per-cell", "1",
                 "--steps", "10", "--json", str(report)]) == 0
    card = json.loads(report.read_text())["strength"]
    assert card["ua"]["0.0"] <= 0.25 and card["ua"]["1.0"] >= 0.5 and card["ua"]["0.5"] <= card["ua"]["1.0"] - 0.4
    assert card["erases_from"] > 0.5 and card["n"] == 8
    capsys.readouterr()
    assert main(["inspect", str(patch)]) == 0
    assert f"erases from strength {card['erases_from']:g} up" in capsys.readouterr().out
    assert main(["evaluate", "--patch", str(patch), "--write"]) == 2  # --write stores only a strength card


def test_train_refuses_unknown_concepts_and_layers(tmp_path, capsys):
    assert main(["train", "--concept", "octagon", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "unknown concept" in capsys.readouterr().err
    assert main(["train", "--concept", "circle", "--layers", "input_blocks.1.1.transformer_blocks.0.attn2",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no cross-attention layer" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_train_takes_batch_and_resolution_and_refuses_a_resolution_the_model_cannot(tmp_path, capsys, monkeypatch):
    import json

    import erasure_core.engine as engine

    shapes, real = [], engine.sample_trajectories
    # records the noise's shape, then samples 2 of the trajectories at 3 steps: this test follows the sizes only
    monkeypatch.setattr(engine, "sample_trajectories",
                        lambda d, c, e, noise, steps, *a, **k: shapes.append(tuple(noise.shape))
                        or real(d, c, e, noise[:2], 3, *a, **k))
    out = tmp_path / "small.safetensors"
    assert main(["train", "--concept", "circle", "--method", "esd-x", "--preserve", "none", "--steps", "2",
                 "--batch", "2", "--resolution", "64", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(json.loads(capsys.readouterr().out)["erasure.training"])["batch"] == 2
    assert shapes and all(shape[-2:] == (64, 64) for shape in shapes)
    assert main(["train", "--concept", "circle", "--resolution", "50", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "multiple of 4 pixels" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_demo_writes_the_before_after_grid_and_metrics(tmp_path):
    import json

    out = tmp_path / "demo"
    assert main(["demo", "--concept", "stripes", "--method", "esd-x", "--steps", "2", "--sample-steps", "2",
                 "--out-dir", str(out)]) == 0
    grid = Image.open(out / "before_after.png")
    assert grid.width > 4 * 32 * 3 and grid.height > 8 * 32 * 3
    report = json.loads((out / "metrics.json").read_text())
    assert report["target"] == "stripes" and report["method"] == "esd-x" and "base" in report
    assert (out / "stripes.safetensors").exists()
