"""Every UI-format workflow in example_workflows/ loads against the registered nodes: node types
exist, links join matching types, and widget values fit the inputs they fill. Each API-format twin
describes the same graph with the same values.

The template browser of ComfyUI's frontend (1.27) shows a custom node pack's example as a card whose
title is the file name, whose description is the file name with "-" and "_" turned into spaces, and
whose thumbnail is the .jpg of the same name; the layout tests check what a user sees once it is
loaded: no node covers another, every widget fits in its node, and group titles are in the saved view."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import struct

import pytest
from conftest import PACK_ROOT

EXAMPLES = PACK_ROOT / "example_workflows"
UI_WORKFLOWS = sorted(EXAMPLES.glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_INPUTS = ("ckpt_name", "vae_name", "lora_name", "unet_name", "clip_name")  # the user's own model files


@pytest.fixture(scope="module")
def mappings(comfy):
    """The node classes a server registers: nodes.py, the pack and ComfyUI's own comfy_extras/ nodes."""
    if "ModelSamplingSD3" not in comfy.nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(comfy.nodes.init_builtin_extra_nodes())
    return comfy.nodes.NODE_CLASS_MAPPINGS


def api_twin(path):
    """The API-format twin a UI workflow names in extra.tgate_api_twin (the UI file's name is its title)."""
    return path.parent / json.loads(path.read_text())["extra"]["tgate_api_twin"]


def test_there_are_example_workflows():
    assert UI_WORKFLOWS and all(api_twin(p).is_file() for p in UI_WORKFLOWS)
    twins = sorted(api_twin(p).resolve() for p in UI_WORKFLOWS)
    assert twins == sorted(p.resolve() for p in (EXAMPLES / "api").glob("*.json")), "one API twin per UI workflow"


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
    api = json.loads(api_twin(path).read_text())
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
        # A widget turned into an input and linked (the probe's suggested_gate_at into gate_at) is a link in the twin.
        linked = {i["name"]: i["link"] for i in node["inputs"] if "widget" in i and i.get("link") is not None}
        for name, link in linked.items():
            _, src, src_slot, *_ = next(entry for entry in ui["links"] if entry[0] == link)
            assert twin["inputs"][name] == [str(src), src_slot], (node["type"], name)
        kept = [(n, v) for n, v in zip(names, values, strict=True) if n not in linked]
        assert {n: twin["inputs"][n] for n, _ in kept} == dict(kept), node["type"]


# What the frontend (1.27) draws, in graph units: a node's title bar sits above its pos, 30 high; its
# body holds 20 per slot row, 6 of padding and, if it has widgets, 8 more plus 24 per widget (54 for a
# multiline text box). A group's title band is font_size * 1.4 high.
TITLE_H = 30
# The canvas a 1280x720 window leaves (the frontend's side bar and top bars take 64 and 78 pixels).
VIEW_W, VIEW_H = 1280 - 64, 720 - 78
UNSAFE_IN_NAME = re.compile(r'[-_\\/:*?"<>|#%&+]')


def rect(node) -> tuple[float, float, float, float]:
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h


def overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def on_screen(box, ds) -> bool:
    (ox, oy), s = ds["offset"], ds["scale"]
    x0, y0, x1, y1 = ((box[0] + ox) * s, (box[1] + oy) * s, (box[2] + ox) * s, (box[3] + oy) * s)
    return 0 <= x0 and 0 <= y0 and x1 <= VIEW_W and y1 <= VIEW_H


def group_boxes(group):
    """(whole rectangle, title band, estimated title text width) of a group."""
    x, y, w, h = group["bounding"]
    font = group.get("font_size", 24)
    return (x, y, x + w, y + h), (x, y, x + w, y + font * 1.4), 0.6 * font * len(group["title"])


def test_each_template_has_a_readable_title_and_description():
    """The card shows the file name as title and, with - and _ as spaces, as description: so the name is
    the title, short enough for the card's two lines, and free of - and _ so the description reads the same."""
    for path in UI_WORKFLOWS:
        title = path.stem
        description = re.sub(r"[-_]", " ", title).strip()
        assert not UNSAFE_IN_NAME.search(title) and title.isascii(), f"{title!r}: a title, not a file name"
        assert description == title and 10 <= len(title) <= 40 and title[0].isupper(), title
        assert "TGATE" in title, f"{title!r} should say it is a T-GATE example"
    assert len({p.stem.lower() for p in UI_WORKFLOWS}) == len(UI_WORKFLOWS)


def test_the_template_category_has_a_label():
    """The browser's side bar names the category templateWorkflows.category.<custom_nodes folder>."""
    labels = json.loads((PACK_ROOT / "locales" / "en" / "main.json").read_text())["templateWorkflows"]["category"]
    for folder in ("ComfyUI-TGATE", "comfyui-tgate"):
        assert "T-GATE" in labels[folder]


def jpeg_size(data: bytes) -> tuple[int, int]:
    assert data[:3] == b"\xff\xd8\xff", "not a JPEG"
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    raise AssertionError("JPEG without a frame header")


def test_each_template_has_its_own_thumbnail():
    """The card loads <name>.jpg; each workflow has one, large enough for the 256-pixel card, all different."""
    digests = {}
    for path in UI_WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"no thumbnail {thumb.name}"
        data = thumb.read_bytes()
        width, height = jpeg_size(data)
        assert min(width, height) >= 256 and 0.75 <= width / height <= 1.34, (thumb.name, width, height)
        digests.setdefault(hashlib.sha256(data).hexdigest(), []).append(thumb.name)
    assert all(len(names) == 1 for names in digests.values()), f"identical thumbnails: {list(digests.values())}"
    orphans = {p.stem for p in EXAMPLES.glob("*.jpg")} - {p.stem for p in UI_WORKFLOWS}
    assert not orphans, f"thumbnails without a workflow: {orphans}"


def test_fidelity_branch_is_left_at_auto():
    for path in UI_WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in ("TGate", "TGateAdvanced"):
                assert node["widgets_values"][1] == "auto", path.name
        for node in json.loads(api_twin(path).read_text()).values():
            if node["class_type"] in ("TGate", "TGateAdvanced"):
                assert node["inputs"]["fidelity_branch"] == "auto", api_twin(path).name


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_no_node_covers_another(path):
    nodes = json.loads(path.read_text())["nodes"]
    pairs = [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1 :] if overlap(rect(a), rect(b))]
    assert not pairs, [(a.get("title", a["type"]), b.get("title", b["type"])) for a, b in pairs]


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_every_widget_fits_in_its_node(mappings, path):
    """A node saved smaller than the frontend's minimum size cuts off its last widgets, and one with a
    title wider than the node is widened on load over its neighbours."""
    problems = []
    for node in json.loads(path.read_text())["nodes"]:
        widgets = widget_inputs(mappings[node["type"]])
        rows = max(len([i for i in node["inputs"] if "widget" not in i]), len(node["outputs"]))
        heights = [54 if kind == "STRING" and options.get("multiline") else 24 for _, kind, options, _ in widgets]
        min_h = 20 * rows + 6 + (8 + sum(heights) if heights else 0)
        title = node.get("title", node["type"])
        min_w = max(210, 7.5 * len(title) + 40)
        if node["size"][1] < min_h or node["size"][0] < min_w:
            problems.append(f"{title}: size {node['size']} under {[min_w, min_h]}")
    assert not problems, problems


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_groups_and_the_tgate_node_are_in_the_saved_view(path):
    workflow = json.loads(path.read_text())
    ds = workflow["extra"]["ds"]
    assert workflow["groups"], "each example explains its T-GATE settings in a group"
    for group in workflow["groups"]:
        whole, band, text_w = group_boxes(group)
        assert on_screen(band, ds), f"group title {group['title']!r} starts off screen at {ds}"
        assert text_w <= whole[2] - whole[0], f"group title {group['title']!r} wider than its group"
        for node in workflow["nodes"]:
            if overlap(rect(node), whole):
                below_title = (whole[0], band[3], whole[2], whole[3])
                assert inside(rect(node), below_title), f"{node['type']} straddles group {group['title']!r}"
    tgate = [n for n in workflow["nodes"] if n["type"] in ("TGate", "TGateAdvanced")]
    assert tgate and all(on_screen(rect(n), ds) for n in tgate)
