"""Test setup: the engine is importable as `tgate`; ComfyUI is found for the integration tests.

ComfyUI comes from COMFYUI_PATH, or from two folders up when the pack sits in
ComfyUI/custom_nodes/ as users install it. Without it the integration tests skip with one line
and the engine tests still run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: the pack's nodes.py must never shadow ComfyUI's own `nodes` module.
if str(PACK_ROOT) not in sys.path:
    sys.path.append(str(PACK_ROOT))


def find_comfyui() -> Path | None:
    candidates = [os.environ.get("COMFYUI_PATH"), str(PACK_ROOT.parent.parent)]
    for candidate in candidates:
        if candidate and (Path(candidate) / "comfy" / "samplers.py").is_file() and (Path(candidate) / "nodes.py").is_file():
            return Path(candidate).resolve()
    return None


COMFYUI_PATH = find_comfyui()
COMFYUI_MISSING = "ComfyUI not found: set COMFYUI_PATH or install the pack in ComfyUI/custom_nodes/"

if COMFYUI_PATH is not None and str(COMFYUI_PATH) not in sys.path:
    sys.path.insert(0, str(COMFYUI_PATH))


def pytest_report_header(config):
    if COMFYUI_PATH is None:
        return f"ComfyUI: none ({COMFYUI_MISSING}); integration tests skip"
    version = "?"
    version_file = COMFYUI_PATH / "comfyui_version.py"
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
    return f"ComfyUI: {COMFYUI_PATH} (version {version})"


@pytest.fixture(scope="session")
def comfy():
    """The ComfyUI runtime with the pack loaded through ComfyUI's own custom-node loader."""
    if COMFYUI_PATH is None:
        pytest.skip(COMFYUI_MISSING)
    from comfy_runtime import ComfyRuntime

    return ComfyRuntime.load(COMFYUI_PATH, PACK_ROOT)
