"""Draw an example workflow as a ComfyUI-like picture (for docs/images/comfyui_*.png).

    python workflows/render_graph.py workflows/train_patch.json docs/images/comfyui_train_workflow.png

Reads the workflow JSON (UI format: node positions, sockets, links, widget values) and draws nodes, sockets,
widgets and links with PIL in ComfyUI's dark theme and its link colours. Widget names come from this pack's
INPUT_TYPES and from a short table for the core nodes the examples use. No ComfyUI needed.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
LINK_COLOURS = {"MODEL": "#B39DDB", "CLIP": "#FFD500", "VAE": "#FF6E6E", "CONDITIONING": "#FFA931",
                "LATENT": "#FF9CF9", "IMAGE": "#64B5F6", "MASK": "#81C784", "ERASURE_PATCH": "#4DD0E1"}
CORE_WIDGETS = {"CheckpointLoaderSimple": ["ckpt_name"], "CLIPTextEncode": ["text"],
                "EmptyLatentImage": ["width", "height", "batch_size"],
                "KSampler": ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                "VAEDecode": [], "VAEEncode": [], "SaveImage": ["filename_prefix"], "PreviewImage": [],
                "LoadImage": ["image", "upload"]}
BACKGROUND, GRID, NODE, TITLE, OURS, TEXT, DIM = "#202020", "#2a2a2a", "#353535", "#2b2b2b", "#23424a", "#dddddd", \
    "#999999"
TITLE_H, ROW_H, SCALE = 30, 22, 2


def _pack_widgets() -> tuple[dict[str, list[str]], dict[str, str]]:
    """Widget names and display names of this pack's nodes (folder_paths stubbed when ComfyUI is absent)."""
    stubbed = "folder_paths" not in sys.modules
    if stubbed:
        stub = types.ModuleType("folder_paths")
        stub.models_dir, stub.folder_names_and_paths = str(ROOT / "models"), {}
        stub.get_filename_list = lambda name: []
        sys.modules["folder_paths"] = stub
    try:
        spec = importlib.util.spec_from_file_location("concept_erasure_render", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = pack
        spec.loader.exec_module(pack)
        widgets = {}
        for name, cls in pack.NODE_CLASS_MAPPINGS.items():
            names = []
            for section in ("required", "optional"):
                for key, (kind, *opts) in cls.INPUT_TYPES().get(section, {}).items():
                    if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                        names.append(key)
                        if key == "seed" and (opts[0] if opts else {}).get("control_after_generate", True):
                            names.append("control_after_generate")
            widgets[name] = names
    finally:
        if stubbed:
            del sys.modules["folder_paths"]
    return widgets, dict(pack.NODE_DISPLAY_NAME_MAPPINGS)


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _value(v) -> str:
    if isinstance(v, float):
        text = f"{v:.6g}"
    else:
        text = str(v).replace("\n", " / ")
    return text if len(text) <= 34 else text[:33] + "…"


def _height(node, widget_names) -> int:
    sockets = max(len(node.get("inputs", [])), len(node.get("outputs", [])))
    multiline = sum(1 for v in node.get("widgets_values", []) if isinstance(v, str) and len(v) > 34)
    return TITLE_H + ROW_H * (sockets + len(node.get("widgets_values", [])) + multiline) + 10


def render(workflow_path: Path, out_path: Path, title: str = "") -> Path:
    workflow = json.loads(Path(workflow_path).read_text())
    ours, display = _pack_widgets()
    widget_names = {**CORE_WIDGETS, **ours}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    boxes = {}
    for node in nodes.values():
        x, y = node["pos"]
        w = node.get("size", [300, 100])[0]
        boxes[node["id"]] = (x, y, x + w, y + _height(node, widget_names))
    margin, header = 40, 60 if title else 0
    min_x, min_y = min(b[0] for b in boxes.values()) - margin, min(b[1] for b in boxes.values()) - margin - header
    max_x, max_y = max(b[2] for b in boxes.values()) + margin, max(b[3] for b in boxes.values()) + margin
    size = (int(max_x - min_x) * SCALE, int(max_y - min_y) * SCALE)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)

    def p(x, y):
        return ((x - min_x) * SCALE, (y - min_y) * SCALE)

    for gx in range(0, size[0], 20 * SCALE):
        draw.line([(gx, 0), (gx, size[1])], fill=GRID)
    for gy in range(0, size[1], 20 * SCALE):
        draw.line([(0, gy), (size[0], gy)], fill=GRID)
    font, small, big = _font(13 * SCALE), _font(11 * SCALE), _font(18 * SCALE)
    if title:
        draw.text(p(min_x + margin, min_y + 20), title, fill=TEXT, font=big)

    def socket(node_id, index, output):
        x0, y0, x1, _ = boxes[node_id]
        return (x1 if output else x0, y0 + TITLE_H + ROW_H * index + ROW_H / 2)

    for link in workflow["links"]:  # links under the nodes
        _, origin, o_slot, target, t_slot, kind = link
        (ax, ay), (bx, by) = socket(origin, o_slot, True), socket(target, t_slot, False)
        bend = max(60, abs(bx - ax) / 2)
        points = []
        for i in range(41):  # cubic Bezier, horizontal tangents as ComfyUI draws them
            t = i / 40
            c = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3]
            points.append(p(c[0] * ax + c[1] * (ax + bend) + c[2] * (bx - bend) + c[3] * bx,
                            c[0] * ay + c[1] * ay + c[2] * by + c[3] * by))
        draw.line(points, fill=LINK_COLOURS.get(kind, "#aaaaaa"), width=3 * SCALE, joint="curve")

    for node_id, node in nodes.items():
        x0, y0, x1, y1 = boxes[node_id]
        is_ours = node["type"].startswith("ConceptErasure")
        draw.rounded_rectangle([p(x0, y0), p(x1, y1)], radius=8 * SCALE, fill=NODE,
                               outline="#4DD0E1" if is_ours else "#4a4a4a", width=SCALE * (2 if is_ours else 1))
        draw.rounded_rectangle([p(x0, y0), p(x1, y0 + TITLE_H)], radius=8 * SCALE, fill=OURS if is_ours else TITLE)
        label = node.get("title") or display.get(node["type"], node["type"])
        draw.ellipse([p(x0 + 10, y0 + 11), p(x0 + 18, y0 + 19)], fill="#4DD0E1" if is_ours else "#888888")
        draw.text(p(x0 + 26, y0 + 6), label, fill=TEXT, font=font)
        for i, slot in enumerate(node.get("inputs", [])):
            sx, sy = socket(node_id, i, False)
            draw.ellipse([p(sx - 5, sy - 5), p(sx + 5, sy + 5)], fill=LINK_COLOURS.get(slot["type"], "#aaaaaa"))
            draw.text(p(sx + 12, sy - 8), slot["name"], fill=DIM, font=small)
        for i, slot in enumerate(node.get("outputs", [])):
            sx, sy = socket(node_id, i, True)
            draw.ellipse([p(sx - 5, sy - 5), p(sx + 5, sy + 5)], fill=LINK_COLOURS.get(slot["type"], "#aaaaaa"))
            text = slot.get("name", slot["type"])
            width = draw.textlength(text, font=small) / SCALE
            draw.text(p(sx - 12 - width, sy - 8), text, fill=DIM, font=small)
        rows = max(len(node.get("inputs", [])), len(node.get("outputs", [])))
        names = widget_names.get(node["type"], [])
        y = y0 + TITLE_H + ROW_H * rows + 2
        for i, value in enumerate(node.get("widgets_values", [])):
            tall = isinstance(value, str) and len(value) > 34
            h = ROW_H * (2 if tall else 1) - 4
            draw.rounded_rectangle([p(x0 + 10, y), p(x1 - 10, y + h)], radius=6 * SCALE, fill="#222222")
            name = names[i] if i < len(names) else ""
            if tall:
                draw.text(p(x0 + 18, y + 2), name, fill=DIM, font=small)
                draw.text(p(x0 + 18, y + 20), _value(value), fill=TEXT, font=small)
            else:
                draw.text(p(x0 + 18, y + 3), name, fill=DIM, font=small)
                text = _value(value)
                width = draw.textlength(text, font=small) / SCALE
                draw.text(p(x1 - 18 - width, y + 3), text, fill=TEXT, font=small)
            y += h + 4
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path, optimize=True)
    return out_path


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: render_graph.py WORKFLOW.json OUT.png [TITLE]")
    print(render(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else ""))
