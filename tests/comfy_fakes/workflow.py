"""Validation of ComfyUI workflow files (the UI format: nodes, links, widgets_values) against node definitions.

How the ComfyUI frontend maps a node definition to a saved node:
- inputs whose type is INT, FLOAT, STRING, BOOLEAN or a list (combo) are widgets; their values are stored in
  `widgets_values` in definition order (required, then optional);
- an INT with a "control after generate" widget is followed by its value: the frontend (1.27) adds one where
  `control_after_generate ?? name in ["seed", "noise_seed"]` holds, so `control_after_generate: False` opts out;
  a combo with image_upload is followed by the upload widget's value;
- every other input is a socket in `inputs` ({name, type, link}); outputs list {name, type, links};
- `links` holds [id, origin node, origin slot, target node, target slot, type].
"""
from __future__ import annotations

from .core_nodes import CORE_NODES, FILES

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def pack_definitions(node_class_mappings: dict) -> dict:
    """{node type: {"input": INPUT_TYPES(), "output": RETURN_TYPES, "names": RETURN_NAMES}} for a pack."""
    return {name: {"input": cls.INPUT_TYPES(), "output": tuple(cls.RETURN_TYPES),
                   "names": tuple(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}
            for name, cls in node_class_mappings.items()}


def all_definitions(node_class_mappings: dict) -> dict:
    core = {name: {**d, "names": d["output"]} for name, d in CORE_NODES.items()}
    return {**core, **pack_definitions(node_class_mappings)}


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind == FILES or kind in WIDGET_TYPES


def ordered_inputs(definition: dict) -> list[tuple[str, object, dict, bool]]:
    """(name, type, options, required) in definition order."""
    out = []
    for section, required in (("required", True), ("optional", False)):
        for name, spec in definition["input"].get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            out.append((name, kind, options, required))
    return out


def widget_slots(definition: dict) -> list[tuple[str, object, dict]]:
    """The widgets_values layout: (name, type, options), with the extra control / upload slots as
    ("<name>:control", "CONTROL", {}) and ("<name>:upload", "UPLOAD", {})."""
    slots = []
    for name, kind, options, _ in ordered_inputs(definition):
        if not _is_widget(kind):
            continue
        slots.append((name, kind, options))
        control = options.get("control_after_generate")
        if kind == "INT" and (name in ("seed", "noise_seed") if control is None else control):
            slots.append((name + ":control", "CONTROL", {}))
        if options.get("image_upload"):
            slots.append((name + ":upload", "UPLOAD", {}))
    return slots


def check_value(kind, options: dict, value) -> str | None:
    """Why `value` does not fit a widget, or None."""
    if kind == "CONTROL":
        return None if value in CONTROL_VALUES else f"control value {value!r}"
    if kind == "UPLOAD":
        return None if value == "image" else f"upload widget value {value!r}"
    if kind == FILES:
        return None if isinstance(value, str) and value else f"file name {value!r}"
    if isinstance(kind, list):
        return None if value in kind else f"{value!r} is not one of {kind[:6]}..."
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{value!r} is not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{value!r} is not a number"
    if "min" in options and value < options["min"]:
        return f"{value!r} is below the minimum {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{value!r} is above the maximum {options['max']}"
    return None


def validate(workflow: dict, definitions: dict) -> list[str]:
    """Every problem found, as readable lines; [] for a workflow ComfyUI can load and run as drawn."""
    errors: list[str] = []
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    links = {link[0]: link for link in workflow.get("links", [])}
    if len(nodes) != len(workflow.get("nodes", [])):
        errors.append("duplicate node ids")
    if nodes and workflow.get("last_node_id", 0) < max(nodes):
        errors.append("last_node_id is below the highest node id")
    if links and workflow.get("last_link_id", 0) < max(links):
        errors.append("last_link_id is below the highest link id")
    for node_id, node in nodes.items():
        where = f"node {node_id} ({node.get('type')})"
        definition = definitions.get(node.get("type"))
        if definition is None:
            errors.append(f"{where}: unknown node type")
            continue
        inputs = {name: (kind, required) for name, kind, _, required in ordered_inputs(definition)}
        sockets = {name for name, (kind, _) in inputs.items() if not _is_widget(kind)}
        seen = set()
        for slot in node.get("inputs", []):
            name = slot.get("name")
            if name not in inputs:
                errors.append(f"{where}: input {name!r} does not exist")
                continue
            if name not in sockets and not slot.get("widget"):
                errors.append(f"{where}: widget {name!r} listed as a socket")
            seen.add(name)
            kind = inputs[name][0]
            expected = "COMBO" if isinstance(kind, list) or kind == FILES else kind
            if slot.get("type") != expected:
                errors.append(f"{where}: input {name!r} has type {slot.get('type')!r}, the node takes {expected!r}")
            if slot.get("link") is None and inputs[name][1] and name in sockets:
                errors.append(f"{where}: required input {name!r} is not connected")
        for name in sockets - seen:
            if inputs[name][1]:
                errors.append(f"{where}: required input {name!r} is missing")
        outputs = node.get("outputs", [])
        if [o.get("type") for o in outputs] != list(definition["output"]):
            types = [o.get('type') for o in outputs]
            errors.append(f"{where}: outputs {types} differ from {list(definition['output'])}")
        slots = widget_slots(definition)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            errors.append(f"{where}: {len(values)} widget values for {len(slots)} widgets "
                          f"({', '.join(s[0] for s in slots)})")
        else:
            for (name, kind, options), value in zip(slots, values):
                problem = check_value(kind, options, value)
                if problem:
                    errors.append(f"{where}: widget {name!r}: {problem}")
    for link_id, link in links.items():
        if len(link) != 6:
            errors.append(f"link {link_id}: malformed")
            continue
        _, origin, origin_slot, target, target_slot, kind = link
        if origin not in nodes or target not in nodes:
            errors.append(f"link {link_id}: joins a node that does not exist")
            continue
        outputs, inputs = nodes[origin].get("outputs", []), nodes[target].get("inputs", [])
        if origin_slot >= len(outputs) or target_slot >= len(inputs):
            errors.append(f"link {link_id}: slot out of range")
            continue
        out, into = outputs[origin_slot], inputs[target_slot]
        if not (out.get("type") == kind == into.get("type")):
            errors.append(f"link {link_id}: {out.get('type')} -> {into.get('type')} (link says {kind})")
        if link_id not in (out.get("links") or []):
            errors.append(f"link {link_id}: not listed by its origin's output")
        if into.get("link") != link_id:
            errors.append(f"link {link_id}: its target input points at link {into.get('link')}")
    for node_id, node in nodes.items():
        for out in node.get("outputs", []):
            for link_id in out.get("links") or []:
                if link_id not in links:
                    errors.append(f"node {node_id}: output {out.get('name')!r} lists missing link {link_id}")
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] not in links:
                errors.append(f"node {node_id}: input {slot.get('name')!r} points at missing link {slot['link']}")
    return errors
