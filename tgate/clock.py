"""The host wall-clock time of a run's steps, on each side of the gate, taken without a device sync."""

from __future__ import annotations

from time import perf_counter


class StepClock:
    """Times the steps from one step's first evaluation to the next step's.

    `mark` is called right after the evaluation's sigma read, a host read of a device tensor: it
    returns only once the device has finished the work queued before it, that is the previous steps'
    model calls. So the host clock there marks when the device was done, and the time from one
    step's mark to the next step's is the whole of that step (every evaluation of it, the sampler's
    own work, guidance nodes' extra calls) without adding a synchronisation. The last step has no
    mark after it and is not timed.
    """

    def __init__(self, gate_step: int):
        self.gate_step = gate_step
        # Seconds of the steps before / after the gate, and how many steps each sums.
        self._seconds = {False: 0.0, True: 0.0}
        self._steps = {False: 0, True: 0}
        self._start: tuple[int, float] | None = None  # (step, perf_counter) of its first evaluation

    def mark(self, step: int) -> None:
        """An evaluation of `step` starts."""
        now = perf_counter()
        if self._start is not None:
            start_step, start = self._start
            if step == start_step:
                return  # another evaluation of the same step (heun, dpm_2, ...)
            if step > start_step:  # steps a sampler skipped share the time
                for s in range(start_step, step):
                    self._seconds[s >= self.gate_step] += (now - start) / (step - start_step)
                    self._steps[s >= self.gate_step] += 1
        self._start = (step, now)

    def seconds_per_step(self, after_gate: bool) -> float | None:
        """Mean host wall-clock seconds of the timed steps before (or after) the gate; None if none."""
        n = self._steps[after_gate]
        return self._seconds[after_gate] / n if n else None
