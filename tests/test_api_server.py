"""The API path end to end: a real ComfyUI server on 127.0.0.1 with the pack in its custom_nodes,
a random-weight SD1.5 checkpoint in its models folder, the API-format example workflow submitted
to /prompt, the run followed on /history, and the saved image checked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import COMFYUI_MISSING, COMFYUI_PATH, PACK_ROOT

WORKFLOW = PACK_ROOT / "example_workflows" / "api" / "tgate_sd15_txt2img.json"
CHECKPOINT = "tgate-test-sd15.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, payload: dict | None = None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    if COMFYUI_PATH is None:
        pytest.skip(COMFYUI_MISSING)
    from tgate_testkit.model_files import write_sd15_checkpoint

    base = tmp_path_factory.mktemp("comfy_base")
    pack_files = shutil.ignore_patterns(".*", "__pycache__", "benchmark-results")
    shutil.copytree(PACK_ROOT, base / "custom_nodes" / "ComfyUI-TGATE", ignore=pack_files)
    write_sd15_checkpoint(base / "models" / "checkpoints" / CHECKPOINT)
    (base / "web").mkdir()  # the API needs no frontend: an empty web root stands in for the frontend package
    port = free_port()
    log_path = base / "server.log"
    command = [
        sys.executable,
        "main.py",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--front-end-root",
        str(base / "web"),
        "--disable-auto-launch",
    ]
    if not torch.cuda.is_available():
        command.append("--cpu")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                status, info = request(f"{url}/object_info/TGate")
                if status == 200 and "TGate" in info:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not serve TGate within 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url, base, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def api_workflow(**tgate_inputs):
    workflow = json.loads(WORKFLOW.read_text())
    workflow["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    workflow["5"]["inputs"].update(width=64, height=64)  # the CPU runs it in seconds
    workflow["2"]["inputs"].update(tgate_inputs)
    return workflow


def test_the_api_example_workflow_runs_with_tgate_and_saves_an_image(server):
    url, base, log_path = server
    status, info = request(f"{url}/object_info/TGate")
    assert info["TGate"]["display_name"] == "T-GATE"

    status, queued = request(f"{url}/prompt", {"prompt": api_workflow(), "client_id": "tgate-test"})
    assert status == 200, queued
    prompt_id = queued["prompt_id"]
    deadline = time.monotonic() + 300
    while True:
        status, history = request(f"{url}/history/{prompt_id}")
        entry = history.get(prompt_id) if status == 200 else None
        if entry and entry.get("status", {}).get("completed"):
            break
        if entry and entry.get("status", {}).get("status_str") == "error":
            pytest.fail(f"the prompt failed: {entry['status']}\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the prompt did not finish in 300 s:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)

    images = entry["outputs"]["8"]["images"]
    assert len(images) == 1
    saved = base / "output" / images[0].get("subfolder", "") / images[0]["filename"]
    from PIL import Image

    with Image.open(saved) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
        assert len(set(image.getdata())) > 1  # a real decoded image, not a blank
    log = log_path.read_text()
    assert "T-GATE: 10 of 25 steps planned with text, then 15 evaluations ran the uncond branch" in log


def test_the_server_refuses_out_of_range_settings_with_the_input_named(server):
    url, _, _ = server
    status, answer = request(f"{url}/prompt", {"prompt": api_workflow(gate_at=1.5)})
    assert status == 400
    errors = json.dumps(answer["node_errors"]["2"])
    assert "gate_at" in errors and "1.5" in errors
    combos = {"fidelity_branch": "both", "cache_device": "disk"}
    for name, value in combos.items():
        status, answer = request(f"{url}/prompt", {"prompt": api_workflow(**{name: value})})
        assert status == 400, answer
        errors = answer["node_errors"]["2"]["errors"]
        # Each error is reported against the wrong input only, names it, the value and the choices.
        assert [e["extra_info"]["input_name"] for e in errors] == [name], errors
        (other,) = set(combos) - {name}
        assert name in errors[0]["details"] and value in errors[0]["details"] and other not in errors[0]["details"]
        choices = {"fidelity_branch": "'auto', 'uncond', 'cond'", "cache_device": "'model_device', 'cpu'"}[name]
        assert f"not in [{choices}]" in errors[0]["details"]


def advanced(workflow: dict, **reuse) -> dict:
    """The workflow with its T-GATE node swapped for T-GATE (advanced)."""
    workflow["2"]["class_type"] = "TGateAdvanced"
    workflow["2"]["inputs"].update({"warm_up": 2, "sp_interval": 5, "fi_interval": 1, **reuse})
    return workflow


def test_the_advanced_node_runs_from_the_api_and_its_intervals_are_checked(server):
    url, _, log_path = server
    status, info = request(f"{url}/object_info/TGateAdvanced")
    assert status == 200 and info["TGateAdvanced"]["display_name"] == "T-GATE (advanced)"
    status, queued = request(f"{url}/prompt", {"prompt": advanced(api_workflow()), "client_id": "tgate-test"})
    assert status == 200, queued
    deadline = time.monotonic() + 300
    while True:
        status, history = request(f"{url}/history/{queued['prompt_id']}")
        entry = history.get(queued["prompt_id"]) if status == 200 and history else None
        if entry and entry.get("status", {}).get("completed"):
            break
        if entry and entry.get("status", {}).get("status_str") == "error" or time.monotonic() > deadline:
            pytest.fail(f"the prompt failed or timed out: {entry}\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)
    assert "self-attention was reused in 5 evaluations" in log_path.read_text()  # steps 3, 4, 6, 7 and 8 of 25
    for name, value in (("sp_interval", 0), ("fi_interval", 0), ("warm_up", -1)):
        status, answer = request(f"{url}/prompt", {"prompt": advanced(api_workflow(), **{name: value})})
        assert status == 400, answer
        errors = answer["node_errors"]["2"]["errors"]
        assert [e["extra_info"]["input_name"] for e in errors] == [name], errors
