"""Every UI-format workflow in example_workflows/ loads against the registered nodes: node types
exist, links join matching types, and widget values fit the inputs they fill. Each API-format twin
describes the same graph with the same values."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import PACK_ROOT

UI_WORKFLOWS = sorted((PACK_ROOT / "example_workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_INPUTS = ("ckpt_name", "vae_name", "lora_name", "unet_name", "clip_name")  # the user's own model files


@pytest.fixture(scope="module")
def mappings(comfy):
    """The node classes a server registers: nodes.py, the pack and ComfyUI's own comfy_extras/ nodes."""
    if "ModelSamplingSD3" not in comfy.nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(comfy.nodes.init_builtin_extra_nodes())
    return comfy.nodes.NODE_CLASS_MAPPINGS


def test_there_are_example_workflows():
    assert UI_WORKFLOWS and all((p.parent / "api" / p.name).is_file() for p in UI_WORKFLOWS)


def widget_inputs(node_class) -> list[tuple[str, str, dict, list | None]]:
    """(name, type, options, combo choices) of each widget, in the order the frontend lays them out."""
    inputs = node_class.INPUT_TYPES()
    widgets = []
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
            kind = "COMBO" if choices is not None else kind
            if kind in WIDGET_TYPES:
                widgets.append((name, kind, options, choices))
                if options.get("control_after_generate"):
                    widgets.append(("control_after_generate", "COMBO", {}, ["fixed", "increment", "decrement", "randomize"]))
    return widgets


def fits(kind, options, choices, value, name) -> str | None:
    if kind == "COMBO":
        if name.endswith(FILE_INPUTS):
            return None if isinstance(value, str) else "not a file name"
        return None if value in choices else f"{value!r} not in {choices}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else "not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else "not a string"
    if kind == "INT" and not (isinstance(value, int) and not isinstance(value, bool)):
        return "not an integer"
    if kind == "FLOAT" and not isinstance(value, (int, float)):
        return "not a number"
    if value < options.get("min", float("-inf")) or value > options.get("max", float("inf")):
        return f"{value} outside [{options.get('min')}, {options.get('max')}]"
    return None


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_fits_the_registered_nodes(mappings, path):
    workflow = json.loads(path.read_text())
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        node_class = mappings.get(node["type"])
        if node_class is None:
            problems.append(f"node {node['id']}: unknown type {node['type']}")
            continue
        widgets = widget_inputs(node_class)
        values = node.get("widgets_values", [])
        if len(values) != len(widgets):
            problems.append(f"node {node['id']} {node['type']}: {len(values)} widget values for {len(widgets)} widgets")
            continue
        for (name, kind, options, choices), value in zip(widgets, values, strict=True):
            problem = fits(kind, options, choices, value, name)
            if problem:
                problems.append(f"node {node['id']} {node['type']}.{name}: {problem}")
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        out_kind = nodes[src]["outputs"][src_slot]["type"]
        in_kind = nodes[dst]["inputs"][dst_slot]["type"]
        declared = mappings[nodes[dst]["type"]].INPUT_TYPES()["required"].get(nodes[dst]["inputs"][dst_slot]["name"])
        if not (out_kind == in_kind == kind) or (declared and declared[0] != kind):
            problems.append(f"link {link_id}: {out_kind} -> {in_kind} ({kind})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_api_twin_describes_the_same_graph(mappings, path):
    ui = json.loads(path.read_text())
    api = json.loads((path.parent / "api" / path.name).read_text())
    assert sorted(n["type"] for n in ui["nodes"]) == sorted(n["class_type"] for n in api.values())
    for node in ui["nodes"]:
        twin = api[str(node["id"])]
        assert twin["class_type"] == node["type"]
        names = [name for name, *_ in widget_inputs(mappings[node["type"]]) if name != "control_after_generate"]
        values = [
            v
            for (name, *_), v in zip(widget_inputs(mappings[node["type"]]), node["widgets_values"], strict=True)
            if name != "control_after_generate"
        ]
        assert {n: twin["inputs"][n] for n in names} == dict(zip(names, values, strict=True)), node["type"]
