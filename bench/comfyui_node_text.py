"""In a real ComfyUI: the text Apply Erasure Patch writes under itself (the strength note, issue 17), as the
stock front end receives it over the websocket. Run against a server you started (see comfyui_real_host.py):

    python bench/comfyui_node_text.py --comfyui /path/to/ComfyUI --checkpoint random-sd15.safetensors \\
        --patch real_uce.safetensors

It copies the patch twice into models/erasures: as it is (never measured), and with a strength card whose numbers
are made up for this display check (erases_from 0.75), then applies each at strengths 1 and 0.5 and prints the
node texts it saw."""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfyui_real_host import SERVER, Graph, wait  # noqa: E402

CARD = {"ua": {"0.0": 0.0, "0.5": 0.1, "0.75": 0.95, "1.0": 1.0}, "erases_from": 0.75, "judge": "display check"}


def node_texts(graph: Graph) -> tuple[list[str], dict]:
    """Queue the graph; every progress-text frame (binary: event type, node id, text) that names a node."""
    import websocket  # websocket-client

    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(f"ws://{SERVER.split('://')[1]}/ws?clientId={client_id}", timeout=600)
    reply, texts = graph.queue(client_id), []
    try:
        while "prompt_id" in reply:
            message = ws.recv()
            if isinstance(message, bytes):
                if int.from_bytes(message[:4], "big") == 3:  # PROGRESS_TEXT: u32 id length, node id, text
                    length = int.from_bytes(message[4:8], "big")
                    texts.append(message[8 + length:].decode())
                continue
            event = json.loads(message)
            if event["type"] in ("execution_success", "execution_error", "execution_interrupted") \
                    and event.get("data", {}).get("prompt_id") == reply["prompt_id"]:
                break
    finally:
        ws.close()
    return texts, wait(reply)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--patch", required=True, help="a patch in models/erasures trained on that checkpoint")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from erasure_core.patch import load_patch, save_patch

    erasures = os.path.join(args.comfyui, "models", "erasures")
    patch = load_patch(os.path.join(erasures, args.patch))
    patch.metrics.pop("strength", None)
    save_patch(patch, os.path.join(erasures, "note_unmeasured.safetensors"))
    patch.metrics["strength"] = CARD
    save_patch(patch, os.path.join(erasures, "note_measured.safetensors"))
    report = {}
    for name in ("note_unmeasured.safetensors", "note_measured.safetensors"):
        for strength in (1.0, 0.5):
            g = Graph()
            ckpt = g.add("CheckpointLoaderSimple", ckpt_name=args.checkpoint)
            loaded = g.add("ConceptErasureLoadPatch", patch_name=name)
            model = g.add("ConceptErasureApplyPatch", model=[ckpt, 0], erasure_patch=[loaded, 0], strength=strength)
            pos = g.add("CLIPTextEncode", clip=[ckpt, 1], text="a cat")
            neg = g.add("CLIPTextEncode", clip=[ckpt, 1], text="")
            latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
            sampled = g.add("KSampler", model=[model, 0], positive=[pos, 0], negative=[neg, 0],
                            latent_image=[latent, 0], seed=1, steps=2, cfg=7.0, sampler_name="euler",
                            scheduler="normal", denoise=1.0)
            g.add("PreviewImage", images=[g.add("VAEDecode", samples=[sampled, 0], vae=[ckpt, 2]), 0])
            texts, outcome = node_texts(g)
            report[f"{name} at {strength:g}"] = {"outcome": outcome.get("status"), "node texts": texts}
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
