"""Finding and importing ComfyUI, and loading node packs through ComfyUI's own loader."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
MISSING = "ComfyUI not found: set COMFYUI_PATH or install the pack in ComfyUI/custom_nodes/"


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """ComfyUI's folder: `explicit`, else $COMFYUI_PATH, else two folders up (ComfyUI/custom_nodes/<pack>)."""
    for candidate in (explicit, os.environ.get("COMFYUI_PATH"), PACK_ROOT.parent.parent):
        if candidate and (Path(candidate) / "comfy" / "samplers.py").is_file() and (Path(candidate) / "nodes.py").is_file():
            return Path(candidate).resolve()
    return None


def comfyui_or_exit(explicit: str | os.PathLike | None = None, threads: int | None = None) -> Path:
    """The ComfyUI folder a command-line tool runs against (find_comfyui), or exit status 2 with how to
    set it; `threads`: torch's thread count for the tool."""
    comfy_path = find_comfyui(explicit)
    if comfy_path is None:
        print(MISSING, file=sys.stderr)
        raise SystemExit(2)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return comfy_path


def import_comfyui(comfy_path: Path):
    """Put ComfyUI first on sys.path (its `nodes` must win over this pack's) and import it."""
    path = str(comfy_path)
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True  # read by comfy.model_management when it is first imported
    import nodes

    if getattr(nodes, "__file__", None) and Path(nodes.__file__).resolve().parent != comfy_path.resolve():
        raise RuntimeError(f"`nodes` was imported from {nodes.__file__}, not from ComfyUI at {comfy_path}")
    return nodes


def load_pack(nodes, pack_root: Path) -> list[str]:
    """Load a custom node pack the way ComfyUI does; return the node ids it registered."""
    before = set(nodes.NODE_CLASS_MAPPINGS)
    if not asyncio.run(nodes.load_custom_node(str(pack_root))):
        raise RuntimeError(f"ComfyUI could not load the node pack at {pack_root}")
    return sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
