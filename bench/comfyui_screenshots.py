"""Screenshots of the example workflows in ComfyUI's own front end (the comfyui-frontend-package a fetched ComfyUI
serves), shot with headless Chromium through Playwright: the pictures in README.md and docs/comfyui.md.

    python main.py --cpu --listen 127.0.0.1 --port 8188      # in a ComfyUI with this pack in custom_nodes/
    python bench/comfyui_screenshots.py OUT_DIR [--server http://127.0.0.1:8188]

Each workflow JSON is loaded as the user's browser would load it (the front end's app.loadGraphData), fitted to
the window, and shot at 1600 × 900."""
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
        browser.close()


if __name__ == "__main__":
    main()
