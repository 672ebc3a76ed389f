"""The benchmark command runs on real ComfyUI and writes valid JSON (a smoke test: no timing
assertions; speed is judged from the printed ratios, never by tests)."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
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


# -- peers: several packs in one run -----------------------------------------------------------------
# A small peer pack of the tests' own (never another project's code), written into a temporary folder
# and loaded by ComfyUI's loader: a deprecated node by display name first, then the one usable node,
# then a deprecated one by ComfyUI's flag and one that is no MODEL -> MODEL patch. Its usable node
# records the inputs it was applied with beside itself (applied.jsonl).
PEER_PACK = """
import json
from pathlib import Path

APPLIED = Path(__file__).with_name("applied.jsonl")


class Patch:
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def apply(self, model, **inputs):
        with APPLIED.open("a") as out:
            out.write(json.dumps({"node": type(self).__name__, "inputs": inputs}) + "\\n")
        return (model.clone(),)


class {p}OldApply(Patch):
    pass


class {p}Apply(Patch):
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0}),
                "interval": ("INT", {"default": 2, "min": 1, "max": 10}),
            },
            "optional": {"flag": ("BOOLEAN", {"default": False}), "mode": (["fast", "exact"],), "label": ("STRING", {})},
        }


class {p}Legacy(Patch):
    DEPRECATED = True


class {p}Loader:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}


NODE_CLASS_MAPPINGS = {n: globals()[n] for n in ("{p}OldApply", "{p}Apply", "{p}Legacy", "{p}Loader")}
NODE_DISPLAY_NAME_MAPPINGS = {"{p}OldApply": "{p} Apply (Deprecated)", "{p}Apply": "{p} Apply"}
"""


def write_peer_pack(folder, prefix, usable=1):
    """A peer pack whose node ids start with `prefix`; `usable` 0 drops its usable node, 2 adds a second."""
    text = PEER_PACK.replace("{p}", prefix)
    if usable == 0:
        text = text.replace(f'"{prefix}Apply", ', "")
    if usable == 2:
        text += f"\n\nclass {prefix}Other(Patch):\n    pass\n\n\nNODE_CLASS_MAPPINGS['{prefix}Other'] = {prefix}Other\n"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(text)
    return folder


def test_variants_take_several_peers_each_with_its_node_and_inputs_in_order():
    from tgate_bench.peers import PeerError, PeerSpec, parse_variants

    text = (
        "baseline,peer=/p/ComfyUI_TGate:TGateApplySimple:start_at=0.4,tgate,"
        "peer=/p/ComfyUI-deepcache:DeepCache:cache_interval=3,cache_depth=0,deepcache,peer=/p/Other,peer=/p/Fourth::a=1"
    )
    assert parse_variants(text) == [
        "baseline",
        PeerSpec(Path("/p/ComfyUI_TGate"), "TGateApplySimple", {"start_at": "0.4"}),
        "tgate",
        PeerSpec(Path("/p/ComfyUI-deepcache"), "DeepCache", {"cache_interval": "3", "cache_depth": "0"}),
        "deepcache",
        PeerSpec(Path("/p/Other")),
        PeerSpec(Path("/p/Fourth"), None, {"a": "1"}),
    ]
    assert parse_variants("peer=/p/X:Node")[0].text == "peer=/p/X:Node"
    assert parse_variants("peer=/p/X::a=1,b=2")[0].text == "peer=/p/X::a=1,b=2"
    for bad, says in (
        ("baseline,cache_depth=0", "follows no peer"),  # NAME=VALUE continues only a peer entry with inputs
        ("peer=/p/X:Node,cache_depth=0", "follows no peer"),
        ("peer=:Node", "no path"),
        ("peer=/p/X:Node:depth", "is not NAME=VALUE"),
    ):
        with pytest.raises(PeerError, match=says):
            parse_variants(bad)


def test_peer_inputs_are_read_as_the_types_the_node_declares(tmp_path):
    import importlib.util

    from tgate_bench.peers import PeerError, node_inputs

    spec = importlib.util.spec_from_file_location("typed_pack", write_peer_pack(tmp_path / "typed_pack", "Typed") / "__init__.py")
    pack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)  # the declarations only: INPUT_TYPES needs no ComfyUI
    node = pack.TypedApply
    typed = node_inputs("TypedApply", node, {"scale": "1", "interval": "3", "flag": "true", "mode": "exact", "label": "0.4"})
    assert typed == {"scale": 1.0, "interval": 3, "flag": True, "mode": "exact", "label": "0.4"}
    assert [type(typed[k]) for k in ("scale", "interval", "flag", "label")] == [float, int, bool, str]
    assert node_inputs("TypedApply", node, {}) == {"scale": 1.0, "interval": 2, "flag": False}  # the declared defaults
    for given, says in (
        ({"interval": "3.5"}, "interval='3.5' is not an INT"),
        ({"scale": "2.5"}, r"within \[0.0, 2.0\]"),
        ({"flag": "yes"}, "BOOLEAN"),
        ({"mode": "quick"}, r"one of \['fast', 'exact'\]"),
        ({"depth": "0"}, "has no input 'depth'; its inputs: scale, interval, flag, mode, label"),
    ):
        with pytest.raises(PeerError, match=says):
            node_inputs("TypedApply", node, given)


def test_the_older_peer_flags_serve_a_single_peer_entry_only():
    import argparse

    from tgate_bench.__main__ import plan_variants
    from tgate_bench.peers import PeerError, PeerSpec

    def plan(variants, node=None, inputs=()):
        return plan_variants(argparse.Namespace(variants=variants, peer_node=node, peer_input=list(inputs)))

    assert plan("baseline,peer=/p/A", "Node", ["start_at=0.4"]) == [
        "baseline",
        PeerSpec(Path("/p/A"), "Node", {"start_at": "0.4"}),
    ]
    with pytest.raises(PeerError, match="single peer"):
        plan("peer=/p/A,peer=/p/B", "Node")
    with pytest.raises(PeerError, match="single peer"):
        plan("peer=/p/A:Other", "Node")
    with pytest.raises(SystemExit, match="unknown variant 'tgate_v3'"):
        plan("baseline,tgate_v3")


@pytest.fixture(scope="module")
def peer_packs(tmp_path_factory):
    """Four peer packs, each loaded at most once per process (ComfyUI keeps node ids for good)."""
    root = tmp_path_factory.mktemp("peers")
    return {
        "one": write_peer_pack(root / "bench_peer_one", "BenchOne"),
        "two": write_peer_pack(root / "bench_peer_two", "BenchTwo", usable=2),
        "none": write_peer_pack(root / "bench_peer_none", "BenchNone", usable=0),
        "second": write_peer_pack(root / "bench_peer_second", "BenchSecond"),
        "loaded": {},
    }


def test_without_a_node_a_peer_never_gets_a_deprecated_one_and_the_candidates_are_listed(comfy, peer_packs):
    from tgate_bench.peers import PeerError, PeerSpec, load_peer
    from tgate_testkit.comfy_env import load_pack

    def peer(name, node=None, **inputs):
        return load_peer(comfy.nodes, PeerSpec(peer_packs[name], node, inputs), peer_packs["loaded"], load_pack)

    chosen = peer("one", scale="0.5")  # BenchOneOldApply comes first, but its display name says deprecated
    assert (chosen.node, chosen.display_name, chosen.inputs) == (
        "BenchOneApply",
        "BenchOne Apply",
        {"scale": 0.5, "interval": 2, "flag": False},
    )
    assert peer("one", "BenchOneLegacy").node == "BenchOneLegacy"  # named, a deprecated node is used
    with pytest.raises(PeerError) as none:
        peer("none")
    listing = str(none.value)
    assert "no MODEL -> MODEL node that is not deprecated" in listing and f"peer={peer_packs['none'].resolve()}:NODE" in listing
    assert "BenchNoneOldApply (BenchNone Apply (Deprecated)): MODEL -> MODEL, deprecated (display name" in listing
    assert "BenchNoneLegacy: MODEL -> MODEL, deprecated (DEPRECATED flag)" in listing
    assert "BenchNoneLoader: not MODEL -> MODEL" in listing
    with pytest.raises(PeerError, match=r"2 candidates \(BenchTwoApply, BenchTwoOther\)"):
        peer("two")
    with pytest.raises(PeerError, match="BenchTwoLoader is not a MODEL -> MODEL node; its nodes:\n  BenchTwoOldApply"):
        peer("two", "BenchTwoLoader")
    with pytest.raises(PeerError, match="Missing is not one of its nodes"):
        peer("two", "Missing")


def test_benchmark_runs_two_peers_interleaved_with_the_packs_variants(comfy, peer_packs, tmp_path):
    out = tmp_path / "bench_peers.json"
    one, second = peer_packs["one"], peer_packs["second"]
    variants = f"baseline,peer={one}::scale=0.5,interval=3,flag=true,tgate,peer={second}:BenchSecondApply:mode=fast,deepcache,"
    variants += f"peer={one}::scale=1.5"  # the same pack and node again, other inputs
    settings = ["--arch", "tiny-sd15", "--size", "64", "--steps", "4", "--runs", "1", "--variants", variants]
    env = dict(os.environ, COMFYUI_PATH=str(COMFYUI_PATH))
    command = [sys.executable, "-m", "tgate_bench", *settings, "--json", str(out)]
    done = subprocess.run(command, cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    order = ["baseline", "peer:BenchOneApply", "tgate", "peer:BenchSecondApply", "deepcache", "peer:BenchOneApply#2"]
    assert list(result["variants"]) == order and not result["failed_variants"]
    assert result["run_order"] == [[r, name] for r in (0, 1) for name in order]  # warm-up round, then the timed one
    assert result["peers"]["peer:BenchOneApply"]["inputs"] == {"scale": 0.5, "interval": 3, "flag": True}
    applied = [json.loads(line) for line in (one / "applied.jsonl").read_text().splitlines()]
    applied += [json.loads(line) for line in (second / "applied.jsonl").read_text().splitlines()]
    assert applied == [
        {"node": "BenchOneApply", "inputs": {"scale": 0.5, "interval": 3, "flag": True}},
        {"node": "BenchOneApply", "inputs": {"scale": 1.5, "interval": 2, "flag": False}},  # the same node again
        {"node": "BenchSecondApply", "inputs": {"scale": 1.0, "interval": 2, "flag": False, "mode": "fast"}},
    ]
    evaluations = {name: r["middle_block_evaluations"] for name, r in result["variants"].items()}
    assert evaluations == {**dict.fromkeys(order, 4), "deepcache": 2}  # refreshes at steps 0 and 3


def test_the_report_gives_every_peer_and_a_deepcache_row(tmp_path, capsys):
    from tgate_bench import report

    def variant(median, middle):
        return {"median_s": median, "speedup": 10.0 / median, "middle_block_evaluations": middle, **_timed(median, median)}

    result = {
        "command": "python -m tgate_bench --arch sd15",
        "date": "2026-01-01T00:00:00+00:00",
        "comfyui": "0.3.64",
        "torch": "2.9.0",
        "device": "cpu",
        "variants": {
            "baseline": variant(10.0, 25),
            "tgate": variant(8.0, 25),
            "peer:TGateApplySimple": variant(8.0, 25),
            "deepcache": variant(5.0, 9),
            "peer:DeepCache": variant(4.0, 9),
            "tgate_deepcache": variant(2.5, 9),
        },
    }
    (tmp_path / "dc.json").write_text(json.dumps(result))
    assert report.main([str(tmp_path / "dc.json")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| dc |")]
    assert len(rows) == 2  # the main table and the DeepCache one (no tgate_v2: no second table)
    assert "| peer:TGateApplySimple 1.250x; peer:DeepCache 2.500x |" in rows[0]
    assert "| 2.000x | 4.000x | 2.000x | peer:TGateApplySimple 1.250x; peer:DeepCache 2.500x |" in rows[1]
    assert rows[1].endswith("deepcache 9, peer:DeepCache 9, tgate_deepcache 9 |")


# -- text share: the text rows' part of a joint-attention model call's FLOPs -------------------------


def test_text_share_of_tiny_flux_matches_the_rows_counted_by_hand(comfy):
    """tgate_bench.text_share on tiny Flux at 64² (8 text + 16 image rows) against FLOPs computed here
    from each linear layer's input rows (2 x rows x in x out) and the joint attention's shapes (QK^T and
    PV: 2 x 2 x rows x rows x width per block, the text queries' rows of them text), with the module
    paths of COMFYUI_NOTES.md; counted on the meta device and on the CPU alike."""
    import torch

    from tgate_bench.text_share import text_share
    from tgate_testkit.models import ARCHITECTURES, build_model

    arch = ARCHITECTURES["tiny-flux"]
    model = build_model(arch)
    rows, hooks = {}, []

    def count_rows(name):
        return lambda module, args, out: rows.__setitem__(name, args[0].numel() // args[0].shape[-1])

    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(count_rows(name)))
    on_cpu = text_share(model, arch, 64, device="cpu")
    for hook in hooks:
        hook.remove()
    on_meta = text_share(build_model(arch, device="meta"), arch, 64)
    assert on_meta["total_flops"] == on_cpu["total_flops"] and on_meta["text_share"] == on_cpu["text_share"]

    modules = dict(model.model.diffusion_model.named_modules())
    text, image = 8, (64 // 8 // 2) ** 2
    assert (on_cpu["text_rows"], on_cpu["image_rows"]) == (text, image)
    flops = {name: 2 * n * modules[name].in_features * modules[name].out_features for name, n in rows.items()}
    text_only = (".txt_mod.lin", ".txt_attn.qkv", ".txt_attn.proj", ".txt_mlp.0", ".txt_mlp.2")
    assert all(rows[n] == text for n in rows if n.endswith(text_only[1:]))  # every text row, and only those
    joined = [n for n in rows if n.endswith((".linear1", ".linear2"))]
    assert joined and all(rows[n] == text + image for n in joined)
    width, blocks = arch.unet["hidden_size"], arch.unet["depth"] + arch.unet["depth_single_blocks"]
    attention = blocks * 4 * (text + image) ** 2 * width
    assert on_cpu["total_flops"] == sum(flops.values()) + attention == on_cpu["attention_flops"] + sum(flops.values())
    by_hand = (
        sum(f for n, f in flops.items() if n == "txt_in" or n.endswith(text_only))
        + sum(flops[n] * text // (text + image) for n in joined)
        + blocks * 4 * text * (text + image) * width
    )
    assert 0 < on_cpu["text_share"] < 1
    assert on_cpu["text_share"] == pytest.approx(by_hand / on_cpu["total_flops"], rel=1e-12)
    # T-GATE skips the text stream's modules but not the modulation, txt_in or the text queries.
    assert 0 < on_cpu["skipped_share"] < on_cpu["text_share"]


def test_text_share_of_tiny_hidream_counts_its_three_text_parts_on_the_cpu_and_refuses_the_meta_device(comfy):
    """HiDream's blocks carry T5's tokens and two Llama layers' (the stream's and the block's own): its
    single blocks' joined rows are image + all three; its experts route by value, so the meta device,
    shapes only, cannot count it and says what to use instead."""
    from tgate_bench.text_share import text_share
    from tgate_testkit.models import ARCHITECTURES, build_model

    arch = ARCHITECTURES["tiny-hidream"]
    model = build_model(arch)
    joined_rows = []
    module = model.model.diffusion_model.single_stream_blocks[0].block.attn1.to_k
    hook = module.register_forward_hook(lambda m, args, out: joined_rows.append(args[0].shape[1]))
    try:
        on_cpu = text_share(model, arch, 64, device="cpu")
    finally:
        hook.remove()
    text, image = arch.context_tokens + 2 * arch.llama[1], (64 // 8 // 2) ** 2
    assert (on_cpu["text_rows"], on_cpu["image_rows"]) == (text, image) and joined_rows == [text + image]
    assert 0 < on_cpu["skipped_share"] < on_cpu["text_share"] < 1
    with pytest.raises(SystemExit, match="--device cpu"):
        text_share(build_model(arch, device="meta"), arch, 64)


def test_every_gpu_suite_row_is_a_valid_benchmark_command():
    """The GPU suite runs unattended on a lent machine: a row the benchmark would refuse wastes it."""
    import shlex

    from tgate_bench.__main__ import parse_args
    from tgate_testkit.models import ARCHITECTURES

    script = (PACK_ROOT / "tgate_bench" / "gpu_suite.sh").read_text()
    block = script.split("<<'ROWS'\n", 1)[1].split("\nROWS", 1)[0]
    rows = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert len(rows) > 10 and any(row[0] == "flux-1024-b1" for row in rows)
    for name, *args in rows:
        parsed = parse_args(args)  # exits on an unknown option or value
        if parsed.full_depth:
            assert ARCHITECTURES[parsed.arch].full_depth, name
