"""Turn benchmark JSON files into the markdown rows of docs/benchmarks.md.

python -m tgate_bench.report benchmark-results/*.json

Files with a tgate_v2 variant (the advanced node, TGATE-V2) also get a row in a second table,
tgate and tgate_v2 side by side; files with deepcache or tgate_deepcache a row in a third, with every
peer of the run and how often each variant evaluated the UNet's middle block. The first table's peers
column gives every peer's speedup (peer:NODE, in the run's order). Below the tables, each file's
command, device, versions and date, with the benchmark's spread warning where it gave one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = (
    "| row | device | baseline s (spread) | cfg1 | bound | tgate | tgate / bound | peers | tgate_off "
    "| peak over baseline | cache | compile s (graphs, recompiled) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


V2_HEADER = (
    "| row | device | baseline s | tgate | tgate_v2 | tgate_v2 / tgate | self-attention reuses (evaluations) "
    "| v2 peak over baseline | tgate cache | tgate_v2 peak cache |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


DC_HEADER = (
    "| row | device | baseline s | deepcache | tgate_deepcache | tgate_deepcache / deepcache | peers "
    "| middle block evaluations per run |\n"
    "|---|---|---|---|---|---|---|---|"
)


def _peers(result: dict) -> str:
    peers = [k for k in result["variants"] if k.startswith("peer:")]
    return "; ".join(f"{k} {_speedup(result, k)}" for k in peers) or "-"


def dc_row(name: str, result: dict) -> str:
    variants = result["variants"]
    base, alone, combined = variants["baseline"], variants.get("deepcache", {}), variants.get("tgate_deepcache", {})
    ratio = "-"
    if alone.get("median_s") and combined.get("median_s"):
        ratio = f"{alone['median_s'] / combined['median_s']:.3f}x"
    counts = [
        f"{k} {v['middle_block_evaluations']}" for k, v in variants.items() if v.get("middle_block_evaluations") is not None
    ]
    cells = [
        name,
        result.get("device", "?"),
        _seconds(base),
        _speedup(result, "deepcache"),
        _speedup(result, "tgate_deepcache"),
        ratio,
        _peers(result),
        ", ".join(counts) or "-",
    ]
    return "| " + " | ".join(cells) + " |"


def _seconds(variant: dict) -> str:
    """A variant's median seconds and the spread of its timed runs, as the tables show them."""
    return f"{variant['median_s']:.3f} ({variant['spread_pct']:.1f} %)"


def _speedup(result: dict, name: str) -> str:
    variant = result["variants"].get(name)
    return f"{variant['speedup']:.3f}x" if variant and variant.get("speedup") else "-"


def row(name: str, result: dict) -> str:
    variants, bound = result["variants"], result.get("bound") or {}
    base = variants["baseline"]
    tgate = variants.get("tgate", {})
    peak = "-"
    if tgate.get("peak_bytes") and base.get("peak_bytes"):
        peak = f"{(tgate['peak_bytes'] - base['peak_bytes']) / 2**20:+.0f} MiB"
    cache = f"{tgate['cache_bytes'] / 2**20:.2f} MiB" if tgate.get("cache_bytes") else "-"
    compiled = "-"
    if tgate.get("compile_s") is not None:
        compiled = f"{tgate['compile_s']:.1f} ({tgate['graphs_compiled']}, {tgate['graphs_recompiled']})"
    cells = [
        name,
        result.get("device", "?"),
        _seconds(base),
        _speedup(result, "cfg1"),
        f"{bound['bound_speedup']:.3f}x" if bound else "-",
        _speedup(result, "tgate"),
        f"{bound['tgate_over_bound']:.3f}x" if bound else "-",
        _peers(result),
        _speedup(result, "tgate_off"),
        peak,
        cache,
        compiled,
    ]
    return "| " + " | ".join(cells) + " |"


def _mib(n: int | None, signed: bool = False) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:+.0f} MiB" if signed else f"{n / 2**20:.2f} MiB"


def v2_row(name: str, result: dict) -> str:
    variants = result["variants"]
    base, tgate, v2 = variants["baseline"], variants.get("tgate", {}), variants["tgate_v2"]
    run = v2.get("tgate_run") or {}
    peak = None
    if v2.get("peak_bytes") and base.get("peak_bytes"):
        peak = v2["peak_bytes"] - base["peak_bytes"]
    ratio = f"{tgate['median_s'] / v2['median_s']:.3f}x" if tgate.get("median_s") else "-"
    reuses = f"{run['self_attention_reuses']} in {run['num_steps']} steps" if "self_attention_reuses" in run else "-"
    cells = [
        name,
        result.get("device", "?"),
        _seconds(base),
        _speedup(result, "tgate"),
        _speedup(result, "tgate_v2"),
        ratio,
        reuses,
        _mib(peak, signed=True),
        _mib(tgate.get("cache_bytes")) if tgate.get("cache_bytes") else "-",
        _mib(v2.get("cache_bytes")) if v2.get("cache_bytes") else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__.strip())
        return 2
    results = {path: json.loads(path.read_text()) for path in paths}
    print(HEADER)
    for path, result in results.items():
        print(row(path.stem, result))
    with_v2 = {path: result for path, result in results.items() if "tgate_v2" in result["variants"]}
    if with_v2:
        print()
        print(V2_HEADER)
        for path, result in with_v2.items():
            print(v2_row(path.stem, result))
    with_dc = {path: r for path, r in results.items() if {"deepcache", "tgate_deepcache"} & set(r["variants"])}
    if with_dc:
        print()
        print(DC_HEADER)
        for path, result in with_dc.items():
            print(dc_row(path.stem, result))
    print()
    for path, result in results.items():
        where = f"{result['device']}, ComfyUI {result['comfyui']}, torch {result['torch']}, {result['date']}"
        noise = f" {result['spread_warning']}" if result.get("spread_warning") else ""
        print(f"- {path.stem}: `{result['command']}` ({where}).{noise}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
