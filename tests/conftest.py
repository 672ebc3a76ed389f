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


from tgate_testkit.comfy_env import MISSING as COMFYUI_MISSING  # noqa: E402
from tgate_testkit.comfy_env import find_comfyui  # noqa: E402

COMFYUI_PATH = find_comfyui()


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


# CI sets TGATE_NO_SKIPS=1: there every test must run, so a skip is a failure, except for tests that
# need CUDA (CI has no GPU). Their reasons are printed either way (`-rfEs` in pyproject.toml).
NO_SKIPS = os.environ.get("TGATE_NO_SKIPS") == "1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if NO_SKIPS and report.skipped and "CUDA" not in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"skipped, but TGATE_NO_SKIPS=1 allows CUDA-only skips alone: {report.longrepr}"
    return report


@pytest.fixture(scope="session")
def comfy():
    """The ComfyUI runtime with the pack loaded through ComfyUI's own custom-node loader."""
    if COMFYUI_PATH is None:
        pytest.skip(COMFYUI_MISSING)
    from tgate_testkit.runtime import ComfyRuntime

    return ComfyRuntime.load(COMFYUI_PATH, PACK_ROOT)
