import json
import subprocess
import sys

import pytest
from PIL import Image

from erasure_core.cli import main


def test_generate_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["generate", "--prompt", "a red circle with stripes", "--n", "3", "--steps", "4",
                 "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.width > 3 * 32 * 4 and img.height > 32 * 4
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--out", "grid.jpg"], "must end in .png"),
    (["generate", "--prompt", "x", "--n", "0", "--out", "g.png"], "must be at least 1"),
    (["generate", "--prompt", "x", "--steps", "many", "--out", "g.png"], "expected a whole number"),
    (["generate", "--prompt", "x", "--guidance", "nan", "--out", "g.png"], "must be finite"),
    (["generate", "--prompt", "x", "--model", "/nonexistent", "--out", "g.png"], "neither a diffusers pipeline folder"),
    (["generate", "--out", "g.png"], "--prompt"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_console_entry_point_reports_user_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "erasure_core", "generate", "--prompt", "x", "--out", "a.gif"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("erasure: error:") and "Traceback" not in proc.stderr


def test_evaluate_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    assert main(["evaluate", "--seeds-per-cell", "1", "--steps", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("object_accuracy", "style_accuracy", "synonym_object_accuracy", "synonym_style_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert set(report["per_concept"]["objects"]) == {"circle", "square", "triangle", "diamond", "star", "cross",
                                                     "heart", "ring"}
    assert set(report["classifier"]) == {"object", "style", "colour"}
    assert report["settings"]["images"] == 128
    # far above chance (1/8) even with few sampling steps
    assert report["object_accuracy"] > 0.5 and report["style_accuracy"] > 0.5
