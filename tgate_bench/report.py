"""Turn benchmark JSON files into the markdown rows of docs/benchmarks.md.

python -m tgate_bench.report benchmark-results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = (
    "| row | device | baseline s (spread) | cfg1 | bound | tgate | tgate / bound | peer | tgate_off "
    "| peak over baseline | cache | compile s (graphs, recompiled) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _speedup(result: dict, name: str) -> str:
    variant = result["variants"].get(name)
    return f"{variant['speedup']:.3f}x" if variant and variant.get("speedup") else "-"


def row(name: str, result: dict) -> str:
    variants, bound = result["variants"], result.get("bound") or {}
    base = variants["baseline"]
    tgate = variants.get("tgate", {})
    peers = [k for k in variants if k.startswith("peer:")]
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
        f"{base['median_s']:.3f} ({base['spread_pct']:.1f} %)",
        _speedup(result, "cfg1"),
        f"{bound['bound_speedup']:.3f}x" if bound else "-",
        _speedup(result, "tgate"),
        f"{bound['tgate_over_bound']:.3f}x" if bound else "-",
        _speedup(result, peers[0]) if peers else "-",
        _speedup(result, "tgate_off"),
        peak,
        cache,
        compiled,
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print(__doc__.strip())
        return 2
    print(HEADER)
    for path in paths:
        result = json.loads(path.read_text())
        print(row(path.stem, result))
    print()
    for path in paths:
        result = json.loads(path.read_text())
        where = f"{result['device']}, ComfyUI {result['comfyui']}, torch {result['torch']}, {result['date']}"
        print(f"- {path.stem}: `{result['command']}` ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
