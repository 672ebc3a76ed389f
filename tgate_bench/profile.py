"""Profile single sampling steps (one before the gate and one after it, say): kernels, host time,
aten ops and kernels per module class, host-device synchronisations. The profiler runs only around
the chosen steps (started and stopped from the sampler's step callback), so the figures are those
of single steps.

Per module class (attention modules by their attribute name, `CrossAttention.attn1` for
self-attention and `CrossAttention.attn2` for cross-attention), the figures are inclusive: a
SpatialTransformer's count holds its attention modules'. An attention module whose output T-GATE
reuses runs no aten op and launches no kernel: its host time is the table lookup alone.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy ",
    "aten::_local_scalar_dense",
)
MODULE_CLASSES = ("SpatialTransformer", "BasicTransformerBlock", "CrossAttention", "FeedForward", "ResBlock", "LayerNorm")
RANGE_PREFIX = "tgate_bench::"  # profiler ranges opened around each module while a step is profiled


@contextmanager
def module_timer(root: torch.nn.Module, sink: list):
    """Host time inside modules of MODULE_CLASSES, added by class to the dict in `sink[0]` (if any).

    On a GPU this is the time Python spends launching work, the cost that dominates at batch 1.
    While a step is profiled (`sink[0]` set) each module also runs inside a profiler range named
    RANGE_PREFIX + its class, from which `summarize` counts the aten ops and kernels in it.
    """
    stack, handles = [], []
    for name, module in root.named_modules():
        kind = type(module).__name__
        if kind not in MODULE_CLASSES:
            continue
        label = f"{kind}.{name.rsplit('.', 1)[-1]}" if kind == "CrossAttention" else kind

        def pre(m, args, label=label):
            span = None
            if sink[0] is not None:
                span = torch.autograd.profiler.record_function(RANGE_PREFIX + label)
                span.__enter__()
            stack.append((label, span, time.perf_counter()))

        def post(m, args, out):
            label, span, start = stack.pop()
            if sink[0] is not None:
                sink[0][label] += time.perf_counter() - start
            if span is not None:
                span.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _kernel_us(event) -> float:
    # `device_time` since torch 2.4, `cuda_time` before; a kernel's own duration either way.
    for name in ("device_time", "cuda_time"):
        value = getattr(event, name, None)
        if value:
            return float(value)
    return float(event.time_range.elapsed_us())


def _inside(event) -> tuple[int, int]:
    """(aten ops, kernels) run under a profiler range, nested ones included."""
    ops, kernels, todo = 0, 0, list(event.cpu_children)
    while todo:
        child = todo.pop()
        ops += child.name.startswith("aten::")
        kernels += len(child.kernels)
        todo += child.cpu_children
    return ops, kernels


def by_module(events) -> tuple[dict[str, int], dict[str, int]]:
    """Aten ops and kernels per module class, summed over the modules' profiler ranges."""
    ops, kernels = defaultdict(int), defaultdict(int)
    for event in events:
        if event.name.startswith(RANGE_PREFIX):
            label = event.name[len(RANGE_PREFIX) :]
            n_ops, n_kernels = _inside(event)
            ops[label] += n_ops
            kernels[label] += n_kernels
    return dict(sorted(ops.items())), dict(sorted(kernels.items()))


def summarize(prof, wall_s: float, modules: dict[str, float]) -> dict:
    events = prof.events()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    syncs = [e for e in events if e.name.startswith(SYNC_EVENTS)]
    ops_by_module, kernels_by_module = by_module(events)
    return {
        "wall_ms": 1e3 * wall_s,
        "aten_ops": sum(1 for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::")),
        "cuda_kernels": len(kernels),
        "kernel_ms": sum(_kernel_us(e) for e in kernels) / 1e3,
        "syncs": len(syncs),
        "sync_kinds": sorted({e.name for e in syncs}),
        "host_ms_by_module": {k: round(1e3 * v, 3) for k, v in sorted(modules.items(), key=lambda kv: -kv[1])},
        "aten_ops_by_module": ops_by_module,
        "kernels_by_module": kernels_by_module,
    }


def profile_steps(sample, patched, diffusion_model, steps: dict[str, int], cuda: bool) -> dict:
    """Run `sample(patched, callback)` once and profile the steps named in `steps` (0-based)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    wanted = {step: label for label, step in steps.items()}
    results = {}
    sink = [None]
    current = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def begin(step):
        sync()
        prof = profile(activities=activities)
        prof.__enter__()
        current.update(step=step, prof=prof, start=time.perf_counter())
        sink[0] = defaultdict(float)

    def end():
        sync()
        wall = time.perf_counter() - current["start"]
        current["prof"].__exit__(None, None, None)
        results[wanted[current["step"]]] = {"step": current["step"], **summarize(current["prof"], wall, sink[0])}
        sink[0] = None
        current.clear()

    def callback(step, x0, x, total):  # ComfyUI calls it after each step
        if current:
            end()
        if step + 1 in wanted:
            begin(step + 1)

    with module_timer(diffusion_model, sink):
        if 0 in wanted:
            begin(0)
        sample(patched, callback)
        if current:
            end()
    return results


def format_profile(profile_result: dict) -> str:
    labels = list(profile_result)
    rows = [
        ("step", "step", "{:d}"),
        ("wall ms", "wall_ms", "{:.2f}"),
        ("aten ops", "aten_ops", "{:d}"),
        ("CUDA kernels", "cuda_kernels", "{:d}"),
        ("kernel ms", "kernel_ms", "{:.2f}"),
        ("syncs", "syncs", "{:d}"),
    ]
    lines = [f"{'':<34}" + "".join(f"{label:>14}" for label in labels)]
    for title, key, fmt in rows:
        lines.append(f"{title:<34}" + "".join(f"{fmt.format(profile_result[label][key]):>14}" for label in labels))
    names = sorted({n for label in labels for n in profile_result[label]["host_ms_by_module"]})
    for name in names:
        values = [profile_result[label]["host_ms_by_module"].get(name, 0.0) for label in labels]
        lines.append(f"{'host ms in ' + name:<34}" + "".join(f"{v:>14.2f}" for v in values))
    # Attention, where T-GATE acts, and the blocks DeepCache skips: a reused module runs no op and
    # launches no kernel.
    for title, key in (("aten ops in ", "aten_ops_by_module"), ("kernels in ", "kernels_by_module")):
        for name in (n for n in names if n.startswith("CrossAttention.") or n in ("ResBlock", "SpatialTransformer")):
            values = [profile_result[label].get(key, {}).get(name, 0) for label in labels]
            lines.append(f"{title + name:<34}" + "".join(f"{v:>14d}" for v in values))
    return "\n".join(lines)
