"""The node pack inside a fake ComfyUI process (tests/comfy_fakes/host.py): import, folder registration, and every
node run the way ComfyUI runs nodes (under torch.inference_mode(), on weights created in inference mode)."""
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfy_fakes import FakeModelPatcher, ModelManagement, build_comfy_model, calc_cond_batch
from comfy_fakes.host import FakeCLIP, FakeVAE, ProgressBarLog, execute, installed, load_pack
from comfy_fakes.host import one_thread  # noqa: F401  (autouse fixture)
from erasure_core.engine import CACHE_STAGE, TRAIN_STAGE
from erasure_core.patch import ConceptMemory, ErasurePatch, WeightDelta, save_patch

ROOT = Path(__file__).resolve().parents[1]


def checksum(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pack():
    return load_pack(ROOT, "comfyui-concept-erasure")


@pytest.fixture
def host(tmp_path):
    with installed(str(tmp_path)) as fake:
        yield fake


@pytest.fixture(scope="module")
def toy_comfy(toy_model):
    from erasure_core.toy.model import train_scheduler

    model = build_comfy_model(toy_model.unet, betas=train_scheduler().betas, downscale=1)
    return model, FakeCLIP(toy_model.tokenizer, toy_model.text_encoders[0])


def toy_patch(toy_model, seed=0, scale=1.0):
    names = toy_model.layer_names()
    g = torch.Generator().manual_seed(seed)
    memory = ConceptMemory(scale * torch.randn(4, 128, generator=g), scale * torch.randn(4, 128, generator=g))
    return ErasurePatch(layers=names, memory=memory, concepts=["a circle"], method="memory-only",
                        deltas={f"{names[1]}.to_v": WeightDelta(full=0.05 * torch.randn(128, 128, generator=g))})


# -- importing the pack ----------------------------------------------------------------------------------------------

IMPORT_CHECK = r"""
import importlib.util, json, os, sys, types
pack = sys.argv[1]
assert importlib.util.find_spec("erasure_core") is None, "erasure_core should not be installed here"
assert "comfy" not in sys.modules and "folder_paths" not in sys.modules

def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(pack, "__init__.py"),
                                                  submodule_search_locations=[pack])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

plain = load("comfyui-concept-erasure")
fp = types.ModuleType("folder_paths")
fp.models_dir = os.path.join(pack, "models")
fp.folder_names_and_paths = {"erasures": (["/user/erasures"], set())}  # from extra_model_paths.yaml
sys.modules["folder_paths"] = fp
with_comfy = load("ComfyUI-Concept-Erasure-2")
print(json.dumps({
    "ids": [sorted(plain.NODE_CLASS_MAPPINGS), sorted(with_comfy.NODE_CLASS_MAPPINGS)],
    "names": sorted(plain.NODE_DISPLAY_NAME_MAPPINGS),
    "core": os.path.dirname(sys.modules["erasure_core"].__file__),
    "pack_on_path": pack in sys.path,
    "top_level_nodes": "nodes" in sys.modules,
    "erasures": [fp.folder_names_and_paths["erasures"][0], sorted(fp.folder_names_and_paths["erasures"][1])],
}))
"""


def test_pack_imports_in_a_bare_python_with_and_without_comfyui(tmp_path):
    """Acceptance: the root __init__ imports where ComfyUI is absent and where it is present, from a folder whose
    name has hyphens, with erasure_core not installed, and registers only prefixed node ids."""
    import shutil

    pack = tmp_path / "comfyui-concept-erasure"
    ignore = shutil.ignore_patterns("__pycache__", "assets", "*.pyc")
    shutil.copytree(ROOT / "nodes", pack / "nodes", ignore=ignore)
    shutil.copytree(ROOT / "erasure_core", pack / "erasure_core", ignore=ignore)
    shutil.copy(ROOT / "__init__.py", pack / "__init__.py")
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # -S: no site processing, so the editable install of erasure_core (a .pth finder) is not active
    run = subprocess.run([sys.executable, "-S", "-c", IMPORT_CHECK, str(pack)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    ids_plain, ids_comfy = result["ids"]
    assert ids_plain == ids_comfy and len(ids_plain) == 6
    assert all(name.startswith("ConceptErasure") for name in ids_plain)
    assert result["names"] == ids_plain
    assert result["core"] == str(pack / "erasure_core")
    assert not result["pack_on_path"] and not result["top_level_nodes"]  # nothing shadows ComfyUI's `nodes`
    assert result["erasures"] == [["/user/erasures", str(pack / "models" / "erasures")], [".safetensors"]]


def test_every_node_is_documented_and_categorised(pack, host):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("ConceptErasure")
        assert cls.CATEGORY == "conditioning/erasure"
        assert len(cls.DESCRIPTION) > 40 and callable(getattr(cls, cls.FUNCTION))
        spec = cls.INPUT_TYPES()
        for section in (spec.get("required", {}), spec.get("optional", {})):  # "hidden" is not shown to users
            for name, (kind, *options) in section.items():
                assert options and options[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES)


# -- load and save ---------------------------------------------------------------------------------------------------

def test_save_then_load_through_the_nodes(pack, host, toy_model, tmp_path):
    nodes = pack.NODE_CLASS_MAPPINGS
    user_dir = tmp_path / "shared_patches"
    host.folder_paths.folder_names_and_paths["erasures"] = ([str(user_dir)], set())  # user-configured
    save_patch(toy_patch(toy_model, seed=5), user_dir / "theirs.safetensors")
    (Path(host.folder_paths.models_dir) / "erasures").mkdir(parents=True)
    (Path(host.folder_paths.models_dir) / "erasures" / "old.pt").write_bytes(b"\x80\x04not a patch")
    patch = toy_patch(toy_model)
    out = execute(nodes["ConceptErasureSavePatch"], erasure_patch=patch, filename="../circle", title="no circles")
    assert out["ui"]["text"] == ["saved models/erasures/circle.safetensors"]
    execute(nodes["ConceptErasureSavePatch"], erasure_patch=patch, filename="circle.safetensors")
    listed = nodes["ConceptErasureLoadPatch"].INPUT_TYPES()["required"]["patch_name"][0]
    assert listed == ["circle.safetensors", "circle_00001.safetensors", "theirs.safetensors"]  # .pt is not listed
    path = Path(host.folder_paths.models_dir) / "erasures" / "circle.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "no circles" and json.loads(meta["erasure.concepts"]) == ["a circle"]
    assert {"erasure.layers", "erasure.base_fingerprint", "erasure.training", "erasure.seed"} <= set(meta)
    (loaded,) = execute(nodes["ConceptErasureLoadPatch"], patch_name="circle.safetensors")
    assert torch.equal(loaded.memory.k, patch.memory.k) and loaded.layers == patch.layers
    first = nodes["ConceptErasureLoadPatch"].IS_CHANGED("circle.safetensors")
    os.utime(path, ns=(1, 1))
    assert nodes["ConceptErasureLoadPatch"].IS_CHANGED("circle.safetensors") != first


# -- apply -----------------------------------------------------------------------------------------------------------

def test_apply_nodes_chain_and_leave_the_input_model_alone(pack, host, toy_model, toy_comfy):
    nodes = pack.NODE_CLASS_MAPPINGS
    model, clip = toy_comfy
    patcher = FakeModelPatcher(model)
    before = checksum(model)
    (one,) = execute(nodes["ConceptErasureApplyPatch"], model=patcher, erasure_patch=toy_patch(toy_model, 1),
                     strength=1.0)
    (two,) = execute(nodes["ConceptErasureApplyPatch"], model=one, erasure_patch=toy_patch(toy_model, 2),
                     strength=0.5)
    (zero,) = execute(nodes["ConceptErasureApplyPatch"], model=patcher, erasure_patch=toy_patch(toy_model, 1),
                      strength=0.0)
    assert patcher.model_options == {"transformer_options": {}} and not patcher.patches
    assert len(one.patches) == 1 and len(two.patches[next(iter(two.patches))]) == 2  # deltas stack
    attn2 = two.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert len(attn2) == 1 and sum(k.shape[0] for k, _, _ in next(iter(attn2[0].memories.values()))) == 8
    with torch.inference_mode():
        ctx = clip.encode_from_tokens(clip.tokenize("a circle"))
        x, sigma = torch.randn(1, 3, 32, 32), torch.tensor([1.5])
        management = ModelManagement()
        plain = calc_cond_batch(patcher, [ctx], x, sigma, management)[0]
        assert torch.equal(calc_cond_batch(zero, [ctx], x, sigma, management)[0], plain)
        assert (calc_cond_batch(two, [ctx], x, sigma, management)[0] - plain).abs().max() > 1e-3
        management.unload_all_models()
    assert checksum(model) == before
    # patches made for this model: nothing to warn about, only that their erasing strength was not measured
    assert [text for _, text in host.node_texts] == [toy_patch(toy_model, 1).strength_note()] * 3
    assert "not measured" in host.node_texts[0][1] and "⚠" not in host.node_texts[0][1]
    host.node_texts.clear()
    other = toy_patch(toy_model, 1)
    other.base_fingerprint = "0123456789abcdef"
    execute(nodes["ConceptErasureApplyPatch"], model=patcher, erasure_patch=other, strength=1.0)
    ((node, text),) = host.node_texts  # the warning reaches the user on the node, not only the server log
    assert node == "7" and "fingerprint" in text
    with pytest.raises(ValueError, match="no erasure patch"):
        execute(nodes["ConceptErasureApplyPatch"], model=patcher, erasure_patch=None, strength=1.0)


def test_the_apply_node_shows_from_which_strength_the_patch_erases(pack, host, toy_model, toy_comfy):
    patch = toy_patch(toy_model, 1)
    patch.metrics["strength"] = {"ua": {"0.0": 0.0, "0.5": 0.12, "0.75": 1.0, "1.0": 1.0}, "erases_from": 0.75}
    for strength in (1.0, 0.5):
        execute(pack.NODE_CLASS_MAPPINGS["ConceptErasureApplyPatch"], model=FakeModelPatcher(toy_comfy[0]),
                erasure_patch=patch, strength=strength)
    (_, full), (_, half) = host.node_texts
    assert full == "erases from strength 0.75 up (measured UA 1.00 at 1, UA 0.12 at 0.5)"
    assert half.startswith("⚠ at strength 0.5 this patch erases much less than at 1: it erases from 0.75 up")


# -- train -----------------------------------------------------------------------------------------------------------

TRAIN = dict(concept="a circle", method="esd-x", alternative="", preserve="", steps=14, learning_rate=3e-3,
             layers="all", seed=0, batch_size=4, resolution=32, cache_seeds=2, cache_steps=6)


def test_training_inside_inference_mode_on_inference_weights(pack, host, toy_model, toy_comfy, monkeypatch):
    """Acceptance: the Train node, run as ComfyUI runs it (inference mode, inference-tensor weights), trains: the
    loss falls, the patch changes the model's outputs, and the MODEL is bit-identical afterwards. Interrupting
    keeps a checkpoint; queueing again resumes to the same patch an uninterrupted run gives."""
    nodes = pack.NODE_CLASS_MAPPINGS
    model, clip = toy_comfy
    assert all(p.is_inference() for p in model.parameters())
    patcher = FakeModelPatcher(model)
    before, flags = checksum(model), [p.requires_grad for p in model.parameters()]
    results = []
    train_module = sys.modules[nodes["ConceptErasureTrainPatch"].__module__]
    real = train_module.train_patch
    monkeypatch.setattr(train_module, "train_patch", lambda *a, **k: results.append(real(*a, **k)) or results[-1])

    shown = len(host.node_texts)
    patch, key = execute(nodes["ConceptErasureTrainPatch"], model=patcher, clip=clip, **TRAIN)
    losses = results[-1].losses
    texts = [text for _, text in host.node_texts[shown:]]  # the node says which phase its bar measures
    assert texts[0] == f"{CACHE_STAGE}…" and f"{TRAIN_STAGE}…" in texts
    assert texts[-1] == f"trained: esd-x, {TRAIN['steps']} steps"
    assert len(losses) == TRAIN["steps"] and sum(losses[-4:]) < sum(losses[:4])
    assert key is None and patch.deltas and patch.concepts == ["a circle"] and patch.base_fingerprint
    assert ProgressBarLog.updates[-1] == (TRAIN["steps"], TRAIN["steps"])
    assert checksum(model) == before and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert patcher.model_options == {"transformer_options": {}} and not patcher.patches

    (erased,) = execute(nodes["ConceptErasureApplyPatch"], model=patcher, erasure_patch=patch, strength=1.0)
    with torch.inference_mode():
        ctx = clip.encode_from_tokens(clip.tokenize("a circle"))
        x, sigma = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([2.0, 2.0])
        plain = calc_cond_batch(patcher, [ctx.expand(2, -1, -1)], x, sigma, host.management)[0]
        changed = calc_cond_batch(erased, [ctx.expand(2, -1, -1)], x, sigma, host.management)[0]
        host.management.unload_all_models()
    assert (plain - changed).abs().mean() > 1e-3
    assert checksum(model) == before

    class CancelDuringStep2(ProgressBarLog):  # the user presses Cancel while step 2 runs
        def update_absolute(self, value, total=None, preview=None):
            if (value, total) == (2, TRAIN["steps"]):
                host.management.interrupt_current_processing()
            super().update_absolute(value, total, preview)  # the host's hook raises the interrupt in here

    import erasure_core.denoiser as core_denoiser

    sampled = []
    real_sampler = core_denoiser.sample_trajectories
    monkeypatch.setattr("erasure_core.engine.sample_trajectories",
                        lambda *a, **k: sampled.append(1) or real_sampler(*a, **k))
    host.modules["comfy.utils"].ProgressBar = CancelDuringStep2
    with pytest.raises(host.management.InterruptProcessingException):
        execute(nodes["ConceptErasureTrainPatch"], model=patcher, clip=clip, **TRAIN)
    folder = Path(host.folder_paths.temp_directory) / "concept_erasure"
    saved = list(folder.glob("train_*.pt"))
    assert len(saved) == 2 and len(sampled) == 1  # the checkpoint and the trajectory cache beside it
    host.management.interrupt_current_processing(False)
    host.modules["comfy.utils"].ProgressBar = ProgressBarLog
    ProgressBarLog.updates = []
    resumed, _ = execute(nodes["ConceptErasureTrainPatch"], model=patcher, clip=clip, **TRAIN)
    assert ProgressBarLog.updates[0] == (3, TRAIN["steps"]) and len(sampled) == 1  # step 3, cache not rebuilt
    assert not any(p.exists() for p in saved)
    assert resumed.deltas.keys() == patch.deltas.keys()
    assert all(torch.equal(resumed.deltas[k].full, patch.deltas[k].full) for k in patch.deltas)
    assert checksum(model) == before
    assert nodes["ConceptErasureTrainPatch"].IS_CHANGED(rerun=3, **TRAIN) == "3"


def test_out_of_memory_says_what_to_lower(pack, host, toy_comfy, monkeypatch):
    nodes = pack.NODE_CLASS_MAPPINGS
    model, clip = toy_comfy
    train_module = sys.modules[nodes["ConceptErasureTrainPatch"].__module__]

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "train_patch", oom)
    before = checksum(model)
    with pytest.raises(RuntimeError, match="lower batch_size \\(now 4\\), resolution \\(now 32\\)"):
        execute(nodes["ConceptErasureTrainPatch"], model=FakeModelPatcher(model), clip=clip, **TRAIN)
    assert checksum(model) == before


def test_a_train_node_on_top_of_an_earlier_patch_holds_both(pack, host, toy_comfy):
    """The optional `on_top_of` input: the earlier patch stays attached while training, its concept is preserved
    as erased, and the patch out holds both erasures (one file to apply and share); the MODEL is untouched."""
    nodes = pack.NODE_CLASS_MAPPINGS
    model, clip = toy_comfy
    before = checksum(model)
    uce = {**TRAIN, "method": "uce"}
    first, _ = execute(nodes["ConceptErasureTrainPatch"], model=FakeModelPatcher(model), clip=clip, **uce)
    both, _ = execute(nodes["ConceptErasureTrainPatch"], model=FakeModelPatcher(model), clip=clip,
                      **{**uce, "concept": "a star"}, on_top_of=first)
    assert both.concepts == ["a circle", "a star"] and both.training["on_top_of"] == [
        {"method": "uce", "concepts": ["a circle"]}]
    for name, delta in first.deltas.items():  # the earlier edit is inside, plus the new one
        assert not torch.equal(both.deltas[name].full, delta.full)
    assert checksum(model) == before
    with pytest.raises(Exception, match="already erased by the earlier patch"):
        execute(nodes["ConceptErasureTrainPatch"], model=FakeModelPatcher(model), clip=clip, **uce, on_top_of=first)


# -- preview and purify ----------------------------------------------------------------------------------------------

def test_preview_draws_before_and_after_from_one_seed(pack, host, toy_model, toy_comfy):
    nodes = pack.NODE_CLASS_MAPPINGS
    model, clip = toy_comfy
    args = dict(model=FakeModelPatcher(model), clip=clip, vae=FakeVAE(), erasure_patch=toy_patch(toy_model, scale=3),
                prompt="a red circle", seed=7, steps=4, cfg=3.0, width=32, height=32)
    before, after, both = execute(nodes["ConceptErasurePreview"], strength=1.0, **args)
    assert before.shape == after.shape == (1, 32, 32, 3) and both.shape == (1, 32, 64, 3)
    assert (before - after).abs().mean() > 0.01
    again, same, _ = execute(nodes["ConceptErasurePreview"], strength=0.0, **args)
    assert torch.equal(again, before) and torch.equal(same, before)  # strength 0: the unpatched image


def test_purify_inverts_and_regenerates_an_image(pack, host, toy_model, toy_comfy):
    nodes = pack.NODE_CLASS_MAPPINGS
    model, clip = toy_comfy
    image = torch.rand(1, 32, 32, 4, generator=torch.Generator().manual_seed(0))  # RGBA: the alpha is dropped
    args = dict(model=FakeModelPatcher(model), clip=clip, vae=FakeVAE(), erasure_patch=toy_patch(toy_model, scale=3),
                image=image, prompt="", steps=4, guidance=1.0)
    (kept,) = execute(nodes["ConceptErasurePurifyImage"], strength=0.0, **args)
    (purified,) = execute(nodes["ConceptErasurePurifyImage"], strength=1.0, **args)
    assert kept.shape == purified.shape == (1, 32, 32, 3)
    assert "a circle" in clip.encoded  # empty prompt: the patch's concept
    assert (kept - purified).abs().mean() > 0.01


def test_no_seed_input_of_the_pack_gets_the_front_ends_randomizer(pack, host):
    """ComfyUI's front end adds "control after generate: randomize" to INT inputs named seed unless the input says
    control_after_generate False; a randomised seed would retrain the Train node on every Queue."""
    seeds = [(name, options) for cls in pack.NODE_CLASS_MAPPINGS.values()
             for key, section in cls.INPUT_TYPES().items() if key != "hidden" for name, (kind, *rest) in section.items()
             for options in [rest[0] if rest else {}] if kind == "INT" and name in ("seed", "noise_seed")]
    assert len(seeds) >= 2 and all(options.get("control_after_generate") is False for _, options in seeds)


def test_the_train_node_makes_a_saeuron_patch_with_the_sae_kept_in_models_erasures(pack, host, toy_comfy,
                                                                                   tmp_path):
    """Run as ComfyUI runs it (inference mode, inference-tensor weights), the Train node finds the base model's
    SAE in models/erasures and only chooses the features; Save writes the patch beside that SAE, Load reads it
    back, and Apply changes the model's output."""
    import shutil

    from erasure_core.toy.model import ASSETS

    nodes = pack.NODE_CLASS_MAPPINGS
    model, clip = toy_comfy
    erasures = tmp_path / "models" / "erasures"
    erasures.mkdir(parents=True)
    shutil.copy(ASSETS / "toy.sae.safetensors", erasures)
    patcher = FakeModelPatcher(model)
    before = checksum(model)
    settings = {**TRAIN, "concept": "a shape with stripes", "method": "saeuron", "cache_steps": 4}
    patch, _ = execute(nodes["ConceptErasureTrainPatch"], model=patcher, clip=clip, **settings)
    assert patch.training["sae"] == {"reused": "toy.sae.safetensors"} and patch.feature_meta["sae"]["block"]
    execute(nodes["ConceptErasureSavePatch"], erasure_patch=patch, filename="stripes")
    assert sorted(p.name for p in erasures.iterdir()) == ["stripes.safetensors", "toy.sae.safetensors"]
    (loaded,) = execute(nodes["ConceptErasureLoadPatch"], patch_name="stripes.safetensors")
    (erased,) = execute(nodes["ConceptErasureApplyPatch"], model=patcher, erasure_patch=loaded, strength=1.0)
    with torch.inference_mode():
        ctx = clip.encode_from_tokens(clip.tokenize("a shape with stripes"))
        x, sigma = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([2.0, 2.0])
        management = ModelManagement()
        plain = calc_cond_batch(patcher, [ctx], x, sigma, management)[0]
        edited = calc_cond_batch(erased, [ctx], x, sigma, management)[0]
        management.unload_all_models()
    assert (plain - edited).abs().max() > 1e-3 and checksum(model) == before
