"""The benchmark command runs on real ComfyUI and writes valid JSON (a smoke test: no timing
assertions; speed is judged from the printed ratios, never by tests)."""

import json
import os
import statistics
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


def test_benchmark_tgate_v2_reuses_self_attention_in_the_profiled_step(comfy, tmp_path):
    out = tmp_path / "bench_v2.json"
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_PATH))
    # gate_at 0.75 gates after step 6 of 8, so the official schedule (warm_up 2, sp_interval 5) keeps
    # self-attention at step 2 and reuses it at steps 3 and 4; at 0.4 the gate (after step 3) comes first.
    settings = "--arch tiny-sd15 --size 64 --steps 8 --runs 1 --gate-at 0.75 --variants baseline,tgate,tgate_v2 --profile"
    command = [sys.executable, "-m", "tgate_bench", *settings.split(), "--json", str(out)]
    done = subprocess.run(command, cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"baseline", "tgate", "tgate_v2"}
    v2 = result["variants"]["tgate_v2"]
    run = v2["tgate_run"]
    assert run["gate_step"] == 6 and run["num_steps"] == 8 and run["self_attention_reuses"] == 2
    assert v2["cache_bytes"] == run["peak_cache_bytes"] > 0 and v2["speedup"] > 0
    assert result["variants"]["tgate"]["tgate_run"]["self_attention_reuses"] == 0

    profile = result["profile"]
    kept, reused = profile["v2 sa kept"], profile["v2 sa reused"]
    assert (kept["step"], reused["step"]) == (2, 3)
    # Self-attention computed on the kept step; on the reuse step it is a table lookup: no op at all
    # (no to_q/to_k/to_v projection, no attention), while cross-attention still computes before the gate.
    assert kept["aten_ops_by_module"]["CrossAttention.attn1"] > 0
    assert reused["aten_ops_by_module"]["CrossAttention.attn1"] == 0
    assert reused["kernels_by_module"]["CrossAttention.attn1"] == 0
    assert reused["aten_ops_by_module"]["CrossAttention.attn2"] == kept["aten_ops_by_module"]["CrossAttention.attn2"] > 0
    assert reused["aten_ops"] < kept["aten_ops"]
    assert profile["after gate"]["aten_ops_by_module"]["CrossAttention.attn2"] == 0  # V1's cross-attention reuse
    assert "aten ops in CrossAttention.attn1" in done.stdout

    report = subprocess.run([sys.executable, "-m", "tgate_bench.report", str(out)], cwd=PACK_ROOT, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    v2_row = next(line for line in report.stdout.splitlines() if line.startswith("| bench_v2 |") and "in 8 steps" in line)
    assert f"{v2['speedup']:.3f}x" in v2_row


def test_benchmark_deepcache_variants_skip_the_deep_blocks_in_the_profiled_step(comfy, tmp_path):
    out = tmp_path / "bench_deepcache.json"
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_PATH))
    # 8 steps, gate after step 3: DeepCache refreshes at 0 and 3, 2 (the step before the gate) and 3
    # (the gate), then 6; deepcache alone (gate_at 1.0) at 0, 3 and 6.
    settings = "--arch tiny-sd15 --size 64 --steps 8 --runs 1 --variants baseline,deepcache,tgate_deepcache --profile"
    command = [sys.executable, "-m", "tgate_bench", *settings.split(), "--json", str(out)]
    done = subprocess.run(command, cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    alone, combined = result["variants"]["deepcache"]["tgate_run"], result["variants"]["tgate_deepcache"]["tgate_run"]
    assert alone["single_branch_evaluations"] == 0 and alone["deep_block_reuses"] == 5
    assert combined["gate_step"] == 3 and combined["single_branch_evaluations"] == 5 and combined["deep_block_reuses"] == 4
    assert combined["peak_deep_cache_bytes"] > 0 and result["variants"]["tgate_deepcache"]["cache_bytes"] > 0
    assert "tgate_deepcache over deepcache alone: " in done.stdout

    profile = result["profile"]
    refresh, reuse = profile["dc refresh"], profile["dc reuse"]
    assert (refresh["step"], reuse["step"]) == (3, 4)
    # Branch 0: of tiny-sd15's ResBlocks and transformers only those of the last output block (one
    # of each) compute; every other one returns at once, without an aten op.
    ops = reuse["aten_ops_by_module"]
    assert 0 < ops["ResBlock"] < refresh["aten_ops_by_module"]["ResBlock"] / 5
    assert 0 < ops["SpatialTransformer"] < refresh["aten_ops_by_module"]["SpatialTransformer"] / 5
    assert reuse["aten_ops"] < refresh["aten_ops"] / 3


def _timed(*runs_s):
    """A variant's results as the benchmark computes them from its timed runs (no timing here)."""
    return {"runs_s": list(runs_s), "spread_pct": 100 * (max(runs_s) - min(runs_s)) / statistics.median(runs_s)}


def test_the_benchmark_warns_when_the_spread_says_the_machine_is_too_busy():
    from tgate_bench.__main__ import MAX_SPREAD_PCT, spread_warning

    quiet = {"baseline": _timed(10.0, 10.2, 10.1), "tgate": _timed(7.0, 7.1, 7.05)}
    assert spread_warning(quiet) is None
    busy = {"baseline": _timed(10.0, 10.2, 10.1), "tgate": _timed(6.0, 9.0, 7.0)}  # 43 % spread
    warning = spread_warning(busy)
    assert warning.startswith("WARNING:") and "too busy" in warning and "tgate" in warning and "baseline" not in warning
    assert "42.9 %" in warning and f"{MAX_SPREAD_PCT:g} %" in warning
    assert spread_warning(busy, max_spread_pct=50.0) is None  # --max-spread raises the limit
    assert "unknown" in spread_warning({"baseline": _timed(10.0), "tgate": _timed(7.0)})  # one run: noise not measured


def test_the_report_carries_the_spread_warning_with_the_command(tmp_path, capsys):
    from tgate_bench import report

    result = {
        "command": "python -m tgate_bench --arch tiny-sd15",
        "date": "2026-01-01T00:00:00+00:00",
        "comfyui": "0.3.64",
        "torch": "2.9.0",
        "device": "cpu",
        "variants": {"baseline": {"median_s": 1.0, "speedup": 1.0, **_timed(0.8, 1.0, 1.2)}},
        "bound": None,
        "spread_warning": "WARNING: too busy",
    }
    path = tmp_path / "row.json"
    path.write_text(json.dumps(result))
    assert report.main([str(path)]) == 0
    (footnote,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- row:")]
    assert "`python -m tgate_bench --arch tiny-sd15` (cpu, ComfyUI 0.3.64, torch 2.9.0, 2026-01-01" in footnote
    assert footnote.endswith("WARNING: too busy")
