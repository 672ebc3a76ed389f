"""Where the gate falls in one sampling run, and which step each model evaluation belongs to.

Pure functions of the run's sigmas, tested without a model (plan.py says what each step does).
A run's sigmas are its own schedule (already cut by KSamplerAdvanced,
denoise < 1 or custom sigmas); the gate is placed with ComfyUI's percent convention, the one
ControlNet start/end and EasyCache use: steps whose sigma is at or above the gate sigma plan
semantics, the rest improve fidelity.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

# Samplers evaluate at sigmas read back from device tensors, and uni_pc rewrites the last one in
# place: a sigma is matched to its step with a relative tolerance, never by exact equality.
SIGMA_RTOL = 1e-4


def active_conds(ranges: Sequence[tuple[float | None, float | None]], sigma: float) -> tuple[bool, ...]:
    """Which of the conds with sigma `ranges` are active at `sigma`. A range is (start, end) with None
    for open, as ComfyUI turns start_percent/end_percent into timestep_start/timestep_end; a cond is
    active unless sigma > start or sigma < end (comfy.samplers.get_area_and_mult)."""
    return tuple(not ((start is not None and sigma > start) or (end is not None and sigma < end)) for start, end in ranges)


@dataclass(frozen=True)
class GateSchedule:
    """The steps of one run and the step at which the gate closes."""

    sigmas: tuple[float, ...]  # one sigma per step, the final sigma (usually 0) left out
    gate_step: int  # first fidelity step; equal to the number of steps when the run never gates

    @classmethod
    def from_sigmas(cls, sigmas: Sequence[float], gate_sigma: float) -> GateSchedule:
        """Build the schedule of a run from its sigmas (final sigma included) and the gate sigma.

        The gate closes after the leading steps whose sigma is at or above `gate_sigma`, but never
        before the first step: text has to enter the network at least once to be cached.
        """
        steps = tuple(float(s) for s in sigmas[:-1])
        planning = 0
        for sigma in steps:
            if sigma < gate_sigma * (1.0 - SIGMA_RTOL):
                break
            planning += 1
        return cls(sigmas=steps, gate_step=max(1, planning) if steps else 0)

    def settled(self, facts: Sequence[Hashable]) -> GateSchedule:
        """This schedule with the gate moved past the last step at which `facts` change.

        `facts`: one per step, what the model is given there besides the latent and the text that
        the run cannot take from the capture: which conds are active (active_conds), which layers a
        patch resizes (Deep Shrink). What the gate captures stands for every later step, so the
        capture must see what those steps see: it moves to the first step from which the facts no
        longer change, the gate right after it. A change at the last step leaves no step to gate.
        """
        last_change = max((i for i in range(1, len(facts)) if facts[i] != facts[i - 1]), default=0)
        return self if last_change < self.gate_step else replace(self, gate_step=last_change + 1)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    @property
    def gates(self) -> bool:
        return self.gate_step < self.num_steps

    def step_of(self, sigma: float) -> int:
        """The step an evaluation at `sigma` belongs to: the last step whose sigma is >= it.

        Multi-evaluation samplers (heun, dpm_2, dpmpp_sde...) evaluate between two steps' sigmas;
        such an evaluation belongs to the earlier step.
        """
        return max(0, bisect.bisect_right(self._search_keys, -sigma) - 1)

    @cached_property
    def _search_keys(self) -> list[float]:
        # bisect needs ascending keys: negate the descending sigmas, widened by the tolerance.
        return [-s * (1.0 + SIGMA_RTOL) for s in self.sigmas]
