"""The WebUI extension (scripts/concept_erasure.py, install.py) loaded into contract fakes of AUTOMATIC1111's and
Forge's modules.scripts, modules.script_callbacks, processing, infotext and settings."""
import os
import runpy
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from webui_fakes import (FakeForgeModel, FakeInitialModel, FakeLatentDiffusion, checksum, forge_host, hook_counts,
                         installed, one_thread)

from erasure_core.patch import ConceptMemory, ErasurePatch, WeightDelta, save_patch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "concept_erasure.py"


@pytest.fixture(scope="module")
def toy_ldm():
    from erasure_core.toy.model import load_toy_model

    with one_thread():
        toy = load_toy_model()  # its own copy: the fake re-routes its attention
        yield toy, FakeLatentDiffusion(toy)


@pytest.fixture
def webui(tmp_path, toy_ldm):
    """The fake WebUI with the extension's script loaded and its txt2img UI built."""
    import gradio as gr

    with installed(), one_thread():
        from modules import paths, script_callbacks, scripts, shared

        paths.models_path = str(tmp_path / "models")
        shared.sd_model = toy_ldm[1]
        scripts.load_scripts([str(SCRIPT)])
        script_callbacks.before_ui_callback()
        runner = scripts.ScriptRunner()
        runner.initialize_scripts(is_img2img=False)
        with gr.Blocks():
            runner.setup_ui()
        yield runner, tmp_path / "models" / "erasures", toy_ldm
        script_callbacks.script_unloaded_callback()


def script_module():
    from modules import scripts

    return scripts.scripts_data[0][2]


def make_patch(toy, seed=0, deltas=True):
    from erasure_core.layers import attn2_layers
    from erasure_core.patch import model_fingerprint

    g = torch.Generator().manual_seed(seed)
    layers = [layer.canonical for layer in attn2_layers(toy.unet)]
    patch = ErasurePatch(layers=layers, memory=ConceptMemory(torch.randn(4, 128, generator=g),
                                                             2 * torch.randn(4, 128, generator=g)),
                         concepts=["circle"], base_model="toy", base_fingerprint=model_fingerprint(toy.unet))
    if deltas:
        patch.deltas[f"{layers[1]}.to_v"] = WeightDelta(full=0.2 * torch.randn(128, 128, generator=g))
    return patch


def args_for(runner, *slots):
    """script_args with the given (name, strength) pairs in the accordion's slots."""
    args = runner.default_args()
    script = runner.alwayson_scripts[0]
    for i, (name, strength) in enumerate(slots):
        args[script.args_from + 2 * i: script.args_from + 2 * i + 2] = [name, strength]
    return args


def generate(runner, sd_model, args, seed=3, prompt="a circle"):
    from modules import processing, shared

    seen = []
    watched = sd_model.ldm if hasattr(sd_model, "ldm") else sd_model
    p = processing.StableDiffusionProcessing(sd_model, prompt=prompt, seed=seed, steps=3, script_args=args,
                                             scripts=runner, observe=lambda p: seen.append(hook_counts(watched)))
    shared.state.begin(job="txt2img")
    return processing.process_images(p), seen


def test_the_script_registers_with_the_webui(webui):
    from modules import script_callbacks, shared

    runner, folder, _ = webui
    (script,) = runner.alwayson_scripts
    assert script.title() == "Concept Erasure" and script.alwayson
    assert script.args_to - script.args_from == 8  # four (patch, strength) slots
    assert [name for _, name in runner.infotext_fields][:2] == ["Erasure 1 patch", "Erasure 1 strength"]
    assert runner.paste_field_names == [name for _, name in runner.infotext_fields]
    for kind in ("ui_tabs", "ui_settings", "infotext_pasted", "script_unloaded"):
        assert script_callbacks.callbacks[kind], kind
    script_callbacks.ui_settings_callback()
    assert shared.opts.data["erasure_patch_dir"] == ""
    assert script_module().patch_folder() == folder
    shared.opts.erasure_patch_dir = "/somewhere/else"
    assert str(script_module().patch_folder()) == "/somewhere/else"
    (tab, title, elem_id), = script_callbacks.ui_tabs_callback()
    assert title == "Concept Erasure" and elem_id == "concept_erasure" and type(tab).__name__ == "Blocks"


def test_a1111_hooks_live_only_during_generation(webui):
    runner, folder, (toy, sd_model) = webui
    save_patch(make_patch(toy), folder / "circle.safetensors")
    before = checksum(sd_model)
    plain, seen_plain = generate(runner, sd_model, args_for(runner))
    erased, seen = generate(runner, sd_model, args_for(runner, ("circle", 0.8)))
    assert seen_plain and all(counts == (0, 0) for counts in seen_plain)
    assert seen and all(pre == 8 and post == 1 for pre, post in seen)  # to_k + to_v in 4 layers; 1 delta
    assert hook_counts(sd_model) == (0, 0) and checksum(sd_model) == before
    assert not torch.equal(plain.images[0], erased.images[0])
    again, _ = generate(runner, sd_model, args_for(runner))
    assert torch.equal(again.images[0], plain.images[0])  # nothing left behind
    from erasure_core.ui import short_hash

    assert f'Erasure: "circle: 0.8 [{short_hash(folder / "circle.safetensors")}]"' in erased.info
    assert "Erasure" not in plain.info


def test_strength_zero_is_bit_identical_and_patches_stack(webui):
    runner, folder, (toy, sd_model) = webui
    save_patch(make_patch(toy, 0), folder / "a.safetensors")
    save_patch(make_patch(toy, 1, deltas=False), folder / "sub" / "b.safetensors")
    plain, _ = generate(runner, sd_model, args_for(runner))
    zero, seen = generate(runner, sd_model, args_for(runner, ("a", 0.0)))
    assert torch.equal(zero.images[0], plain.images[0]) and all(c == (0, 0) for c in seen)
    both, seen = generate(runner, sd_model, args_for(runner, ("a", 1.0), ("sub/b", 0.5)))
    assert all(c == (8, 1) for c in seen) and hook_counts(sd_model) == (0, 0)  # one hook holds both memories
    assert 'a: 1 [' in both.info and 'sub/b: 0.5 [' in both.info


def test_a_failed_generation_leaves_hooks_only_until_the_next_one_or_unload(webui):
    from modules import processing, script_callbacks

    runner, folder, (toy, sd_model) = webui
    save_patch(make_patch(toy), folder / "circle.safetensors")
    p = processing.StableDiffusionProcessing(sd_model, script_args=args_for(runner, ("circle", 1.0)), scripts=runner)
    runner.process(p)  # then sampling fails: postprocess never runs
    assert hook_counts(sd_model) != (0, 0)
    _, seen = generate(runner, sd_model, args_for(runner))
    assert all(c == (0, 0) for c in seen)
    runner.process(p)
    script_callbacks.script_unloaded_callback()
    assert hook_counts(sd_model) == (0, 0)


@pytest.mark.parametrize("forge", [False, True])
def test_a_prompt_tag_applies_a_patch_exactly_as_the_accordion_does(webui, forge):
    from modules import extra_networks

    runner, folder, (toy, sd_model) = webui
    assert isinstance(extra_networks.extra_network_registry.get("erasure"), extra_networks.ExtraNetwork)
    save_patch(make_patch(toy), folder / "circle.safetensors")
    model, before = FakeForgeModel(sd_model) if forge else sd_model, checksum(sd_model)
    by_accordion, _ = generate(runner, model, args_for(runner, ("circle", 1.0)))
    by_tag, seen = generate(runner, model, args_for(runner), prompt="a circle <erasure:circle:1>")
    plain, _ = generate(runner, model, args_for(runner))
    zero, _ = generate(runner, model, args_for(runner), prompt="a circle <erasure:circle:0>")
    assert torch.equal(by_tag.images[0], by_accordion.images[0])
    assert not torch.equal(by_tag.images[0], plain.images[0]) and torch.equal(zero.images[0], plain.images[0])
    assert "<erasure:circle:1>" in by_tag.info and 'Erasure in prompt: "circle: 1' in by_tag.info
    assert forge or (seen and all(c != (0, 0) for c in seen))
    assert hook_counts(sd_model) == (0, 0) and checksum(sd_model) == before


@pytest.mark.parametrize("tag, reason", [("<erasure:nothere:1>", "no patch 'nothere'"),
                                         ("<erasure:circle:strong>", "the strength must be a number")])
def test_a_bad_prompt_tag_stops_the_generation_and_says_why(webui, tag, reason):
    runner, folder, (toy, sd_model) = webui
    save_patch(make_patch(toy), folder / "circle.safetensors")
    processed, seen = generate(runner, sd_model, args_for(runner), prompt=f"a circle {tag}")
    assert processed.images == [] and seen == [] and reason in processed.comments
    assert reason in processed.extra_generation_params["Concept Erasure refused"]


def test_a_broken_patch_stops_the_generation_and_says_why_where_users_look(webui, capsys):
    from modules import shared

    runner, folder, (toy, sd_model) = webui
    folder.mkdir(parents=True)
    (folder / "broken.safetensors").write_bytes(b"\x80\x04not a patch")
    before = checksum(sd_model)
    processed, seen = generate(runner, sd_model, args_for(runner, ("broken", 1.0)))
    assert processed.images == [] and seen == [] and not shared.state.interrupted  # progress state left clean
    assert "pickle" in capsys.readouterr().err
    reason = processed.extra_generation_params["Concept Erasure refused"]  # the API's info
    assert "pickle" in reason and "\n" not in reason and "Concept Erasure refused: " in processed.info
    assert processed.comments.startswith("Concept Erasure: ") and "pickle" in processed.comments  # under the gallery
    assert hook_counts(sd_model) == (0, 0) and checksum(sd_model) == before


def test_the_accordion_says_under_each_slot_from_which_strength_the_patch_erases(webui):
    runner, folder, (toy, _) = webui
    measured = make_patch(toy)
    measured.metrics["strength"] = {"ua": {"0.5": 0.12, "0.75": 1.0, "1.0": 1.0}, "erases_from": 0.75}
    save_patch(measured, folder / "circle.safetensors")
    save_patch(make_patch(toy, seed=1), folder / "unmeasured.safetensors")
    note = script_module().strength_note
    assert note("circle", 1.0) == "erases from strength 0.75 up (measured UA 1.00 at 1, UA 0.12 at 0.5)"
    assert note("circle", 0.5).startswith("⚠ at strength 0.5 this patch erases much less than at 1")
    assert "not measured" in note("unmeasured", 1.0) and note("None", 1.0) == ""
    assert note("missing", 1.0).startswith("⚠ no patch")
    script = runner.alwayson_scripts[0]
    assert script.args_to - script.args_from == 8  # the notes are not script args: name and strength per slot


def test_paste_restores_the_accordion_and_finds_a_renamed_patch_by_hash(webui):
    from modules import infotext_utils

    runner, folder, (toy, sd_model) = webui
    save_patch(make_patch(toy), folder / "circle.safetensors")
    erased, _ = generate(runner, sd_model, args_for(runner, ("circle", 0.8)))
    values = infotext_utils.paste(erased.info, runner.infotext_fields)
    assert values[:4] == ["circle", 0.8, "None", 1.0] and values[4:] == ["None", 1.0, "None", 1.0]
    shutil.move(folder / "circle.safetensors", folder / "renamed.safetensors")
    assert infotext_utils.paste(erased.info, runner.infotext_fields)[:2] == ["renamed", 0.8]
    plain, _ = generate(runner, sd_model, args_for(runner))
    assert infotext_utils.paste(plain.info, runner.infotext_fields) == [None] * 8  # left as it is


def test_forge_applies_through_the_unet_patcher_before_every_sampling(webui):
    runner, folder, (toy, sd_model) = webui
    forge = FakeForgeModel(sd_model)
    original = forge.forge_objects_after_applying_lora.unet
    save_patch(make_patch(toy), folder / "circle.safetensors")
    before = checksum(sd_model)
    hooked, _ = generate(runner, sd_model, args_for(runner, ("circle", 0.8)))
    patched, seen = generate(runner, forge, args_for(runner, ("circle", 0.8)))
    assert seen and all(c == (0, 0) for c in seen)  # no hooks in Forge: the patcher carries the patch
    assert (patched.images[0] - hooked.images[0]).abs().max() < 1e-4  # the same erasure as A1111's hooks
    assert original.model_options == {"transformer_options": {}} and original.lora_patches == {}
    plain, _ = generate(runner, forge, args_for(runner))
    a1111_plain, _ = generate(runner, sd_model, args_for(runner))
    assert torch.equal(plain.images[0], a1111_plain.images[0])
    assert checksum(sd_model) == before and 'Erasure: "circle: 0.8 [' in patched.info


def test_the_tab_trains_on_the_loaded_model_through_shared_state(webui):
    from modules import script_callbacks, shared

    from erasure_core.ui import TabRequest, TrainJob

    runner, folder, (toy, sd_model) = webui
    module = script_module()
    before = checksum(sd_model)
    request = TabRequest(concept="circle", method="memory-only", steps=3, tokens=2, cache_seeds=1, cache_steps=2,
                           preview_images=1, preview_steps=2, output="circle-tab")
    model_for_tab = lambda: module.ldm.LdmDenoiser(shared.sd_model, resolution=32, latent_scale=1)  # noqa: E731
    job = TrainJob(model_for_tab, module.patch_folder, request, module.WebUIHost()).start()
    job.join(120)
    assert job.state.stage == "done", job.state.error
    assert (folder / "circle-tab.safetensors").is_file() and job.state.preview is not None
    assert ("begin", "concept-erasure") in shared.state.history
    assert shared.state.history[-1] == ("end", "concept-erasure", 3, 3)
    assert checksum(sd_model) == before and hook_counts(sd_model) == (0, 0)
    # the WebUI's Interrupt button cancels a run: nothing is written
    slow = TabRequest(concept="circle", method="memory-only", steps=500, tokens=2, cache_seeds=1, cache_steps=2,
                        preview_images=0, output="never")
    job = TrainJob(model_for_tab, module.patch_folder, slow, module.WebUIHost()).start()
    while job.state.done < 2 and not job.state.finished:
        time.sleep(0.05)
    shared.state.interrupt()
    job.join(60)
    assert job.state.stage == "cancelled" and not (folder / "never.safetensors").exists()
    assert checksum(sd_model) == before and hook_counts(sd_model) == (0, 0)
    # what the tab uses in A1111: the loaded model, inputs on the WebUI's device
    model = module.loaded_model()
    assert model.sd_model is sd_model and model.device == torch.device("cpu") and len(model.layer_names()) == 4
    # in Forge the tab says what to do instead, also before the first generation has loaded the model
    with forge_host():
        for placeholder in (FakeInitialModel(), FakeForgeModel(sd_model)):
            shared.sd_model = placeholder
            with pytest.raises(ValueError, match="training in Forge is not supported yet"):
                module.loaded_model()
    script_callbacks.script_unloaded_callback()


A1111_PINS = "GitPython==3.1.32\nPillow==9.5.0\nsafetensors==0.4.2\ntransformers==4.30.2\nbasicsr[x]==1.4.2  # ok\n" \
    "-e git+https://example.invalid/x#egg=x\n"


@pytest.mark.parametrize("missing, hub, expected", [
    (set(), "1.2.0", []),
    ({"diffusers"}, "1.2.0", ['install "diffusers>=0.30"']),
    ({"diffusers", "transformers"}, "0.20.3", ['install "diffusers>=0.30"', 'install "transformers"']),
])
def test_install_py_installs_only_what_is_missing_and_moves_no_webui_pin(monkeypatch, tmp_path, missing, hub,
                                                                         expected):
    import importlib.metadata

    (tmp_path / "requirements_versions.txt").write_text(A1111_PINS)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: hub if d == "huggingface_hub" else real(d))
    with installed():
        import launch

        monkeypatch.setattr(launch, "__file__", str(tmp_path / "launch.py"))
        launch.missing, launch.pip_calls[:] = set(missing), []
        constraints = []
        monkeypatch.setattr(launch, "run_pip", lambda command, desc=None: constraints.append(
            (command, Path(command.split(' -c "')[1].rstrip('"')).read_text().split())))
        runpy.run_path(str(ROOT / "install.py"))
    assert [command.split(" -c ")[0] for command, _ in constraints] == expected
    for _, pins in constraints:  # every pip call keeps every pin of the WebUI, its torch, and its hub below 1.0
        assert {"Pillow==9.5.0", "safetensors==0.4.2", "transformers==4.30.2", "basicsr==1.4.2",
                f"torch=={real('torch')}"} <= set(pins) and not any("git+" in p for p in pins)
        assert ("huggingface_hub<1.0" in pins) == (hub == "0.20.3")


def test_install_py_exits_0_where_comfyui_managers_run_it(tmp_path):
    """ComfyUI-Manager and comfy-cli run `python install.py` in the pack's folder after requirements.txt."""
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": os.environ.get("PATH", ""), "COMFYUI_PATH": str(tmp_path)})
    assert done.returncode == 0 and "nothing more to install" in done.stdout


@pytest.mark.parametrize("kind,by", [("saeuron", "accordion"), ("saeuron", "tag"), ("dumo", "accordion")])
def test_forge_refuses_an_inference_time_patch_before_drawing_anything(webui, kind, by):
    """Seen in the real Forge: a SAeUron patch refused only while sampling (process_before_every_sampling) had the
    error logged and the image drawn without the erasure. SAeUron and DuMo patches are refused in process() now,
    with the reason."""
    from conftest import random_branch_patch, random_sae_patch

    runner, folder, (toy, sd_model) = webui
    patch = random_sae_patch(128, "output_blocks.1.1", seed=1) if kind == "saeuron" else \
        random_branch_patch(toy.unet, seed=1)
    save_patch(patch, folder / "styles.safetensors")
    forge = FakeForgeModel(sd_model)
    slots, prompt = ([("styles", 1.0)], "a circle") if by == "accordion" else ([], "a circle <erasure:styles:1>")
    processed, seen = generate(runner, forge, args_for(runner, *slots), prompt=prompt)
    assert processed.images == [] and seen == []
    assert "Forge's unet patcher cannot" in processed.extra_generation_params["Concept Erasure refused"]
    off, _ = generate(runner, forge, args_for(runner, ("styles", 0.0)))  # strength 0: nothing to apply
    assert off.images
