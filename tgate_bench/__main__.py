"""Sample one random-weight model under several variants, side by side in one process, and
report times, speedups, peak memory and the T-GATE cache size.

    python -m tgate_bench --arch sd15 --size 512 --batch 8 --runs 7 --json results.json

Variants: baseline (CFG at --cfg), cfg1 (CFG 1.0: the cost of one branch), tgate (the node's
defaults), tgate_off (gate_at 1.0: the pack's overhead), tgate_v2 (the advanced node, TGATE-V2, at
--gate-at with the model family's official self-attention schedule: SD/SDXL warm_up 2, sp_interval
5, fi_interval 1; PixArt sp_interval 3; not in the default list), deepcache (DeepCache alone: the advanced
node at gate_at 1.0, deepcache_interval 3, deepcache_branch 0, self-attention computed), tgate_deepcache
(the official T-GATE + DeepCache combination: gate at --gate-at, interval 3, branch 0, self-attention
computed as the official code does; neither is in the default list; SD1.x/SD2.x/SDXL), and any number
of peer=PATH[:NODE[:NAME=VALUE,...]] (another node pack, loaded by ComfyUI's loader, its node applied
with its defaults and these inputs to a copy of the model of its own with the same weights, since some
ports patch module instances for good; see tgate_bench/peers.py), e.g.

    --variants baseline,tgate,peer=PATH/ComfyUI_TGate:TGateApplySimple:start_at=0.4,deepcache,\
peer=PATH/ComfyUI-deepcache:DeepCache:cache_interval=3,cache_depth=0

Without NODE a peer's one MODEL -> MODEL node that is not deprecated is used (several or none: the
benchmark stops and lists them). Runs are interleaved in the --variants order (A B C A B C) after one
warm-up each, with device synchronisation around every run.

Spread is (max - min) / median of a variant's timed runs. Above --max-spread the benchmark warns that
the machine is too busy (or too small) for the figures to mean anything: on a shared or loaded
machine, or a small CPU, ratios closer than the spread are noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

from tgate_bench.peers import PeerError, PeerSpec, load_peer, parse_variants
from tgate_testkit.comfy_env import PACK_ROOT, comfyui_or_exit, import_comfyui, load_pack
from tgate_testkit.logs import RunLog
from tgate_testkit.models import ARCHITECTURES

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# A failure of one of these stops the benchmark.
OWN_VARIANTS = ("baseline", "cfg1", "tgate", "tgate_v2", "deepcache", "tgate_deepcache")
DEEPCACHE_OFFICIAL = {"deepcache_interval": 3, "deepcache_branch": 0}  # cache_interval, cache_branch_id
MAX_SPREAD_PCT = 10.0  # above this spread of a variant's timed runs, the figures are noise


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m tgate_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, else two folders above the pack)")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny-sd15")
    p.add_argument("--size", type=int, default=512, help="image size in pixels (latent is size/8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, help="latent frames of a video model (default: the architecture's)")
    p.add_argument(
        "--full-depth",
        action="store_true",
        help="build the real checkpoint's block count where the architecture has fewer "
        f"({', '.join(name for name, arch in ARCHITECTURES.items() if arch.full_depth)}: for a GPU; the CPU rows use "
        "fewer blocks)",
    )
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--gate-at", type=float, default=0.4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--runs", type=int, default=7, help="timed runs per variant, after one warm-up")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="time the first round too (for long CPU runs, where one untimed round costs as much as a timed one); "
        "not with --compile",
    )
    p.add_argument(
        "--variants",
        default="baseline,cfg1,tgate,tgate_off",
        help="comma-separated, run in this order each round; peer=PATH[:NODE[:NAME=VALUE,...]] adds another pack's node",
    )
    p.add_argument("--peer-node", help="with a single peer= entry that names none: its node (older form of peer=PATH:NODE)")
    p.add_argument(
        "--peer-input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with a single peer= entry that sets none: an input of its node (repeatable; older form of "
        "peer=PATH:NODE:NAME=VALUE)",
    )
    p.add_argument(
        "--compile",
        choices=["inductor", "cudagraphs", "aot_eager"],
        help="compile the diffusion model the way "
        "ComfyUI's TorchCompileModel node does (applied after T-GATE); compile time is reported apart",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step before and one after the gate of a tgate run, and, with tgate_v2, one "
        "step where it keeps self-attention and one where it reuses it, and, with tgate_deepcache, the gate's "
        "DeepCache refresh and the first step after it that skips the deep blocks",
    )
    p.add_argument(
        "--max-spread",
        type=float,
        default=MAX_SPREAD_PCT,
        metavar="PCT",
        help="warn when a variant's timed runs spread by more than this, (max - min) / median in percent "
        f"(default {MAX_SPREAD_PCT:g})",
    )
    p.add_argument(
        "--text-share",
        action="store_true",
        help="joint-attention families: also count the text rows' share of one model call's FLOPs at --size and "
        "1024, at this depth and the real checkpoint's (tgate_bench.text_share, shapes only)",
    )
    p.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def plan_variants(args) -> list[str | PeerSpec]:
    """--variants in order, with --peer-node and --peer-input folded into a single peer entry."""
    entries = parse_variants(args.variants)
    peers = [e for e in entries if isinstance(e, PeerSpec)]
    if args.peer_node or args.peer_input:
        if len(peers) != 1 or (args.peer_node and peers[0].node) or (args.peer_input and peers[0].inputs):
            raise PeerError(
                "--peer-node and --peer-input serve a single peer= entry that names no node and sets no "
                "input: with several peers, write each as peer=PATH:NODE:NAME=VALUE,..."
            )
        given = dict(p.split("=", 1) for p in args.peer_input) if args.peer_input else peers[0].inputs
        spec = dataclasses.replace(peers[0], node=args.peer_node or peers[0].node, inputs=given)
        entries = [spec if e is peers[0] else e for e in entries]
    unknown = [e for e in entries if isinstance(e, str) and e not in (*OWN_VARIANTS, "tgate_off")]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; the pack's: {', '.join((*OWN_VARIANTS, 'tgate_off'))}, and peer=...")
    return entries


def main(argv=None) -> int:
    args = parse_args(argv)
    entries = plan_variants(args)  # before anything loads: a malformed entry stops here
    comfy_path = comfyui_or_exit(args.comfyui)
    nodes = import_comfyui(comfy_path)
    import comfy.model_management as mm
    import comfy.patcher_extension
    import comfy.sample
    import torch

    from tgate_testkit.models import build_model, random_cond

    if args.threads:
        torch.set_num_threads(args.threads)
    if "TGate" not in nodes.NODE_CLASS_MAPPINGS:
        load_pack(nodes, PACK_ROOT)
    tgate_node = nodes.NODE_CLASS_MAPPINGS["TGate"]
    advanced_node = nodes.NODE_CLASS_MAPPINGS["TGateAdvanced"]
    stats = RunLog()  # the runs' statistics, from the engine's run listener
    logging.getLogger("tgate").addHandler(stats)
    logging.getLogger("tgate").setLevel(logging.INFO)

    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    dtype = getattr(torch, DTYPES[args.dtype or ("fp16" if cuda else "fp32")])
    arch = ARCHITECTURES[args.arch]
    if args.frames:
        if len(arch.latent) != 2:
            raise SystemExit(f"--frames: {args.arch} is not a video model")
        arch = dataclasses.replace(arch, latent=(arch.latent[0], args.frames))
    if args.full_depth:
        if not arch.full_depth:
            raise SystemExit(f"--full-depth: {args.arch} already has its checkpoint's depth")
        arch = dataclasses.replace(arch, unet=dict(arch.unet, **dict(arch.full_depth)))
    from tgate_bench.text_share import VALUE_ROUTED

    if args.text_share and arch.model_config in VALUE_ROUTED:
        raise SystemExit(
            f"--text-share: {args.arch}'s FLOPs depend on its values ({VALUE_ROUTED[arch.model_config]}), which the "
            f"meta device cannot count: leave --text-share out and count it on the CPU with python -m "
            f"tgate_bench.text_share --arch {args.arch} --device cpu"
        )
    print(f"building {args.arch} with random weights ({dtype}, {device})", flush=True)
    model = build_model(arch, dtype=dtype)
    latent = arch.empty_latent(args.batch, args.size)  # the family's latent for images (or videos) of this size
    noise = comfy.sample.prepare_noise(latent, 0)
    positive, negative = random_cond(arch, 1, args.batch, args.size), random_cond(arch, 2, args.batch, args.size)

    # The pack's engine as ComfyUI loaded it; tgate_v2 runs the family's official self-attention schedule.
    engine = importlib.import_module(tgate_node.__module__.rpartition(".")[0] + ".tgate")
    engine.add_run_listener(stats.add_run)
    reuse = engine.family_of(model.model.model_config).official[1]

    def tgate(gate_at):
        return tgate_node.execute(model, gate_at=gate_at, fidelity_branch="auto", cache_device="model_device").result[0]

    def tgate_v2(gate_at):
        schedule = dict(warm_up=reuse.warm_up, sp_interval=reuse.sp_interval, fi_interval=reuse.fi_interval)
        return advanced_node.execute(
            model, gate_at=gate_at, fidelity_branch="auto", cache_device="model_device", **schedule
        ).result[0]

    def deepcache(gate_at):
        # Self-attention computed at every step (sp_interval = fi_interval = 1), as in the official combination.
        return advanced_node.execute(
            model,
            gate_at=gate_at,
            fidelity_branch="auto",
            cache_device="model_device",
            warm_up=0,
            sp_interval=1,
            fi_interval=1,
            **DEEPCACHE_OFFICIAL,
        ).result[0]

    compiled = {}

    def compile_(patched):
        """One compiled clone per distinct model (baseline and cfg1 share one), as TorchCompileModel does."""
        if not args.compile:
            return patched
        if id(patched) not in compiled:
            from comfy_api.torch_helpers import set_torch_compile_wrapper

            clone = patched.clone()
            set_torch_compile_wrapper(clone, backend=args.compile)
            compiled[id(patched)] = clone
        return compiled[id(patched)]

    variants, failed, peers, loaded = {}, {}, {}, {}
    for name in entries:
        if isinstance(name, PeerSpec):
            peer = load_peer(nodes, name, loaded, load_pack)
            label = f"peer:{peer.node}"
            if label in peers:  # the same node twice (other inputs): peer:NODE#2, ...
                label = next(f"{label}#{n}" for n in range(2, 100) if f"{label}#{n}" not in peers)
            peers[label] = peer.record()
            print(f"{label}: {peer.node} ({peer.display_name}) from {peer.spec.path} with {peer.inputs}", flush=True)
            try:
                variants[label] = (compile_(peer.apply(build_model(arch, dtype=dtype))), args.cfg)
            except Exception as e:  # a peer pack that breaks must not cost the other variants' figures
                print(f"variant {label} failed and is dropped: {type(e).__name__}: {e}", flush=True)
                failed[label] = f"{type(e).__name__}: {e}"
        elif name == "baseline":
            variants[name] = (compile_(model), args.cfg)
        elif name == "cfg1":
            variants[name] = (compile_(model), 1.0)
        elif name == "tgate":
            variants[name] = (compile_(tgate(args.gate_at)), args.cfg)
        elif name == "tgate_off":
            variants[name] = (compile_(tgate(1.0)), args.cfg)
        elif name == "tgate_v2":
            variants[name] = (compile_(tgate_v2(args.gate_at)), args.cfg)
        elif name == "deepcache":
            variants[name] = (compile_(deepcache(1.0)), args.cfg)
        elif name == "tgate_deepcache":
            variants[name] = (compile_(deepcache(args.gate_at)), args.cfg)
    graphs = _graph_counter()

    clock = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def time_the_sampler(executor, *a, **k):
        # Times the sampler loop alone: switching between clones of one model (object patches
        # applied or removed when a variant follows another) is not the variant's own cost.
        sync()
        clock["start"] = time.perf_counter()
        try:
            return executor(*a, **k)
        finally:
            sync()
            clock["end"] = time.perf_counter()

    timed = {}

    def with_clock(patched):
        """The same model with a SAMPLER_SAMPLE wrapper that times the sampler; one per model."""
        if id(patched) not in timed:
            clone = patched.clone()
            clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "tgate_bench", time_the_sampler)
            timed[id(patched)] = clone
        return timed[id(patched)]

    variants = {name: (with_clock(patched), cfg) for name, (patched, cfg) in variants.items()}
    middle = _middle_block_counter([patched for patched, _ in variants.values()], enabled=not args.compile)

    def sample(patched, cfg, callback=None):
        stats.runs.clear()
        middle["calls"] = 0
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        comfy.sample.sample(
            patched, noise, args.steps, cfg, args.sampler, args.scheduler, positive, negative, latent, seed=0,
            disable_pbar=True, callback=callback,
        )  # fmt: skip
        extra_counts["middle_block_evaluations"] = middle["calls"] if middle["hooked"] else None
        return clock["end"] - clock["start"], (torch.cuda.max_memory_allocated() if cuda else None), stats.last_run

    extra_counts = {}

    times = {name: [] for name in variants}
    extra = {name: {"graphs_compiled": 0} for name in variants}
    if args.no_warmup and args.compile:
        raise SystemExit("--no-warmup would time compilation: leave it out with --compile")
    run_order = []  # [round, variant] of every run, as the rounds ran them
    for round_ in range(args.runs + (0 if args.no_warmup else 1)):  # round 0 warms up (and compiles) every variant
        for name, (patched, cfg) in list(variants.items()):
            run_order.append([round_, name])
            before = graphs()
            try:
                elapsed, peak, run = sample(patched, cfg)
            except Exception as e:  # a peer pack that breaks must not cost the other rows' figures
                if name in OWN_VARIANTS:
                    raise
                print(f"variant {name} failed and is dropped: {type(e).__name__}: {e}", flush=True)
                failed[name] = f"{type(e).__name__}: {e}"
                del variants[name], times[name]
                continue
            extra[name]["graphs_compiled" if round_ == 0 else "graphs_recompiled"] = (
                extra[name].get("graphs_recompiled", 0) + graphs() - before if round_ else graphs() - before
            )
            if round_ == 0:
                extra[name]["first_run_s"] = elapsed
            if round_ or args.no_warmup:
                times[name].append(elapsed)
                extra[name].update(peak_bytes=peak, tgate=run, **extra_counts)
        print(f"round {round_}/{args.runs} done", flush=True)

    base = statistics.median(times["baseline"]) if "baseline" in times else None
    results = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        results[name] = {
            "median_s": median,
            "min_s": min(ts),
            "max_s": max(ts),
            "runs_s": ts,
            "spread_pct": 100 * (max(ts) - min(ts)) / median,
            "speedup": base / median if base else None,
            "peak_bytes": extra[name]["peak_bytes"],
            "cache_bytes": _cache_bytes(extra[name]["tgate"]),
            "tgate_run": extra[name]["tgate"],
            "first_run_s": extra[name]["first_run_s"],
            "compile_s": extra[name]["first_run_s"] - median if args.compile else None,
            "graphs_compiled": extra[name]["graphs_compiled"],
            "graphs_recompiled": extra[name].get("graphs_recompiled", 0),
            "middle_block_evaluations": extra[name].get("middle_block_evaluations"),
        }
    bound = None
    if {"baseline", "cfg1", "tgate"} <= set(results) and results["tgate"]["tgate_run"]:
        run = results["tgate"]["tgate_run"]
        g = run["gate_step"] / run["num_steps"]
        bound_s = g * results["baseline"]["median_s"] + (1 - g) * results["cfg1"]["median_s"]
        bound = {
            "gate_fraction": g,
            "bound_s": bound_s,
            "bound_speedup": base / bound_s,
            "tgate_over_bound": bound_s / results["tgate"]["median_s"],
        }

    print()
    print(
        f"{args.arch} {args.size}x{args.size} batch {args.batch}, {args.steps} steps {args.sampler}/{args.scheduler}, "
        f"cfg {args.cfg}, {dtype}, {torch.cuda.get_device_name() if cuda else _cpu_model() or 'cpu'}"
        + ("" if cuda else f", {torch.get_num_threads()} torch threads")
    )
    compile_header = f"{'compile s':>11}{'graphs':>8}{'recompiled':>11}" if args.compile else ""
    print(
        f"{'variant':<22}{'median s':>10}{'min s':>9}{'spread':>8}{'speedup':>9}{'peak MiB':>10}{'cache MiB':>11}{compile_header}"
    )
    for name, r in results.items():
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] is not None else "-"
        cache = f"{r['cache_bytes'] / 2**20:.1f}" if r["cache_bytes"] is not None else "-"
        speedup = f"{r['speedup']:.3f}x" if r["speedup"] else "-"
        compiled_columns = f"{r['compile_s']:>11.1f}{r['graphs_compiled']:>8}{r['graphs_recompiled']:>11}" if args.compile else ""
        print(
            f"{name:<22}{r['median_s']:>10.3f}{r['min_s']:>9.3f}{r['spread_pct']:>7.1f}%{speedup:>9}{peak:>10}{cache:>11}"
            f"{compiled_columns}"
        )
    if bound:
        print(
            f"batch-halving bound {bound['bound_s']:.3f} s ({bound['bound_speedup']:.3f}x); "
            f"tgate reaches {bound['tgate_over_bound']:.3f}x the bound"
        )
    warning = spread_warning(results, args.max_spread)
    if warning:
        print(warning)
    v2_run = results["tgate_v2"]["tgate_run"] if "tgate_v2" in results else None
    if v2_run:
        print(
            f"tgate_v2: gate after step {v2_run['gate_step']} of {v2_run['num_steps']}, self-attention reused in "
            f"{v2_run['self_attention_reuses']} evaluations, peak cache {v2_run['peak_cache_bytes'] / 2**20:.1f} MiB"
        )
    for name in ("deepcache", "tgate_deepcache"):
        run = results[name]["tgate_run"] if name in results else None
        if run:
            print(
                f"{name}: the deep blocks skipped in {run['deep_block_reuses']} of {run['num_steps']} steps, "
                f"peak DeepCache memory {run['peak_deep_cache_bytes'] / 2**20:.1f} MiB"
            )
    counted = {name: r["middle_block_evaluations"] for name, r in results.items() if r["middle_block_evaluations"] is not None}
    if counted:
        print(
            f"middle block evaluations per run of {args.steps} steps (DeepCache skips it on reuse steps): "
            + ", ".join(f"{name} {n}" for name, n in counted.items())
        )
    if "deepcache" in results and "tgate_deepcache" in results:
        print(
            f"tgate_deepcache over deepcache alone: "
            f"{results['deepcache']['median_s'] / results['tgate_deepcache']['median_s']:.3f}x"
        )

    profile_result = {}
    if args.profile:
        from .profile import format_profile, profile_steps

        def profile_variant(name, steps):
            patched, cfg = variants[name]
            return profile_steps(lambda m, cb: sample(m, cfg, cb), patched, model.model.diffusion_model, steps, cuda)

        if "tgate" in variants and results["tgate"]["tgate_run"]:
            gate = results["tgate"]["tgate_run"]["gate_step"]
            steps = {"before gate": max(0, gate - 2), "capture": gate - 1, "after gate": min(args.steps - 1, gate + 1)}
            profile_result.update(profile_variant("tgate", steps))
        if v2_run:
            steps = _self_attention_steps(engine, v2_run, reuse)
            if steps:
                profile_result.update(profile_variant("tgate_v2", steps))
            else:
                print(
                    f"tgate_v2 reuses self-attention at no step of {v2_run['num_steps']} at gate_at {args.gate_at}: not profiled"
                )
        deep_run = results["tgate_deepcache"]["tgate_run"] if "tgate_deepcache" in results else None
        if deep_run:
            profile_result.update(profile_variant("tgate_deepcache", _deep_steps(engine, deep_run)))
        if profile_result:
            print()
            print("one step of each T-GATE run, profiled (v2 sa: the tgate_v2 run where it keeps / reuses self-attention):")
            print(format_profile(profile_result))
    profile_result = profile_result or None

    shares = None
    if args.text_share:
        from .text_share import format_share, text_share

        print()
        shares, depths = [], {"benchmark": None}
        if arch.full_depth:
            depths["full"] = dict(arch.unet, **dict(arch.full_depth))
        for depth, unet in depths.items():
            for size in dict.fromkeys((args.size, 1024)):
                share = text_share(build_model(arch, dtype=dtype, unet=unet, device="meta"), arch, size) | {"depth": depth}
                shares.append(share)
                print(format_share(f"{args.arch} ({depth} depth)", share), flush=True)

    if args.json:
        payload = {
            "command": "python -m tgate_bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "comfyui": _comfyui_version(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "cpu": _cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"dtype": str(dtype)},
            "variants": results,
            "bound": bound,
            "spread_warning": warning,
            "profile": profile_result,
            "text_share": shares,
            "failed_variants": failed,
            "peers": peers,
            "run_order": run_order,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


def spread_warning(results: dict[str, dict], max_spread_pct: float = MAX_SPREAD_PCT) -> str | None:
    """The warning to print when the timed runs say the figures are noise, else None.

    `results` maps each variant to its "runs_s" (the timed runs) and "spread_pct". A variant whose
    runs spread by more than `max_spread_pct` makes every ratio closer than that spread meaningless;
    with one timed run per variant the spread, and so the noise, is unknown.
    """
    noisy = {name: r["spread_pct"] for name, r in results.items() if len(r["runs_s"]) > 1 and r["spread_pct"] > max_spread_pct}
    if noisy:
        worst = max(noisy.values())
        return (
            f"WARNING: the timed runs of {', '.join(noisy)} spread by up to {worst:.1f} % (more than {max_spread_pct:g} %): "
            "this machine is too busy (or too small) for these figures to mean anything; ratios closer than the "
            "spread are noise. Rerun on an idle machine, with more --runs."
        )
    if results and all(len(r["runs_s"]) < 2 for r in results.values()):
        return (
            "WARNING: one timed run per variant, so the spread, and with it the noise of this machine, is unknown: "
            "read ratios that differ by a few percent as noise. Use --runs 3 or more to measure it."
        )
    return None


def _cache_bytes(run: dict | None) -> int | None:
    """The most a run kept at once (self-attention comes and goes); None for a run without T-GATE."""
    return run["peak_cache_bytes"] if run else None


def _self_attention_steps(engine, run: dict, reuse) -> dict[str, int]:
    """The first step of a tgate_v2 run that reuses self-attention (before the gate where there is
    one) and the step that kept what it reuses, from the engine's own plan; {} when none reuses."""
    plans = engine.plan_steps(run["num_steps"], run["gate_step"], reuse)
    reusing = [step for step, plan in enumerate(plans) if plan.self_attention is engine.Action.REUSE]
    if not reusing:
        return {}
    reused = next((step for step in reusing if step < run["gate_step"]), reusing[0])
    kept = max(step for step in range(reused) if plans[step].self_attention is engine.Action.CAPTURE)
    return {"v2 sa kept": kept, "v2 sa reused": reused}


def _deep_steps(engine, run: dict) -> dict[str, int]:
    """A tgate_deepcache run's refresh at the gate and the first step after it that skips the deep blocks."""
    plans = engine.plan_steps(run["num_steps"], run["gate_step"], None, DEEPCACHE_OFFICIAL["deepcache_interval"])
    gate = run["gate_step"]
    reuse = next((s for s in range(gate, len(plans)) if plans[s].deep_blocks is engine.Action.REUSE), None)
    steps = {"dc refresh": gate} if gate < len(plans) else {}
    if reuse is not None:
        steps["dc reuse"] = reuse
    return steps


def _middle_block_counter(models, enabled: bool = True) -> dict:
    """Count the evaluations of each UNet's middle block (its first child called with a non-empty input:
    the pack's DeepCache passes an empty tensor through the blocks it skips, another pack may not call
    them at all), one forward pre-hook per distinct diffusion model; {"calls": n, "hooked": bool}.
    Off under --compile, where a hook could change what is compiled."""
    counter = {"calls": 0, "hooked": False}

    def count(module, inputs):
        if inputs and getattr(inputs[0], "ndim", 0) > 1 and inputs[0].shape[1] > 0:
            counter["calls"] += 1

    seen = set()
    for patched in models if enabled else ():
        diffusion_model = patched.model.diffusion_model
        block = getattr(diffusion_model, "middle_block", None)
        if id(diffusion_model) in seen or block is None or not len(block):
            continue
        seen.add(id(diffusion_model))
        block[0].register_forward_pre_hook(count)
        counter["hooked"] = True
    return counter


def _graph_counter():
    """A function returning how many graphs torch.compile has produced so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return lambda: 0
    return lambda: counters["stats"]["unique_graphs"]


def _cpu_model() -> str | None:
    """The host CPU's model name (Linux /proc/cpuinfo; elsewhere platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _comfyui_version() -> str | None:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
