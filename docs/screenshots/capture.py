"""Thumbnails for example_workflows/ and the screenshots in this folder, taken in headless Chromium
against a running ComfyUI server with this pack in custom_nodes/ (as ComfyUI-TGATE):

    python main.py --cpu --listen 127.0.0.1 --port 8199          # in the ComfyUI folder
    python docs/screenshots/capture.py --url http://127.0.0.1:8199  # here; needs playwright, Pillow

It turns off the minimap and the canvas info (server-side settings of that ComfyUI), opens the
template browser on the pack's category (browser.png), opens each example from its card and
shoots it at the workflow's saved view (loaded-*.png); before those, it frames each workflow's
T-GATE group, zoomed in, for the <name>.jpg thumbnail the template browser loads. Last, it adds a
T-GATE node, opens its help page (web/docs/TGate.md) from the node library and shoots the panel
(node-help-tgate.png); `--only help` takes that one alone.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
from pathlib import Path

import requests
from PIL import Image
from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_workflows"
OUT = Path(__file__).resolve().parent
MODULE = "ComfyUI-TGATE"
THUMB_PX = 768  # the card shows 256 CSS pixels; three times that stays sharp on high-DPI screens
# headless (playwright's default), offline, with a fresh profile (playwright's default)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def thumbnail_region(workflow: dict) -> tuple[float, float, float]:
    """A square of the graph (x, y, side) from the T-GATE group's title (model and schedule) down,
    holding the T-GATE node with every widget, small enough to read on the 256-pixel card."""
    node = next(n for n in workflow["nodes"] if n["type"] in ("TGate", "TGateAdvanced"))
    _, y, _, _ = workflow["groups"][0]["bounding"]
    side = max(node["size"][0] + 45, 400)
    return node["pos"][0] - 25, y - 5, side


async def load_from_card(page, name: str) -> None:
    await page.wait_for_timeout(1000)
    await page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    await page.get_by_text("T-GATE (ComfyUI-TGATE)", exact=True).first.click()
    await page.locator(f'[data-testid="template-workflow-{name}"]').click()
    await page.wait_for_timeout(1500)


async def shoot_help(browser, url: str, node_id: str, title: str) -> None:
    """A `node_id` node on an empty canvas and its help page in the node library's panel, widened."""
    page = await browser.new_page(viewport={"width": 1600, "height": 1100}, device_scale_factor=1)
    await page.goto(url)
    await page.wait_for_function("window.app && window.app.graph", timeout=60000)
    await page.wait_for_timeout(2000)
    await page.evaluate(
        """(type) => {
            app.graph.clear();
            const node = LiteGraph.createNode(type);
            node.pos = [800, 140];
            app.graph.add(node);
            app.canvas.selectNode(node);
        }""",
        node_id,
    )
    await page.evaluate("app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")
    await page.locator(".node-lib-search-box input").first.fill(title)
    await page.wait_for_timeout(1500)
    leaves = page.locator(".node-lib-node-container")
    for i in range(await leaves.count()):  # the leaf labelled exactly `title`
        if (await leaves.nth(i).inner_text()).strip().splitlines()[0] == title:
            leaf = leaves.nth(i)
            break
    else:
        raise RuntimeError(f"no {title!r} in the node library")
    await leaf.hover()
    await leaf.locator(".help-button").click()
    help_panel = page.locator(".node-help-content")
    await help_panel.wait_for(timeout=20000)
    await page.wait_for_timeout(1500)
    heading = (ROOT / "web" / "docs" / f"{node_id}.md").read_text().splitlines()[0].lstrip("# ")
    shown = (await help_panel.inner_text()).strip().splitlines()[0]
    if shown != heading:  # the node's description, shown when the page cannot be fetched, starts otherwise
        raise RuntimeError(f"the help panel shows {shown!r}, not the help page {heading!r}")
    gutter = await page.locator(".p-splitter-gutter").first.bounding_box()
    middle = gutter["y"] + gutter["height"] / 2
    await page.mouse.move(gutter["x"] + gutter["width"] / 2, middle)
    await page.mouse.down()
    await page.mouse.move(860, middle, steps=10)
    await page.mouse.up()
    await page.evaluate("app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1.1; app.canvas.setDirty(true, true)")
    await page.mouse.move(1590, 1090)
    await page.wait_for_timeout(500)
    await page.screenshot(path=OUT / f"node-help-{slug(node_id)}.png")
    await page.close()


async def main(url: str, only: str | None) -> None:
    requests.post(f"{url}/api/settings", json=SETTINGS, timeout=10).raise_for_status()
    names = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        if only == "help":
            await shoot_help(browser, url, "TGate", "T-GATE")
            await browser.close()
            return
        page = await browser.new_page(viewport={"width": 1600, "height": 900}, device_scale_factor=1)
        await page.goto(url)
        await page.wait_for_function("window.app && window.app.graph", timeout=60000)
        await page.wait_for_timeout(2000)

        # Thumbnails: the same graph framed on the T-GATE group and zoomed in.
        hi = await browser.new_page(viewport={"width": 1600, "height": 900}, device_scale_factor=2)
        await hi.goto(url)
        await hi.wait_for_function("window.app && window.app.graph", timeout=60000)
        await hi.wait_for_timeout(2000)
        for name in names:
            workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
            x, y, side = thumbnail_region(workflow)
            box = await hi.evaluate(
                """async ([wf, name, x, y, side]) => {
                    await app.loadGraphData(wf, true, true, name);
                    const rect = app.canvas.canvas.getBoundingClientRect();
                    const px = Math.min(rect.width, rect.height);
                    app.canvas.ds.scale = px / side;
                    app.canvas.ds.offset = [-x, -y];
                    app.canvas.setDirty(true, true);
                    await new Promise((r) => setTimeout(r, 800));
                    return {x: rect.x, y: rect.y, width: px, height: px};
                }""",
                [workflow, name, x, y, side],
            )
            await hi.mouse.move(1500, 600)  # empty canvas: no hover preview over the frame
            png = await hi.screenshot(clip=box)
            image = Image.open(io.BytesIO(png)).convert("RGB").resize((THUMB_PX, THUMB_PX), Image.LANCZOS)
            image.save(EXAMPLES / f"{name}.jpg", quality=88, optimize=True)
        # The template browser on the pack's category: titles, descriptions, thumbnails (a tall
        # window, so that every card shows).
        await page.set_viewport_size({"width": 1600, "height": 1500})
        await page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        await page.get_by_text("T-GATE (ComfyUI-TGATE)", exact=True).first.click()
        await page.wait_for_timeout(2500)
        await page.screenshot(path=OUT / "browser.png")
        await page.keyboard.press("Escape")
        await page.wait_for_timeout(1000)
        await page.set_viewport_size({"width": 1600, "height": 900})

        # Each example opened from its card, at its saved view.
        for name in names:
            await load_from_card(page, name)
            await page.mouse.move(1590, 890)
            await page.wait_for_timeout(500)
            await page.screenshot(path=OUT / f"loaded-{slug(name)}.png")

        await shoot_help(browser, url, "TGate", "T-GATE")
        await browser.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8199")
    parser.add_argument("--only", choices=["help"], help="take only the node help screenshot")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.only))
