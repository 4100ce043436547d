"""Screenshots of the example workflows in ComfyUI's own front end (the comfyui-frontend-package a fetched ComfyUI
serves), shot with headless Chromium through Playwright: the pictures in README.md and docs/comfyui.md.

    python main.py --cpu --listen 127.0.0.1 --port 8188      # in a ComfyUI with this pack in custom_nodes/
    python bench/comfyui_screenshots.py OUT_DIR [--server http://127.0.0.1:8188]

Each workflow JSON is loaded as the user's browser would load it (the front end's app.loadGraphData), fitted to
the window, and shot at 1600 × 900. With --run-warning COMFYUI_FOLDER it also runs, from the browser, the apply
example at 64 px with a patch that says it was trained on another base model, and shoots the warning the pack puts
under the node (PromptServer.send_progress_text, drawn by the stock front end)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from playwright.sync_api import sync_playwright

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SHOTS = {"train_patch.json": "comfyui_train_workflow.png", "apply_shared_patch.json": "comfyui_apply_workflow.png",
         "purify_image.json": "comfyui_purify_workflow.png"}
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--run-warning", metavar="COMFYUI_FOLDER",
                        help="also run the apply example with a patch from another base model (needs "
                             "models/erasures/real_memory.safetensors, from bench/comfyui_real_host.py)")
    parser.add_argument("--checkpoint", default="random-sd15.safetensors", help="for --run-warning")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(args.server)
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); }")
        for workflow, picture in SHOTS.items():
            graph = json.loads((WORKFLOWS / workflow).read_text())
            page.evaluate("async (g) => { await window.app.loadGraphData(g); }", graph)
            page.keyboard.press("Escape")  # any dialog the load opened (missing models)
            page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 1; "
                          "const ns = window.app.graph._nodes; "
                          "const xs = ns.map(n => n.pos[0]), ys = ns.map(n => n.pos[1]); "
                          "const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), "
                          "y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1])); "
                          "const w = x1 - Math.min(...xs), h = y1 - Math.min(...ys); "
                          "const s = Math.min(1.2, 0.92 * Math.min(c.canvas.width / w, (c.canvas.height - 80) / h)); "
                          "c.ds.scale = s; c.ds.offset = [-Math.min(...xs) + (c.canvas.width / s - w) / 2, "
                          "-Math.min(...ys) + 40 / s + ((c.canvas.height - 80) / s - h) / 2]; "
                          "c.setDirty(true, true); }")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / picture))
            print(f"wrote {out / picture}")
        if args.run_warning:
            run_warning(page, Path(args.run_warning), args.checkpoint, out / "comfyui_warning_run.png")
        browser.close()


def run_warning(page, comfyui: Path, checkpoint: str, picture: Path) -> None:
    from erasure_core.patch import load_patch, save_patch

    erasures = comfyui / "models" / "erasures"
    patch = load_patch(erasures / "real_memory.safetensors")
    patch.base_fingerprint = "0" * len(patch.base_fingerprint)  # as if trained on another checkpoint
    save_patch(patch, erasures / "other_base.safetensors")
    graph = json.loads((WORKFLOWS / "apply_shared_patch.json").read_text())
    for node in graph["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "CheckpointLoaderSimple":
            values[0] = checkpoint
        elif node["type"] == "ConceptErasureLoadPatch":
            values[0] = "other_base.safetensors"
        elif node["type"] == "EmptyLatentImage":
            values[:2] = [64, 64]
        elif node["type"] == "KSampler":
            values[2] = 3
    page.evaluate("async (g) => { await window.app.loadGraphData(g); }", graph)
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    for _ in range(600):  # until the server's queue is empty
        page.wait_for_timeout(1000)
        if page.evaluate("async () => { const q = await (await fetch('/queue')).json(); "
                         "return q.queue_running.length + q.queue_pending.length === 0; }"):
            break
    page.wait_for_timeout(2000)
    page.screenshot(path=str(picture))
    print(f"wrote {picture}")


if __name__ == "__main__":
    main()
