"""A template-browser thumbnail (<name>.jpg) drawn with Pillow from an example workflow's files, for a
machine without the browser capture.py needs: the T-GATE group's title and the T-GATE node with its
settings, in the frontend's colours, as capture.py frames them.

    python docs/screenshots/draw_thumbnail.py "SD3.5 text to image with TGATE"   # needs Pillow

The settings are the API twin's (its non-link inputs, in the node's widget order); the node's title is
the UI file's, or T-GATE / T-GATE (advanced).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
SIDE = 768  # as capture.py's THUMB_PX
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
COLOURS = {
    "canvas": (32, 32, 32),
    "group": (74, 118, 147),
    "group_body": (33, 42, 49),
    "node_title": (53, 53, 53),
    "node_body": (34, 34, 34),
    "widget": (45, 45, 45),
    "name": (150, 150, 150),
    "value": (235, 235, 235),
}
TITLES = {"TGate": "T-GATE", "TGateAdvanced": "T-GATE (advanced)"}


def settings(name: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(group title, node title, [(widget, shown value)]) of the example `name`."""
    ui = json.loads((EXAMPLES / f"{name}.json").read_text())
    api = json.loads((EXAMPLES / ui["extra"]["tgate_api_twin"]).read_text())
    node = next(n for n in ui["nodes"] if n["type"] in TITLES)
    inputs = api[str(node["id"])]["inputs"]
    shown = [(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in inputs.items() if not isinstance(v, list)]
    return ui["groups"][0]["title"], node.get("title", TITLES[node["type"]]), shown


def draw(name: str) -> Image.Image:
    group_title, node_title, widgets = settings(name)
    image = Image.new("RGB", (SIDE, SIDE), COLOURS["canvas"])
    d = ImageDraw.Draw(image)
    big, small = ImageFont.truetype(FONT, 36), ImageFont.truetype(FONT, 26)
    d.rectangle((20, 20, SIDE - 28, SIDE - 38), fill=COLOURS["group_body"], outline=COLOURS["group"], width=4)
    d.rectangle((20, 20, SIDE - 28, 110), fill=COLOURS["group"])
    d.text((46, 65), group_title, font=big, fill=COLOURS["value"], anchor="lm")
    top, row = 150, 60
    bottom = top + 60 + row * len(widgets) + 24
    d.rounded_rectangle((80, top, SIDE - 88, bottom), radius=10, fill=COLOURS["node_body"])
    d.rounded_rectangle((80, top, SIDE - 88, top + 60), radius=10, fill=COLOURS["node_title"])
    d.text((100, top + 30), node_title, font=small, fill=COLOURS["value"], anchor="lm")
    for i, (widget, value) in enumerate(widgets):
        y = top + 80 + row * i
        d.rounded_rectangle((94, y, SIDE - 102, y + 44), radius=22, fill=COLOURS["widget"])
        d.text((120, y + 22), widget, font=small, fill=COLOURS["name"], anchor="lm")
        d.text((SIDE - 128, y + 22), value, font=small, fill=COLOURS["value"], anchor="rm")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="example workflow names (the UI files' stems)")
    for name in parser.parse_args().names:
        draw(name).save(EXAMPLES / f"{name}.jpg", quality=88, optimize=True)


if __name__ == "__main__":
    main()
