"""erasure_core.ui without a browser: the patch folder, the infotext entry, requests and the training job."""
import time

import pytest
from webui_fakes import one_thread

from erasure_core import ui


def test_infotext_round_trip_and_quoted_forms():
    entries = [ui.InfotextEntry("circle", 0.8, "0123456789"), ui.InfotextEntry("styles/stripes v2", 1.0, ""),
               ui.InfotextEntry("neg", -0.25, "abcdefabcd")]
    text = ui.format_infotext(entries)
    assert text == "circle: 0.8 [0123456789], styles/stripes v2: 1, neg: -0.25 [abcdefabcd]"
    assert ui.parse_infotext(text) == entries
    assert ui.parse_infotext('"' + text.replace('"', '\\"') + '"') == entries
    assert ui.parse_infotext("") == [] and ui.parse_infotext("garbage") == []


def test_patch_folder_listing_hashes_and_lookup(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b", "A", "sub/c"):
        (tmp_path / f"{name}.safetensors").write_bytes(name.encode())
    (tmp_path / "notes.txt").write_text("x")
    assert ui.list_patches(tmp_path) == ["A", "b", "sub/c"] and ui.list_patches(tmp_path / "nope") == []
    h = ui.short_hash(tmp_path / "b.safetensors")
    assert len(h) == 10 and ui.find_patch(tmp_path, "b", h) == "b"
    assert ui.find_patch(tmp_path, "gone", h) == "b" and ui.find_patch(tmp_path, "gone", "ffffffffff") is None
    assert ui.find_patch(tmp_path, "A") == "A"
    with pytest.raises(ValueError, match="outside"):
        ui.patch_path(tmp_path, "../escape")


@pytest.mark.parametrize("output, concept, expected", [
    ("", "circle", "circle-memory"), ("my patch.safetensors", "x", "my patch"), ("", "Van Gogh!", "Van-Gogh-memory"),
])
def test_output_names(output, concept, expected):
    assert ui.output_name(ui.TabRequest(concept=concept, output=output)) == expected


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "x" * 120])
def test_output_names_that_leave_the_folder_are_refused(bad):
    with pytest.raises(ValueError, match="output name"):
        ui.output_name(ui.TabRequest(concept="c", output=bad))


@pytest.fixture(scope="module")
def toy():
    from erasure_core.toy.model import load_toy_model

    with one_thread():
        yield load_toy_model()


@pytest.mark.parametrize("change, message", [
    (dict(concept=""), "name the concept"), (dict(concept="dragon"), "unknown concept 'dragon'"),
    (dict(method="nope"), "unknown method"), (dict(alternative="octagon"), "unknown concept 'octagon'"),
    (dict(steps=0), "steps must be"), (dict(steps=2.5), "steps must be"), (dict(lr=-1e-3), "learning rate"),
    (dict(layers="input_blocks.99.1.transformer_blocks.0.attn2"), "has no cross-attention layer"),
])
def test_bad_requests_are_one_line_and_write_nothing(toy, tmp_path, change, message):
    request = ui.TabRequest(**{**dict(concept="circle", steps=2), **change})
    job = ui.TrainJob(lambda: toy, tmp_path, request).start()
    job.join(30)
    assert job.state.stage == "failed" and message in job.state.error and "\n" not in job.state.error
    assert list(tmp_path.iterdir()) == []


def test_cancel_stops_training_writes_no_patch_and_the_same_run_resumes(toy, tmp_path):
    request = ui.TabRequest(concept="circle", method="memory-only", steps=1000, tokens=2, cache_seeds=1,
                              cache_steps=2, preview_images=0)
    with one_thread():
        job = ui.TrainJob(lambda: toy, tmp_path, request).start()
        second = ui.TrainJob(lambda: toy, tmp_path, request).start()
        assert second.state.finished and "already in progress" in second.state.error
        while (job.state.stage != "training" or job.state.done < 2) and not job.state.finished:
            time.sleep(0.02)
        job.cancel()
        job.join(60)
    assert job.state.stage == "cancelled" and "nothing was written" in job.state.error
    assert not list(tmp_path.glob("*.safetensors"))
    checkpoint, cache = sorted((tmp_path / ".checkpoints").iterdir(), key=lambda p: len(p.name))
    assert cache.name == checkpoint.stem + ".cache.pt"  # what the same settings resume from, without sampling
    assert "step" in ui.progress_html(job.state)
    stopped_at = job.state.done
    resumed = ui.TrainJob(lambda: toy, tmp_path, request)
    first_step, stages = [], []
    report = resumed._progress

    def progress(done, total, loss=None, stage="training"):
        stages.append(stage)
        if stage == "training":
            first_step.append(done)
        report(done, total, loss, stage)

    resumed._progress = progress
    resumed.cancelled = lambda: bool(first_step)  # one step past the checkpoint is enough to see where it began
    with one_thread():
        resumed.start().join(60)
    assert any("resuming" in m for m in resumed.state.messages)
    assert first_step[0] == stopped_at + 1  # continued from the checkpoint, not from step 1
    assert set(stages) == {"training"}  # and from the cache it left: nothing sampled again


def test_existing_output_is_not_overwritten(toy, tmp_path):
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    job = ui.TrainJob(lambda: toy, tmp_path, ui.TabRequest(concept="circle", output="taken")).start()
    job.join(30)
    assert "already exists" in job.state.error and (tmp_path / "taken.safetensors").read_bytes() == b"mine"


def test_the_tab_builds_with_the_installed_gradio(toy, tmp_path):
    tab = ui.build_tab(lambda: toy, tmp_path)
    ids = {getattr(block, "elem_id", None) for block in tab.blocks.values()}
    assert {"erasure_concept", "erasure_method", "erasure_train", "erasure_cancel", "erasure_progress",
            "erasure_preview", "erasure_on_top_of"} <= ids


def test_erasure_ui_binds_loopback_by_default_and_checks_the_port(capsys):
    from erasure_core.cli import build_parser, main

    args = build_parser().parse_args(["ui"])
    assert (args.host, args.port, args.model, args.patch_dir) == ("127.0.0.1", 7861, None, "erasures")
    assert main(["ui", "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err


def test_the_tab_trains_at_the_batch_and_resolution_asked_for(toy, tmp_path, monkeypatch):
    import erasure_core.engine as engine
    from erasure_core.patch import load_patch

    noise_shapes, real = [], engine.sample_trajectories
    monkeypatch.setattr(engine, "sample_trajectories",
                        lambda d, c, e, noise, *a, **k: noise_shapes.append(tuple(noise.shape)) or real(d, c, e, noise,
                                                                                                     *a, **k))
    request = ui.TabRequest(concept="circle", method="esd-x", steps=2, cache_seeds=1, cache_steps=2, batch=2,
                            resolution=64, preview_images=0)
    with one_thread():
        job = ui.TrainJob(lambda: toy, tmp_path, request).start()
        job.join(120)
    assert not job.state.error and noise_shapes == [(1, 3, 64, 64)]  # the toy model draws 32 px by itself
    assert load_patch(job.state.path).training["batch"] == 2 and toy.sample_shape == (3, 32, 32)
    bad = ui.TrainJob(lambda: toy, tmp_path, ui.TabRequest(concept="circle", resolution=50, output="b")).start()
    bad.join(30)
    assert "multiple of 4 pixels" in bad.state.error and not (tmp_path / "b.safetensors").exists()


def test_the_tab_trains_on_top_of_an_earlier_patch_and_keeps_its_erasure(toy, oracle, tmp_path):
    from erasure_core.denoiser import patched
    from erasure_core.patch import load_patch
    from erasure_core.toy.world import OBJECT_NAMES

    def tab_run(**fields):
        with one_thread():
            job = ui.TrainJob(lambda: toy, tmp_path, ui.TabRequest(method="uce", preview_images=0, **fields)).start()
            job.join(120)
        return job.state

    assert not tab_run(concept="circle", output="no circles").error
    missing = tab_run(concept="star", on_top_of=["gone"], output="x")
    assert "on top of 'gone'" in missing.error and not (tmp_path / "x.safetensors").exists()
    state = tab_run(concept="star", on_top_of=["no circles"])
    assert not state.error, state.error
    patch = load_patch(state.path)
    assert patch.concepts == ["circle", "star"] and patch.training["on_top_of"][0]["concepts"] == ["circle"]
    seeds = [100, 101, 102, 103]
    with patched(toy, [(patch, 1.0)]):
        images = toy.generate(["a circle"] * 4 + ["a star"] * 4 + ["a square"] * 4, seeds * 3, steps=10,
                              guidance=3.0)
    names = [OBJECT_NAMES[i] for i in oracle.predict(images)["object"]]
    assert "circle" not in names[:4] and "star" not in names[4:8] and names[8:].count("square") >= 3, names
