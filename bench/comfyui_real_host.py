"""Drive a real ComfyUI through its HTTP API and websocket, as a user's graphs would: train (memory, all-but-one,
uce; adversarial-preservation with the default `auto` preservation), save, load, apply, strength 0, stacking,
refused files, and a Train node cancelled during step 2 of 5 then queued again. Prints a JSON report. Run it
against a server you started:

    # outside this repo: a ComfyUI checkout with its requirements in its own venv (CPU torch is enough),
    # this pack cloned into custom_nodes/, websocket-client in that venv, and a random-weight SD1.5 checkpoint:
    python bench/random_checkpoint.py /path/to/ComfyUI/models/checkpoints/random-sd15.safetensors
    python main.py --cpu --listen 127.0.0.1 --port 8188
    python bench/comfyui_real_host.py --comfyui /path/to/ComfyUI --checkpoint random-sd15.safetensors [--pid PID]

Sizes are tiny on purpose (64 px, 3 sampler steps, 3 to 5 training steps): it checks the host contract, not
quality. With --pid (the server's process) it also trains memory once at 512 px, batch 1, with the model already
loaded, and reports how far the server's resident set rose: the training's own memory, weights not copied."""
from __future__ import annotations

import argparse
from pathlib import Path
import glob
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
from PIL import Image
from safetensors import safe_open

SERVER = "http://127.0.0.1:8188"


def get(path: str):
    return json.loads(urllib.request.urlopen(SERVER + path, timeout=600).read())


def post(path: str, body: dict):
    request = urllib.request.Request(SERVER + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        body = urllib.request.urlopen(request, timeout=600).read()
        return json.loads(body) if body else {}
    except urllib.error.HTTPError as exc:
        return {"http_error": exc.code, "body": json.loads(exc.read() or b"{}")}


class Graph:
    """An API-format prompt; inputs not given take the defaults the server's /object_info declares."""

    info: dict | None = None

    def __init__(self) -> None:
        self.nodes: dict[str, dict] = {}
        Graph.info = Graph.info or get("/object_info")

    def add(self, cls: str, **inputs) -> str:
        given = {}
        for section in ("required", "optional"):
            for name, spec in Graph.info[cls]["input"].get(section, {}).items():
                if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                    given[name] = spec[1]["default"]
                elif isinstance(spec[0], list) and spec[0]:
                    given[name] = spec[0][0]
        key = str(len(self.nodes) + 1)
        self.nodes[key] = {"class_type": cls, "inputs": {**given, **inputs}}
        return key

    def run(self, timeout: float = 1800, client_id: str | None = None) -> dict:
        return wait(self.queue(client_id), timeout)

    def queue(self, client_id: str | None = None) -> dict:
        return post("/prompt", {"prompt": self.nodes, "client_id": client_id or str(uuid.uuid4())})


def wait(reply: dict, timeout: float = 1800) -> dict:
    """The queued prompt's outcome, from /history."""
    if "prompt_id" not in reply:
        return {"refused": reply}
    pid, start = reply["prompt_id"], time.time()
    while time.time() - start < timeout:
        history = get(f"/history/{pid}").get(pid)
        if history and history.get("status", {}).get("status_str") in ("success", "error"):
            status = history["status"]
            errors = [{k: m[1].get(k) for k in ("node_type", "exception_message")}
                      for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
            return {"seconds": round(time.time() - start, 1), "status": status["status_str"], "errors": errors}
        time.sleep(1)
    return {"timeout": pid}


def progress_of(node: str, graph: Graph, interrupt_after: int | None = None) -> tuple[list, dict]:
    """Queue the graph and record the progress ComfyUI reports for one node over its websocket: [(value, max)].
    With interrupt_after, press Cancel (POST /interrupt) as soon as that many training steps are reported, that
    is while the next step runs."""
    import websocket  # websocket-client

    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(f"ws://{SERVER.split('://')[1]}/ws?clientId={client_id}", timeout=1800)
    reply, seen, steps = graph.queue(client_id), [], graph.nodes[node]["inputs"]["steps"]
    try:
        while "prompt_id" in reply:
            message = ws.recv()
            if not isinstance(message, str):
                continue  # previews and progress text
            event = json.loads(message)
            data = event.get("data", {})
            if event["type"] == "progress" and data.get("node") == node:
                seen.append((data["value"], data["max"]))
                if interrupt_after is not None and (data["value"], data["max"]) == (interrupt_after, steps):
                    post("/interrupt", {})
            if event["type"] in ("execution_success", "execution_error", "execution_interrupted") \
                    and data.get("prompt_id") == reply["prompt_id"]:
                break
    finally:
        ws.close()
    return seen, wait(reply)


def generate_with(loader, prefix: str, patches: list[tuple[str, float]]) -> dict:
    """KSampler at 64 px, 3 steps, with Load + Apply Erasure Patch nodes chained in; saves one image."""
    g = Graph()
    model_node = loader(g)
    model = [model_node, 0]
    for name, strength in patches:
        patch = g.add("ConceptErasureLoadPatch", patch_name=name)
        model = [g.add("ConceptErasureApplyPatch", model=model, erasure_patch=[patch, 0], strength=strength), 0]
    pos = g.add("CLIPTextEncode", clip=[model_node, 1], text="a cat in a garden")
    neg = g.add("CLIPTextEncode", clip=[model_node, 1], text="")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = g.add("KSampler", model=model, positive=[pos, 0], negative=[neg, 0], latent_image=[latent, 0],
                    seed=42, steps=3, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    decoded = g.add("VAEDecode", samples=[sampled, 0], vae=[model_node, 2])
    g.add("SaveImage", images=[decoded, 0], filename_prefix=prefix)
    return g.run()


def saeuron_checks(args, erasures: str, output: str, loader) -> dict:
    """A SAeUron patch in the real host: written by save_patch into models/erasures (its SAE file beside it),
    listed without the SAE file, applied (DIFFUSION_MODEL wrapper), bit-identical at strength 0 and after."""
    from random_checkpoint import write_random_saeuron_patch

    write_random_saeuron_patch(Path(erasures) / "real_saeuron.safetensors")
    report = {"erasures folder": sorted(os.listdir(erasures))}
    listed = get("/object_info/ConceptErasureLoadPatch")["ConceptErasureLoadPatch"]["input"]["required"]
    report["Load Erasure Patch lists"] = [n for n in listed["patch_name"][0] if "saeuron" in n or "sae." in n]
    runs = {"sae_plain": [], "sae_patched": [("real_saeuron.safetensors", 1.0)],
            "sae_strength0": [("real_saeuron.safetensors", 0.0)], "sae_plain_after": []}
    for prefix, patches in runs.items():
        report[prefix] = generate_with(loader, prefix, patches)
    picture = lambda p: np.asarray(Image.open(sorted(glob.glob(os.path.join(output, f"{p}_*.png")))[-1])  # noqa
                                   ).astype(np.int16)
    plain = picture("sae_plain")
    report["max pixel difference from plain"] = {k: int(np.abs(picture(k) - plain).max()) for k in runs
                                                 if k != "sae_plain"}
    lonely = os.path.join(erasures, "sae_alone")
    os.makedirs(lonely, exist_ok=True)
    shutil.copy(os.path.join(erasures, "real_saeuron.safetensors"), lonely)
    report["without its SAE"] = generate_with(loader, "sae_missing", [("sae_alone/real_saeuron.safetensors", 1.0)])
    report["server alive afterwards"] = "system" in get("/system_stats")
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True, help="the ComfyUI folder the server runs from")
    parser.add_argument("--checkpoint", required=True, help="a file name in models/checkpoints")
    parser.add_argument("--pid", type=int, default=0, help="the server's process, to measure a 512 px training")
    parser.add_argument("--saeuron-only", action="store_true",
                        help="only a SAeUron patch (a random SAE for the checkpoint's output_blocks.4.1, saved with "
                             "its SAE file beside it): the patch list, strength 0, plain after, a missing SAE")
    parser.add_argument("--newest-only", action="store_true",
                        help="only train what came last: forget-me-not (attention read from ComfyUI's own attn2), "
                             "two concepts in one patch, and one Train node on top of another")
    args = parser.parse_args()
    output, erasures = os.path.join(args.comfyui, "output"), os.path.join(args.comfyui, "models", "erasures")
    report: dict = {}

    def loader(g: Graph) -> str:
        return g.add("CheckpointLoaderSimple", ckpt_name=args.checkpoint)

    def train_and_save(filename: str, **inputs) -> dict:
        g = Graph()
        model = loader(g)
        settings = dict(preserve="", steps=3, seed=0, batch_size=1, resolution=64, cache_seeds=1, cache_steps=2)
        trained = g.add("ConceptErasureTrainPatch", model=[model, 0], clip=[model, 1], **{**settings, **inputs})
        g.add("ConceptErasureSavePatch", erasure_patch=[trained, 0], filename=filename)
        outcome = g.run()
        path = os.path.join(erasures, f"{filename}.safetensors")
        if os.path.exists(path):
            with safe_open(path, "pt") as f:
                meta = f.metadata()
            outcome.update(concepts=json.loads(meta["erasure.concepts"]), method=meta["erasure.method"],
                           training={k: v for k, v in json.loads(meta["erasure.training"]).items()
                                     if k in ("forget_me_not", "on_top_of")})
        return outcome

    if args.saeuron_only:
        report.update(saeuron_checks(args, erasures, output, loader))
        print(json.dumps(report, indent=1))
        return
    if args.newest_only:
        report["train forget-me-not"] = train_and_save("real_fmn", concept="a cat", method="forget-me-not")
        report["train uce, two concepts"] = train_and_save("real_two", concept="a cat, a dog", method="uce")
        report["train esd-x, two concepts"] = train_and_save("real_two_esd", concept="a cat, a dog", method="esd-x")
        g = Graph()  # one Train node feeding the next one's on_top_of
        model = loader(g)
        settings = dict(preserve="", steps=2, seed=0, batch_size=1, resolution=64, cache_seeds=1, cache_steps=2)
        first = g.add("ConceptErasureTrainPatch", model=[model, 0], clip=[model, 1], concept="a cat", method="uce",
                      **settings)
        second = g.add("ConceptErasureTrainPatch", model=[model, 0], clip=[model, 1], concept="a dog",
                       method="esd-x", on_top_of=[first, 0], **settings)
        g.add("ConceptErasureSavePatch", erasure_patch=[second, 0], filename="real_on_top")
        outcome = g.run()
        with safe_open(os.path.join(erasures, "real_on_top.safetensors"), "pt") as f:
            meta = f.metadata()
        report["train esd-x on top of uce"] = {**outcome, "concepts": json.loads(meta["erasure.concepts"]),
                                               "on_top_of": json.loads(meta["erasure.training"]).get("on_top_of")}
        print(json.dumps(report, indent=1))
        return

    # Cancel during step 2 of 5, queue the same graph again: it resumes at step 3 from the checkpoint, with the
    # trajectory cache saved beside it (a rebuilt cache would report its own progress first)
    g = Graph()
    model = loader(g)
    train = g.add("ConceptErasureTrainPatch", model=[model, 0], clip=[model, 1], concept="a cat", method="memory",
                  preserve="", steps=5, seed=0, batch_size=1, resolution=64, cache_seeds=1, cache_steps=3)
    g.add("ConceptErasureSavePatch", erasure_patch=[train, 0], filename="real_resumed")
    temp = os.path.join(args.comfyui, "temp", "concept_erasure")
    shutil.rmtree(temp, ignore_errors=True)  # a checkpoint of an earlier run of this script would be resumed
    first, outcome = progress_of(train, g, interrupt_after=1)
    saved = sorted(os.listdir(temp)) if os.path.isdir(temp) else []
    second, resumed = progress_of(train, g)
    report["cancel during step 2 of 5"] = {"progress": first, "outcome": outcome, "saved in temp": saved}
    report["queued again"] = {"progress": second, "outcome": resumed,
                              "left in temp": sorted(os.listdir(temp)) if os.path.isdir(temp) else []}

    for method, extra in (("memory", {}), ("all-but-one", {"alternative": "a dog"}), ("uce", {})):
        g = Graph()
        model = loader(g)
        trained = g.add("ConceptErasureTrainPatch", model=[model, 0], clip=[model, 1], concept="a cat", method=method,
                        preserve="", steps=3, seed=0, batch_size=1, resolution=64, cache_seeds=1, cache_steps=2,
                        **extra)
        g.add("ConceptErasureSavePatch", erasure_patch=[trained, 0], filename=f"real_{method}")
        report[f"train {method}"] = g.run()

    # The default preservation of a checkpoint (the word list's nearest concepts, encoded by the user's CLIP) and
    # Adversarial Preservation's candidate search, through the host's own text encoder
    g = Graph()
    model = loader(g)
    trained = g.add("ConceptErasureTrainPatch", model=[model, 0], clip=[model, 1], concept="a cat",
                    method="adversarial-preservation", preserve="auto", steps=2, seed=0, batch_size=1, resolution=64,
                    cache_seeds=1, cache_steps=2)
    g.add("ConceptErasureSavePatch", erasure_patch=[trained, 0], filename="real_adversarial")
    start = time.time()
    outcome = g.run()
    with safe_open(os.path.join(erasures, "real_adversarial.safetensors"), "pt") as f:
        meta = f.metadata()
    report["train adversarial-preservation, preserve auto"] = {
        "outcome": outcome, "seconds": round(time.time() - start, 1), "preserve": json.loads(meta["erasure.preserve"]),
        "adversarial_preservation": json.loads(meta["erasure.training"])["adversarial_preservation"]}
    report["erasures folder"] = sorted(os.listdir(erasures)) if os.path.isdir(erasures) else []

    def generate(prefix: str, patches: list[tuple[str, float]]) -> dict:
        return generate_with(loader, prefix, patches)

    def image(prefix: str) -> np.ndarray:
        return np.asarray(Image.open(sorted(glob.glob(os.path.join(output, f"{prefix}_*.png")))[-1])).astype(np.int16)

    runs = {"plain": [], "patched": [("real_memory.safetensors", 1.0)], "strength0": [("real_memory.safetensors", 0.0)],
            "stacked": [("real_memory.safetensors", 1.0), ("real_uce.safetensors", 1.0)], "plain_after": []}
    for prefix, patches in runs.items():
        report[prefix] = generate(prefix, patches)
    plain = image("plain")
    report["max pixel difference from plain"] = {k: int(np.abs(image(k) - plain).max()) for k in runs if k != "plain"}
    report["stacked vs patched"] = int(np.abs(image("stacked") - image("patched")).max())
    if args.pid:  # the checkpoint loader's output is cached by now: the rise is the training's alone
        from a1111_real_host import ResidentMemory

        g = Graph()
        model = loader(g)
        trained = g.add("ConceptErasureTrainPatch", model=[model, 0], clip=[model, 1], concept="a cat",
                        method="memory", preserve="", steps=2, seed=0, batch_size=1, resolution=512, cache_seeds=1,
                        cache_steps=2)
        g.add("ConceptErasureSavePatch", erasure_patch=[trained, 0], filename="real_memory_512")
        memory = ResidentMemory(args.pid)
        outcome = g.run()
        report["train memory at 512 px, batch 1"] = {**outcome, "memory": memory.done()}
    os.makedirs(erasures, exist_ok=True)
    for name, data in (("garbage.safetensors", b"\x00" * 64), ("pickle.safetensors", b"\x80\x04\x95" + b"x" * 100)):
        with open(os.path.join(erasures, name), "wb") as f:
            f.write(data)
        report[f"refused {name}"] = generate(f"bad_{name[:4]}", [(name, 1.0)])
    report["server alive afterwards"] = "system" in get("/system_stats")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
