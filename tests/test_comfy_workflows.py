"""Acceptance: every example workflow in workflows/ validates against the node definitions: ours from
NODE_CLASS_MAPPINGS, ComfyUI's core nodes from a table of their real INPUT_TYPES / RETURN_TYPES
(tests/comfy_fakes/core_nodes.py). Each node type exists, each link joins matching types, widget values fit."""
import copy
import json
from pathlib import Path

import pytest

from comfy_fakes.host import installed, load_pack
from comfy_fakes.workflow import all_definitions, validate

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def definitions(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    with installed(str(base)) as host:
        folder = Path(host.folder_paths.models_dir) / "erasures"
        folder.mkdir(parents=True)
        (folder / "van_gogh.safetensors").touch()  # what train_patch.json saves and the others load
        pack = load_pack(ROOT, "concept_erasure_workflows")
        yield all_definitions(pack.NODE_CLASS_MAPPINGS)


def test_the_three_example_workflows_are_there():
    names = {p.stem for p in WORKFLOWS}
    assert {"apply_shared_patch", "train_patch", "purify_image"} <= names
    uses = {p.stem: {n["type"] for n in json.loads(p.read_text())["nodes"]} for p in WORKFLOWS}
    assert {"ConceptErasureLoadPatch", "ConceptErasureApplyPatch", "KSampler"} <= uses["apply_shared_patch"]
    assert {"ConceptErasureTrainPatch", "ConceptErasureSavePatch", "ConceptErasurePreview"} <= uses["train_patch"]
    assert {"LoadImage", "ImageScale", "ConceptErasurePurifyImage", "SaveImage"} <= uses["purify_image"]
    (scale,) = [n for n in json.loads((ROOT / "workflows" / "purify_image.json").read_text())["nodes"]
                if n["type"] == "ImageScale"]
    assert scale["widgets_values"][1:3] == [512, 512]  # purified at SD1.5's own resolution


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_validates_against_the_node_definitions(path, definitions):
    workflow = json.loads(path.read_text())
    assert workflow["nodes"] and workflow["links"]
    assert validate(workflow, definitions) == []


def _break(workflow, how):
    w = copy.deepcopy(workflow)
    nodes = {n["id"]: n for n in w["nodes"]}
    apply = next(n for n in w["nodes"] if n["type"] == "ConceptErasureApplyPatch")
    sampler = next(n for n in w["nodes"] if n["type"] == "KSampler")
    if how == "unknown type":
        apply["type"] = "ErasureApply"
    elif how == "link type":
        link = next(link for link in w["links"] if link[5] == "ERASURE_PATCH")
        link[5] = "MODEL"
    elif how == "wrong socket":  # an ERASURE_PATCH output wired into a MODEL input
        link = next(link for link in w["links"] if link[3] == sampler["id"] and link[5] == "MODEL")
        patch_link = next(link for link in w["links"] if link[5] == "ERASURE_PATCH")
        link[1], link[2] = patch_link[1], patch_link[2]
    elif how == "out of range":
        apply["widgets_values"][0] = 5.0  # strength max is 2
    elif how == "widget count":
        sampler["widgets_values"].pop(1)  # drop the seed's control_after_generate value
    elif how == "bad combo":
        sampler["widgets_values"][4] = "euler_fast"
    elif how == "unconnected":
        link_id = apply["inputs"][0]["link"]
        apply["inputs"][0]["link"] = None
        w["links"] = [link for link in w["links"] if link[0] != link_id]
        for node in nodes.values():
            for out in node["outputs"]:
                if out["links"] and link_id in out["links"]:
                    out["links"].remove(link_id)
    return w


@pytest.mark.parametrize("how", ["unknown type", "link type", "wrong socket", "out of range", "widget count",
                                 "bad combo", "unconnected"])
def test_the_validator_catches_broken_workflows(definitions, how):
    workflow = json.loads((ROOT / "workflows" / "apply_shared_patch.json").read_text())
    assert validate(workflow, definitions) == []
    errors = validate(_break(workflow, how), definitions)
    assert errors, how
