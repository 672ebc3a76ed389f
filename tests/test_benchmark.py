"""The benchmark command runs on real ComfyUI and writes valid JSON (a smoke test: no timing
assertions; speed is judged from the printed ratios, never by tests)."""

import json
import os
import subprocess
import sys

from conftest import COMFYUI_PATH, PACK_ROOT


def test_benchmark_runs_the_tiny_model_and_writes_json(comfy, tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_PATH))
    settings = "--arch tiny-sdxl --size 64 --batch 2 --steps 6 --runs 2 --profile".split()
    command = [sys.executable, "-m", "tgate_bench", *settings, "--json", str(out)]
    done = subprocess.run(command, cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "batch-halving bound" in done.stdout
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"baseline", "cfg1", "tgate", "tgate_off"}
    for variant in result["variants"].values():
        assert len(variant["runs_s"]) == 2 and variant["median_s"] > 0
    tgate = result["variants"]["tgate"]
    assert tgate["tgate_run"]["gate_step"] == 3 and tgate["tgate_run"]["num_steps"] == 6  # gate_at 0.4 of 6 steps
    assert tgate["cache_bytes"] > 0 and result["variants"]["baseline"]["cache_bytes"] is None
    assert result["variants"]["tgate_off"]["tgate_run"] is None  # gate_at 1.0 leaves sampling alone
    assert 0 < result["bound"]["gate_fraction"] < 1 and result["comfyui"]
    profile = result["profile"]
    assert [profile[k]["step"] for k in ("before gate", "capture", "after gate")] == [1, 2, 4]
    assert all(profile[k]["aten_ops"] > 0 for k in profile)
    assert "CrossAttention.attn2" in profile["after gate"]["host_ms_by_module"]

    report = subprocess.run([sys.executable, "-m", "tgate_bench.report", str(out)], cwd=PACK_ROOT, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    table_row = next(line for line in report.stdout.splitlines() if line.startswith("| bench |"))
    assert f"{tgate['speedup']:.3f}x" in table_row and "python -m tgate_bench" in report.stdout
