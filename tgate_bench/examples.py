"""Try the example workflows without weights: write tiny random-weight model files, start a real ComfyUI
server on them, and run each API example workflow with T-GATE and with gate_at 1.0 (T-GATE off).

    python -m tgate_bench.examples [--models-dir DIR] [--workflows tgate_sd15_txt2img,...] [--comfyui PATH]

Every file of example_workflows/api/ is run (PLANS) or listed in SKIPPED with the reason; a file in
neither (or a name in either without its file) makes the command fail before it runs anything.

DIR (default: a new temporary folder) is the server's --base-directory: the files go to DIR/models/...,
a copy of this pack and comfy_tiny_options.py to DIR/custom_nodes, images to DIR/output. ComfyUI's
own models folder is used only if you pass it. Image sizes, video frames and steps are reduced so a
CPU runs each workflow in seconds (printed as it goes); the rest of each graph is the file's. A workflow
passes when it runs, saves its outputs, T-GATE acted in the T-GATE run (the pack's run summary in the
server's log saved CFG branch evaluations) and its saved images are finite (not one flat colour).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tgate_testkit.comfy_env import MISSING, PACK_ROOT, find_comfyui, import_comfyui
from tgate_testkit.server import Server

WORKFLOWS = PACK_ROOT / "example_workflows" / "api"
# Per workflow: the files it loads (tgate_testkit.model_files.FILES names) by loader input, and the
# sizes a CPU runs in seconds (PixArt's position embedding needs a latent side above 32).
PLANS = {
    "tgate_sd15_txt2img": ({"ckpt_name": "sd15"}, {"width": 64, "height": 64}),
    "tgate_sd15_probe": ({"ckpt_name": "sd15"}, {"width": 64, "height": 64}),
    "tgate_sdxl_txt2img": ({"ckpt_name": "sdxl"}, {"width": 64, "height": 64}),
    "tgate_advanced_sdxl_txt2img": ({"ckpt_name": "sdxl"}, {"width": 64, "height": 64}),
    "tgate_sd35_txt2img": ({"ckpt_name": "sd35"}, {"width": 64, "height": 64}),
    "tgate_deepcache_sdxl_txt2img": ({"ckpt_name": "sdxl"}, {"width": 64, "height": 64}),
    "tgate_pixart_sigma_txt2img": (
        {"unet_name": "pixart-sigma", "clip_name": "pixart-t5", "vae_name": "sdxl-vae"},
        {"width": 384, "height": 384},
    ),
    "tgate_wan21_t2v": (
        {"unet_name": "wan21", "clip_name": "wan-umt5", "vae_name": "wan21-vae"},
        {"width": 64, "height": 64, "length": 5},
    ),
}
# Workflows the command does not run, each with the reason (printed before and after the runs). None today.
SKIPPED: dict[str, str] = {}
# What a workflow's times mean where they differ from "one sampling with T-GATE, one with gate_at 1.0".
NOTES = {
    "tgate_sd15_probe": "s with T-GATE includes the probe's own ungated sampling; the gate_at 1.0 run "
    "reuses the probe's outputs (ComfyUI caches the node) and samples once",
}
LATENT_NODES = ("EmptyLatentImage", "EmptyHunyuanLatentVideo", "EmptySD3LatentImage")
TGATE_NODES = ("TGate", "TGateAdvanced")
# The pack's summary of each sampling run (tgate/summary.py), in the server's log: T-GATE acted where a
# run of the T-GATE prompt saved CFG branch evaluations.
SUMMARY = re.compile(r"^T-GATE: .*; (\d+) of (\d+) CFG branch evaluations saved", re.MULTILINE)
# What numpy prints when SaveImage casts a NaN image to 8 bits (once per server process).
NAN_CAST = "invalid value encountered in cast"


def log(message: str) -> None:
    print(f"[tgate examples] {message}", flush=True)


@dataclass
class Result:
    workflow: str
    ok: bool
    seconds_tgate: float | None = None
    seconds_gate_1: float | None = None
    outputs: list | None = None  # files the T-GATE run saved, relative to the output folder
    error: str = ""


def unaccounted(folder: Path | None = None) -> list[str]:
    """Problems with the workflow lists: a file in `folder` neither run (PLANS) nor skipped (SKIPPED),
    a name in both, a name in either without its file. Empty when every file is accounted for."""
    folder = folder or WORKFLOWS
    files = {path.stem for path in folder.glob("*.json")}
    problems = [
        f"{name}.json is neither run (PLANS) nor skipped with a reason (SKIPPED)"
        for name in sorted(files - set(PLANS) - set(SKIPPED))
    ]
    problems += [f"{name} is both run and skipped" for name in sorted(set(PLANS) & set(SKIPPED))]
    problems += [
        f"{name} is listed but {folder / name}.json does not exist" for name in sorted((set(PLANS) | set(SKIPPED)) - files)
    ]
    problems += [f"{name} is skipped without a reason" for name, reason in SKIPPED.items() if not reason.strip()]
    return problems


def prepare(workflow: dict, files: dict, sizes: dict, steps: int | None) -> tuple[dict, list[str]]:
    """The workflow with the tiny files' names substituted and the sizes (and steps) reduced; the changes."""
    from tgate_testkit.model_files import FILES

    changes = []
    for node_id, node in workflow.items():
        inputs = node["inputs"]
        for name, key in files.items():
            if name in inputs:
                changes.append(f"{node_id}.{name}: {inputs[name]} -> {FILES[key][1]}")
                inputs[name] = FILES[key][1]
        if node["class_type"] in LATENT_NODES:
            for name, value in sizes.items():
                if name in inputs and inputs[name] != value:
                    changes.append(f"{node_id}.{name}: {inputs[name]} -> {value}")
                    inputs[name] = value
        if steps and "steps" in inputs and inputs["steps"] != steps:
            changes.append(f"{node_id}.steps: {inputs['steps']} -> {steps}")
            inputs["steps"] = steps
    return workflow, changes


def with_gate_at(workflow: dict, gate_at: float | None = None, steps: int | None = None) -> dict:
    out = json.loads(json.dumps(workflow))
    for node in out.values():
        if gate_at is not None and node["class_type"] in TGATE_NODES:
            node["inputs"]["gate_at"] = gate_at
        if steps is not None and "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return out


def prepare_base(base: Path, names: list[str]) -> None:
    """The model files the workflows need under base/models, the pack and the tiny-options module in
    base/custom_nodes."""
    from tgate_testkit import model_files

    needed = sorted({key for name in names for key in PLANS[name][0].values()})
    for key in needed:
        folder, filename, _ = model_files.FILES[key]
        path = base / "models" / folder / filename
        if path.is_file():
            log(f"using {path} ({path.stat().st_size / 1e6:.0f} MB)")
            continue
        started = time.monotonic()
        model_files.write(key, base / "models")
        log(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB, {time.monotonic() - started:.0f} s)")
    nodes = base / "custom_nodes"
    pack = nodes / "ComfyUI-TGATE"
    copied = pack / ".tgate-examples-copy"  # marks a copy this command made (and may replace)
    if pack.exists() and not copied.is_file():
        log(f"using the pack already installed at {pack}")  # a user's install: never replaced
    else:
        if pack.exists():
            shutil.rmtree(pack)
        shutil.copytree(PACK_ROOT, pack, ignore=shutil.ignore_patterns(".*", "__pycache__", "benchmark-results"))
        copied.touch()
    shutil.copy(PACK_ROOT / "tgate_testkit" / "comfy_tiny_options.py", nodes / "tgate_tiny_options.py")


def server_log(server: Server, start: int = 0) -> str:
    """The server's log from byte `start` on."""
    with open(server.log_path, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def not_acted(log_text: str) -> str:
    """Why the T-GATE prompt's log shows T-GATE did not act (no run saved a CFG branch evaluation); empty if it acted."""
    saved = [int(m.group(1)) for m in SUMMARY.finditer(log_text)]
    if any(saved):
        return ""
    return "T-GATE did not act: " + ("its runs saved no CFG branch evaluation" if saved else "no T-GATE run summary in the log")


def not_finite(output: Path, saved: list, log_text: str) -> str:
    """Why the saved outputs look non-finite, empty if they do not: numpy's warning for a NaN cast, or an
    image of one flat colour (SaveImage writes NaN as 0). Only images Pillow opens are read (not videos)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if NAN_CAST in log_text:
        return f"non-finite output: the log says {NAN_CAST!r}"
    for name in saved:
        try:
            with Image.open(output / name) as image:
                pixels = np.asarray(image.convert("RGB"))
        except UnidentifiedImageError:
            continue
        if pixels.min() == pixels.max():
            return f"non-finite output: {name} is one flat colour ({pixels.min()})"
    return ""


def run_workflow(server: Server, name: str, steps: int | None) -> Result:
    files, sizes = PLANS[name]
    workflow, changes = prepare(json.loads((WORKFLOWS / f"{name}.json").read_text()), files, sizes, steps)
    log(f"{name}: " + "; ".join(changes))
    try:
        # Loading and text encoding are cached by ComfyUI after the first run: a 1-step warm-up pays them.
        seconds, _ = server.run(with_gate_at(workflow, steps=1))
        log(f"{name}: warm-up (1 step, loads the models) {seconds:.1f} s")
        start = server.log_path.stat().st_size
        tgate, saved = server.run(workflow)
        log(f"{name}: with T-GATE {tgate:.1f} s, saved {', '.join(saved) or 'nothing'}")
        tgate_log = server_log(server, start)
        off, _ = server.run(with_gate_at(workflow, gate_at=1.0))
        log(f"{name}: with gate_at 1.0 {off:.1f} s")
    except Exception as e:  # noqa: BLE001 - reported per workflow
        log(f"{name}: FAILED: {e}")
        return Result(name, False, error=str(e))
    if not saved:
        return Result(name, False, tgate, off, saved, error="the workflow saved no output")
    problem = not_acted(tgate_log) or not_finite(server.base / "output", saved, tgate_log)
    if problem:
        log(f"{name}: FAILED: {problem}")
    return Result(name, not problem, tgate, off, saved, error=problem)


def table(results: list[Result]) -> str:
    rows = [("workflow", "result", "s with T-GATE", "s with gate_at 1.0")]
    for r in results:
        fmt = lambda s: f"{s:.2f}" if s is not None else "-"  # noqa: E731
        rows.append(
            (
                r.workflow,
                "ok" if r.ok else f"failed: {r.error.splitlines()[0][:120]}",
                fmt(r.seconds_tgate),
                fmt(r.seconds_gate_1),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tgate_bench.examples", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, help="base directory for the run (default: a new temporary folder)")
    parser.add_argument("--workflows", help=f"comma-separated, of: {', '.join(PLANS)} (default: all)")
    parser.add_argument("--comfyui", help="ComfyUI's folder (default: $COMFYUI_PATH, or two folders up)")
    parser.add_argument("--steps", type=int, help="sampling steps for every workflow (default: each file's own)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    problems = unaccounted()
    if problems:
        parser.exit(
            2, f"{parser.prog}: every API workflow must be run or skipped with a reason:\n  " + "\n  ".join(problems) + "\n"
        )
    for name, reason in SKIPPED.items():
        log(f"{name}: skipped: {reason}")
    names = args.workflows.split(",") if args.workflows else list(PLANS)
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        parser.error(f"unknown workflows {unknown}; choose from {list(PLANS)}")
    comfy_path = find_comfyui(args.comfyui)
    if comfy_path is None:
        parser.error(MISSING)
    base = args.models_dir or Path(tempfile.mkdtemp(prefix="tgate-tiny-models-"))
    base = base.resolve()
    base.mkdir(parents=True, exist_ok=True)
    log(f"ComfyUI base directory: {base} (models in {base / 'models'})")
    import_comfyui(comfy_path)  # the writers build ComfyUI's own modules
    prepare_base(base, names)
    with Server(comfy_path, base, timeout=args.timeout, say=log) as server:
        results = [run_workflow(server, name, args.steps) for name in names]
        if not all(r.ok for r in results):
            print(server.tail(), file=sys.stderr)
    print(table(results), flush=True)
    for r in results:
        if r.workflow in NOTES:
            log(f"{r.workflow}: {NOTES[r.workflow]}")
    for name, reason in SKIPPED.items():
        log(f"{name}: not run: {reason}")
    log(f"outputs in {base / 'output'}")
    if args.json:
        args.json.write_text(json.dumps({"base": str(base), "results": [asdict(r) for r in results]}, indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
