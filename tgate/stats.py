"""What one sampling run did, handed to listeners when it ends.

Every run under T-GATE ends with one log line on the `tgate` logger (INFO, or WARNING when it was
cancelled, failed, or ran evaluations past the gate without a cache) and a RunStats handed to each
listener added with `add_run_listener`, in the order they were added; benchmarks and tests read
the numbers from there, never from the log record. A listener that raises is logged and skipped:
it never stops sampling nor hides the run's own error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("tgate")


@dataclass(frozen=True)
class RunStats:
    """The statistics of one sampling run under T-GATE."""

    family: str  # the model family, as users know it
    gate_step: int  # the first step after the gate (steps count from 0)
    num_steps: int  # the run's steps
    captured_layers: int  # cross-attention layers kept at the end of the run
    self_attention_layers: int  # self-attention layers kept at the end of the run (V2; freed after the last reuse)
    cache_bytes: int  # bytes kept at the end of the run
    peak_cache_bytes: int  # the most bytes kept after any capture
    single_branch_evaluations: int  # evaluations that ran the fidelity branch alone
    self_attention_reuses: int  # evaluations that reused self-attention
    deep_block_reuses: int  # evaluations that skipped DeepCache's deep blocks
    peak_deep_cache_bytes: int  # of the cache, the most bytes DeepCache kept (one block output per cond chunk)
    uncached_evaluations: int  # evaluations past the gate whose capture kept nothing, run in full
    late_capture: bool  # whether a capture fell past the gate (the sampler skipped, or the model skipped, the capture step)
    stopped_at_step: int | None  # the step of the last evaluation of a cancelled or failed run; None when it finished
    stop: str | None  # "cancelled" or "failed (TypeName)"; None when it finished
    recaptures: int  # captures taken again after a layer's shape changed (Deep Shrink)
    branch_evaluations: int  # CFG branches the main evaluations would have run without T-GATE
    saved_branch_evaluations: int  # of those, the ones T-GATE did not run
    seconds_per_step_before_gate: float | None  # host wall-clock mean of the timed steps; None when none was timed
    seconds_per_step_after_gate: float | None
    summary: str  # the run's log line

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunCounts:
    """What a run has done so far, counted as it goes; `stats` makes the run's RunStats of it at its end."""

    branch_evaluations: int = 0  # CFG branches the main evaluations would have run without T-GATE
    saved_branch_evaluations: int = 0  # of those, the ones T-GATE did not run
    single_branch_evaluations: int = 0
    # Evaluations past the gate that ran several cond lists: a guider's lists whose inputs other
    # than the text differ (branch.stand_ins).
    several_list_evaluations: int = 0
    uncached_evaluations: int = 0
    self_attention_reuses: int = 0
    deep_block_reuses: int = 0
    recaptures: int = 0
    unmatched_calls: int = 0  # model calls whose rows did not match their chunks (see run.apply_model_with_gate)
    # Model calls whose images' texts fill different numbers of joined rows (text_stream.call_text_rows):
    # their joined modules computed in full and kept nothing.
    uneven_text_calls: int = 0
    peak_cache_bytes: int = 0
    peak_deep_cache_bytes: int = 0
    late_capture: bool = False
    last_step: int | None = None  # the step of the last evaluation
    stop: str | None = None  # how the run stopped early: "cancelled" or "failed (TypeName)"
    refused: str | None = None  # why the run stopped gating part way (GateRun._refuse_windows)

    @property
    def stopped(self) -> bool:
        """Whether the run was cancelled or failed."""
        return self.stop is not None

    def stats(self, **facts) -> RunStats:
        """The RunStats of the run: the counts it reports under their own names, and `facts`, its other fields."""
        reported = {f.name for f in dataclasses.fields(RunStats)}
        counted = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in reported}
        return RunStats(**counted, stopped_at_step=self.last_step if self.stopped else None, **facts)


RunListener = Callable[[RunStats], object]
_listeners: list[RunListener] = []


def add_run_listener(listener: RunListener) -> None:
    """Call `listener(stats)` at the end of every sampling run under T-GATE."""
    _listeners.append(listener)


def remove_run_listener(listener: RunListener) -> None:
    """Stop calling `listener`; nothing happens if it was not added."""
    if listener in _listeners:
        _listeners.remove(listener)


def announce(stats: RunStats) -> None:
    """Hand `stats` to every listener."""
    for listener in list(_listeners):
        try:
            listener(stats)
        except Exception:
            log.exception("T-GATE: a run listener raised; the run itself is unaffected")
