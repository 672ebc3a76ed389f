"""The API path end to end: a real ComfyUI server on 127.0.0.1 with the pack in its custom_nodes,
a random-weight SD1.5 checkpoint in its models folder, the API-format example workflow submitted
to /prompt, the run followed on /history, and the saved image checked.
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import COMFYUI_MISSING, COMFYUI_PATH, PACK_ROOT

from tgate_testkit.server import Server, request

WORKFLOW = PACK_ROOT / "example_workflows" / "api" / "tgate_sd15_txt2img.json"
CHECKPOINT = "tgate-test-sd15.safetensors"


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    if COMFYUI_PATH is None:
        pytest.skip(COMFYUI_MISSING)
    from tgate_testkit.model_files import write_sd15_checkpoint

    base = tmp_path_factory.mktemp("comfy_base")
    pack_files = shutil.ignore_patterns(".*", "__pycache__", "benchmark-results")
    shutil.copytree(PACK_ROOT, base / "custom_nodes" / "ComfyUI-TGATE", ignore=pack_files)
    write_sd15_checkpoint(base / "models" / "checkpoints" / CHECKPOINT)
    with Server(COMFYUI_PATH, base) as server:
        yield server


def run(server, workflow: dict) -> tuple[float, list]:
    """Queue `workflow` and wait for it; a failure shows the server's log."""
    try:
        return server.run(workflow)
    except RuntimeError as error:
        pytest.fail(f"{error}\n{server.tail(4000)}")


def api_workflow(**tgate_inputs):
    workflow = json.loads(WORKFLOW.read_text())
    workflow["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    workflow["5"]["inputs"].update(width=64, height=64)  # the CPU runs it in seconds
    workflow["2"]["inputs"].update(tgate_inputs)
    return workflow


def test_the_api_example_workflow_runs_with_tgate_and_saves_an_image(server):
    status, info = request(f"{server.url}/object_info/TGate")
    assert info["TGate"]["display_name"] == "T-GATE"

    _, saved = run(server, api_workflow())
    assert len(saved) == 1
    saved = server.base / "output" / saved[0]
    from PIL import Image

    with Image.open(saved) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
        assert len(set(image.getdata())) > 1  # a real decoded image, not a blank
    log = server.log_path.read_text()
    assert "T-GATE: 10 of 25 steps planned with text, then 15 evaluations ran the uncond branch" in log


def test_the_server_refuses_out_of_range_settings_with_the_input_named(server):
    url = server.url
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
    url = server.url
    status, info = request(f"{url}/object_info/TGateAdvanced")
    assert status == 200 and info["TGateAdvanced"]["display_name"] == "T-GATE (advanced)"
    run(server, advanced(api_workflow()))
    assert "self-attention was reused in 5 evaluations" in server.log_path.read_text()  # steps 3, 4, 6, 7 and 8 of 25
    for name, value in (("sp_interval", 0), ("fi_interval", 0), ("warm_up", -1)):
        status, answer = request(f"{url}/prompt", {"prompt": advanced(api_workflow(), **{name: value})})
        assert status == 400, answer
        errors = answer["node_errors"]["2"]["errors"]
        assert [e["extra_info"]["input_name"] for e in errors] == [name], errors


def test_the_server_serves_each_node_s_help_page_where_the_frontend_asks_for_it(server):
    """ComfyUI's frontend (1.27) takes the pack's folder from the node's python_module and fetches
    /extensions/<folder>/docs/<node id>/<locale>.md, then /extensions/<folder>/docs/<node id>.md, for
    the node library's help panel; the server maps the pack's WEB_DIRECTORY (web/) there."""
    import urllib.error
    import urllib.request

    for node_id in ("TGate", "TGateAdvanced", "TGateProbe"):
        status, info = request(f"{server.url}/object_info/{node_id}")
        assert status == 200 and info[node_id]["python_module"] == "custom_nodes.ComfyUI-TGATE"
        with urllib.request.urlopen(f"{server.url}/extensions/ComfyUI-TGATE/docs/{node_id}.md", timeout=30) as response:
            assert response.status == 200
            assert response.read() == (PACK_ROOT / "web" / "docs" / f"{node_id}.md").read_bytes()
    with pytest.raises(urllib.error.HTTPError) as missing:  # no locale variant: the frontend falls back
        urllib.request.urlopen(f"{server.url}/extensions/ComfyUI-TGATE/docs/TGate/en.md", timeout=30)
    assert missing.value.code == 404
