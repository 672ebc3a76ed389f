"""The one log line a run under T-GATE ends with (stats.RunStats.summary): what it planned and did."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .branch import BRANCH_NAMES
from .families import CROSS

if TYPE_CHECKING:
    from .run import GateRun


def run_summary(run: GateRun) -> str:
    s, counts, store = run.schedule, run.counts, run.store
    cached = "text-stream modules" if run.patch.text_roles else "cross-attention layers"
    if not s.gates:
        text = f"T-GATE: gate_at past the last of {s.num_steps} steps, so only DeepCache acts; "
        if counts.stopped:
            at = f" at step {counts.last_step + 1}" if counts.last_step is not None else ""
            text += f"the run {_ended(counts.stop)}{at}; "
    elif not counts.stopped:
        text = f"T-GATE: {s.gate_step} of {s.num_steps} steps planned with text, then "
    elif counts.last_step is None:
        text = f"T-GATE: the run {_ended(counts.stop)} before its first step of {s.num_steps}; "
    else:
        text = (
            f"T-GATE: the run {_ended(counts.stop)} at step {counts.last_step + 1} of {s.num_steps}, "
            f"the gate being after step {s.gate_step}; until then "
        )
    if not s.gates:
        text += "no evaluation ran one branch alone"
    elif counts.single_branch_evaluations:
        main = run.main  # the last main evaluation: the branch it ran alone
        alone = f"the {BRANCH_NAMES[main.fidelity]} branch" if main.lists <= 2 else f"one of {run.guider}'s cond lists"
        text += (
            f"{counts.single_branch_evaluations} evaluations ran {alone} "
            f"alone on {store.layers(CROSS)} cached {cached} ({store.nbytes / 2**20:.1f} MiB)"
        )
    else:
        text += f"no evaluation ran one branch alone ({store.layers(CROSS)} cached {cached})"
    if run.self_attention is not None:
        text += (
            f"; self-attention was reused in {counts.self_attention_reuses} evaluations "
            f"(peak cache {counts.peak_cache_bytes / 2**20:.1f} MiB)"
        )
    elif run.patch.config.self_attention is not None and s.gates:
        text += "; self-attention was not reused (self-attention patches on the model)"
    if run.patch.deep is not None:
        d = run.patch.config.deep_cache
        text += (
            f"; DeepCache (interval {d.interval}, branch {d.branch}) skipped the deep blocks in "
            f"{counts.deep_block_reuses} evaluations (peak {counts.peak_deep_cache_bytes / 2**20:.1f} MiB kept)"
        )
    text += f"; {counts.saved_branch_evaluations} of {counts.branch_evaluations} CFG branch evaluations saved"
    timing = [
        f"{seconds:.3g} s per step {where} the gate"
        for seconds, where in ((run.clock.seconds_per_step(False), "before"), (run.clock.seconds_per_step(True), "after"))
        if seconds is not None
    ]
    if timing:
        text += "; " + " and ".join(timing)
    if counts.several_list_evaluations:
        text += (
            f"; {counts.several_list_evaluations} evaluations after the gate ran several of {run.guider}'s cond lists "
            "on the cache, since their inputs other than the text differ (area, mask, ControlNet, or a pooled "
            "text vector such as SDXL's): one list stands for another only where they agree"
        )
    if counts.unmatched_calls:
        text += (
            f"; {counts.unmatched_calls} model calls had fewer input rows than conditioning chunks (a model "
            "wrapper changed the batch) and ran without the cache"
        )
    elif counts.uneven_text_calls:
        text += (
            f"; {counts.uneven_text_calls} model calls held texts of different lengths for their images (padded "
            "captions whose masks differ) and ran without the cache"
        )
    elif counts.late_capture:
        text += "; the sampler skipped the capture step, so the first evaluation past the gate captured"
    if counts.recaptures:
        text += f"; {counts.recaptures} captures were taken again after a layer's shape changed (Deep Shrink)"
    if counts.refused:
        text += f"; gating was turned off part way: {counts.refused}"
    if counts.uncached_evaluations:
        text += f"; {counts.uncached_evaluations} evaluations after the gate found no cache and ran in full"
    return text


def _ended(stop: str | None) -> str:
    """How a run that stopped early ended: was cancelled, or failed (TypeName)."""
    return "was cancelled" if stop == "cancelled" else str(stop)
