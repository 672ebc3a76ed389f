"""What the T-GATE probe costs over KSampler: the same model, prompts, noise and settings, sampled by
KSampler (nodes.common_ksampler), by the probe's recording run alone, and by the whole probe node
(recording, plot and summary), interleaved in one process after one warm-up each.

    python -m tgate_bench.probe_overhead --arch tiny-sd15 --size 256 --steps 25 --runs 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch

from tgate_testkit.comfy_env import PACK_ROOT, comfyui_or_exit, import_comfyui, load_pack
from tgate_testkit.models import ARCHITECTURES, build_model, random_cond


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tgate_bench.probe_overhead", description=__doc__)
    p.add_argument("--comfyui")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny-sd15")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    comfy_path = comfyui_or_exit(args.comfyui)
    nodes = import_comfyui(comfy_path)
    if "TGateProbe" not in nodes.NODE_CLASS_MAPPINGS:
        load_pack(nodes, PACK_ROOT)
    probe = nodes.NODE_CLASS_MAPPINGS["TGateProbe"]
    probe_module = sys.modules[probe.__module__]
    model = build_model(args.arch, seed=0)
    positive, negative = random_cond(args.arch, 1), random_cond(args.arch, 2)
    latent = {"samples": ARCHITECTURES[args.arch].empty_latent(1, args.size)}
    settings = (0, args.steps, args.cfg, "euler", "normal", positive, negative, latent)
    variants = {
        "ksampler": lambda: nodes.common_ksampler(model, *settings, denoise=1.0),
        "probe_recording": lambda: probe_module.record_run(model, *settings, denoise=1.0),
        "probe_node": lambda: probe.execute(model, *settings, 1.0, 0.05),
    }
    times = {name: [] for name in variants}
    for round_ in range(args.runs + 1):
        for name, run in variants.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    print(f"{args.arch} {args.size}px, {args.steps} steps euler, cfg {args.cfg}, {args.runs} timed runs each, {device}, "
          f"torch {torch.__version__}")  # fmt: skip
    base = statistics.median(times["ksampler"])
    for name, values in times.items():
        median = statistics.median(values)
        spread = (max(values) - min(values)) / median * 100
        print(
            f"{name:16s} median {median:7.3f} s  min {min(values):7.3f} s  spread {spread:5.1f} %  {median / base:6.3f}x ksampler"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
