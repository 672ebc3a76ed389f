"""The T-GATE probe: how much each attention layer's output changes from one sampling step to the
next, per CFG branch, recorded with plain torch hooks on one ordinary (ungated) run.

For layer l, branch b and step t the recorder accumulates, on the model's device,
    num[t, l, b] = sum ||o_t - o_{t-1}||^2    den[t, l, b] = sum ||o_{t-1}||^2
over the layer's calls in that branch (several where a module runs more than once per model call,
as Wan VACE's blocks do once per control, or where the branch comes in several chunks), keeping only
each layer's previous output. Nothing is read back to the host while sampling: the sums come back
in one copy when the run is over, and the relative change of the layer is sqrt(num / den).

Which evaluation counts: each main CFG evaluation belongs to a step as T-GATE maps it
(schedule.GateSchedule.step_of: the last step whose sigma is at or above the evaluation's), and the
FIRST evaluation of each step is recorded. For one-evaluation samplers (euler, dpmpp_2m, uni_pc...)
that is every evaluation; dpm_2 and dpmpp_sde also evaluate between two steps' sigmas (left out);
heun evaluates at the step's sigma and, for its correction, at the next step's sigma, where T-GATE
counts it in the next step: there the recorded evaluation of step t >= 1 is that correction at
sigma_t. The step is worked out on the device from the evaluation's sigma tensor and the run's
sigmas, so no sigma is read on the host. Extra model calls made by PAG, SAG and the like (one or
three cond lists, see the node) are not recorded.

On a joint-attention family (families.Family.text_stream) the text-stream modules are recorded as
the cross kind, but their change says little: their modulation depends on the timestep, so they keep
changing 2-10 % per step all run long (docs/joint/table.md). What tells how much the text still
matters there is how far apart CFG's two predictions are: with `distance=True` the recorder also
accumulates, per step, the cond/uncond distance ||cond - uncond|| / ||cond|| of the main evaluation's
denoised predictions (per sample, averaged over the batch: the joint study's quantity), on the device
as the sums are, and the gate is suggested from it (suggest_gate_from_distance).

Nothing here imports ComfyUI; the node (probe_node.py) drives the recorder from ComfyUI's wrappers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .branch import BRANCH_NAMES
from .families import CROSS, SELF
from .schedule import SIGMA_RTOL, GateSchedule

NUM, DEN, COUNT = 0, 1, 2  # the last axis of the recorder's sums


class ProbeRecorder:
    """Records the step-to-step change of the outputs of `layers` ({module path: kind}) during one run."""

    def __init__(self, layers: Mapping[str, str], distance: bool = False):
        self.layers = tuple(layers)
        self.distance = distance  # also record the cond/uncond distance (record_predictions)
        self.distance_sums: torch.Tensor | None = None  # [steps, (sum of distances, count)], on the device
        self.kinds = tuple(layers[name] for name in self.layers)
        self._index = {name: i for i, name in enumerate(self.layers)}
        self.sums: torch.Tensor | None = None  # [steps, layers, branches, (num, den, count)], on the device
        self.sigmas: torch.Tensor | None = None  # the run's sigmas as the sampler got them (final one included)
        self.active = False  # inside a main CFG evaluation
        self._keys: torch.Tensor | None = None  # the steps' sigmas, widened by the tolerance, on the device
        self._step: torch.Tensor | None = None  # the current evaluation's step (a device integer)
        self._fresh: torch.Tensor | None = None  # whether it is the first evaluation of its step (a device bool)
        self._last_step: torch.Tensor | None = None
        self._layout: Sequence[int] = (0,)  # branch of each chunk of the current model call
        self._occurrence: dict[tuple[int, int], int] = {}
        # (layer, branch, occurrence) -> (step it was recorded at, a device integer; the output)
        self._previous: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- driven by the sampler --------------------------------------------------------------------
    def start_run(self, sigmas: torch.Tensor) -> None:
        """A sampling run starts with these sigmas (final sigma included); kept, read back at the end."""
        self.sigmas = sigmas.detach()
        self.sums = self.distance_sums = self._keys = self._last_step = None
        self._previous.clear()

    @contextlib.contextmanager
    def evaluation(self, sigma: torch.Tensor, main: bool = True):
        """One sampler evaluation of the model at `sigma` (a device tensor, the first element counts);
        recorded if `main` (the main CFG call) and the first evaluation of its step. Nothing is read on
        the host: the step and whether it is new stay device tensors."""
        if not main or self.sigmas is None or self.sigmas.shape[-1] < 2:
            yield
            return
        sigma = sigma.detach().reshape(-1)[0].float()
        if self._keys is None or self._keys.device != sigma.device:
            self._keys = self.sigmas[:-1].to(device=sigma.device, dtype=torch.float32) * (1.0 + SIGMA_RTOL)
            self._last_step = torch.full((), -1, dtype=torch.long, device=sigma.device)
        step = ((self._keys >= sigma).sum() - 1).clamp(0, self._keys.shape[0] - 1)
        self._step, self._fresh = step, step != self._last_step
        self._last_step = torch.maximum(self._last_step, step)
        self._occurrence = {}
        self.active = True
        try:
            yield
        finally:
            self.active = False

    # -- torch hooks ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, diffusion_model: torch.nn.Module):
        """Forward hooks on the diffusion model (for each call's chunk layout) and on every recorded layer."""
        modules = dict(diffusion_model.named_modules())
        handles = [diffusion_model.register_forward_pre_hook(self._model_call, with_kwargs=True)]
        try:
            for name in self.layers:
                handles.append(modules[name].register_forward_hook(self._layer_hook(self._index[name])))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _model_call(self, module, args, kwargs):
        if self.active:
            options = kwargs.get("transformer_options") or {}
            layout = options.get("cond_or_uncond")
            self._layout = tuple(layout) if layout else (0,)

    def _layer_hook(self, layer: int):
        def hook(module, args, output):
            if self.active:
                self._record(layer, output[0] if isinstance(output, tuple) else output)

        return hook

    def _record(self, layer: int, output: torch.Tensor) -> None:
        layout = self._layout
        if output.shape[0] % len(layout):
            layout = (0,)  # a module whose batch does not follow the call's chunks: one chunk
        step, fresh = self._step, self._fresh
        if self.sums is None or self.sums.device != output.device:
            steps = self._keys.shape[0]
            self.sums = torch.zeros(steps, len(self.layers), len(BRANCH_NAMES), 3, device=output.device)
            step, fresh = step.to(output.device), fresh.to(output.device)
        for chunk, branch in zip(output.detach().chunk(len(layout)), layout, strict=True):
            occ = self._occurrence.get((layer, branch), 0)
            self._occurrence[(layer, branch)] = occ + 1
            key = (layer, branch, occ)
            previous = self._previous.get(key)
            if previous is None or previous[1].shape != chunk.shape or previous[1].device != chunk.device:
                # A copy: blocks may update the tensor after the call (LTXV adds to its input in place).
                self._previous[key] = (torch.where(fresh, step, -2), chunk.clone())
                continue
            recorded_at, before = previous
            # Only the first evaluation of a step counts, compared with the step just before it.
            valid = fresh & (recorded_at == step - 1)
            before_f = before.float()
            num = torch.linalg.vector_norm(chunk.float() - before_f).square()
            den = torch.linalg.vector_norm(before_f).square()
            values = torch.where(valid, torch.stack((num, den, torch.ones_like(num))), 0.0)
            self.sums[:, layer, branch].index_add_(0, step.view(1), values.view(1, 3))
            self._previous[key] = (torch.where(fresh, step, recorded_at), torch.where(fresh, chunk, before))

    def record_predictions(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> None:
        """The main evaluation's denoised predictions of the positive and the negative (None at CFG 1,
        where there is no distance): adds their distance to the step's, if `distance` and it is the
        first evaluation of its step. Called inside evaluation(); nothing is read on the host."""
        if not (self.distance and self.active) or uncond is None:
            return
        cond, uncond = cond.detach().float().flatten(1), uncond.detach().float().flatten(1)
        per_sample = torch.linalg.vector_norm(cond - uncond, dim=1) / torch.linalg.vector_norm(cond, dim=1).clamp_min(1e-30)
        if self.distance_sums is None or self.distance_sums.device != cond.device:
            self.distance_sums = torch.zeros(self._keys.shape[0], 2, device=cond.device)
        step, fresh = self._step.to(cond.device), self._fresh.to(cond.device)
        values = torch.where(fresh, torch.stack((per_sample.mean(), torch.ones_like(per_sample[0]))), 0.0)
        self.distance_sums.index_add_(0, step.view(1), values.view(1, 2))

    # -- the result -------------------------------------------------------------------------------
    def result(self) -> ProbeResult:
        """Read the sums and the sigmas back to the host, once, and drop the kept outputs."""
        self._previous.clear()
        sums = self.sums.cpu() if self.sums is not None else torch.zeros(0, len(self.layers), len(BRANCH_NAMES), 3)
        sigmas = tuple(self.sigmas.float().cpu().tolist()) if self.sigmas is not None else ()
        distance = None
        if self.distance:
            distance = self.distance_sums.cpu() if self.distance_sums is not None else torch.zeros(0, 2)
        return ProbeResult(self.layers, self.kinds, sums, sigmas, distance)


@dataclass(frozen=True)
class ProbeResult:
    layers: tuple[str, ...]
    kinds: tuple[str, ...]
    sums: torch.Tensor  # [steps, layers, branches, (num, den, count)] on the host
    sigmas: tuple[float, ...]  # the run's sigmas, final sigma included
    distance_sums: torch.Tensor | None = None  # [steps, (sum, count)] on the host; None: not recorded

    @property
    def num_steps(self) -> int:
        return max(len(self.sigmas) - 1, 0)

    def relative_change(self) -> torch.Tensor:
        """[steps, layers, branches]: ||o_t - o_{t-1}|| / ||o_{t-1}||, NaN where not recorded (step 0,
        a branch that did not run)."""
        num, den, count = self.sums.double().unbind(-1)
        change = (num / den.clamp_min(1e-30)).sqrt()
        change[count == 0] = math.nan
        steps = self.num_steps or self.sums.shape[0]
        if change.shape[0] < steps:
            change = torch.cat([change, change.new_full((steps - change.shape[0], *change.shape[1:]), math.nan)])
        return change[:steps]

    def layers_of(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]

    def mean_change(self, kind: str = CROSS, branch: int | None = None) -> list[float]:
        """Per step, the mean relative change over the layers of `kind` and over the branches (or one
        `branch`); NaN at step 0 and wherever nothing was recorded."""
        change = self.relative_change()[:, self.layers_of(kind)]
        if branch is not None:
            change = change[:, :, branch]
        change = change.reshape(change.shape[0], -1)
        return [float(row.nanmean()) if (~row.isnan()).any() else math.nan for row in change]

    def cond_uncond_distance(self) -> list[float]:
        """Per step, ||cond - uncond|| / ||cond|| of the first evaluation's denoised predictions (per sample,
        averaged over the batch); NaN where not recorded (CFG 1: no uncond). Empty if not recorded at all."""
        if self.distance_sums is None:
            return []
        total, count = self.distance_sums.double().unbind(-1)
        values = [float(s / c) if c > 0 else math.nan for s, c in zip(total.tolist(), count.tolist(), strict=True)]
        return (values + [math.nan] * self.num_steps)[: self.num_steps or len(values)]


def suggest_gate_step(mean_change: Sequence[float], threshold: float) -> int:
    """The first step g (1 <= g <= steps) from which the mean relative change of cross-attention stays
    below `threshold`: every step t >= g, but the last, changed by less than it from step t-1. Gating
    at g caches cross-attention at step g-1 and reuses it from step g on. Equal to the number of steps
    when the step before the last changed by `threshold` or more: do not gate.

    The last step is left out: schedules such as `normal` end with their largest step in log sigma
    (0.2 to 0.03 at 25 steps), where every layer's output jumps however settled it was, and no gate
    after it would save anything."""
    steps = len(mean_change)
    return _first_step_staying_below(mean_change, threshold, last=steps - 2 if steps > 2 else steps - 1)


def suggest_gate_from_distance(distance: Sequence[float], threshold: float) -> int:
    """For a joint-attention family: the first step g (1 <= g <= steps) from which the cond/uncond distance
    of the predictions stays below `threshold` at every step t >= g, the last included. Gating at g keeps
    the text as it was at step g-1 and runs one branch from step g on, so every step from g on loses
    what the uncond branch would have added: the distance there. The last step is not left out as in
    suggest_gate_step: the distance is not a change from the step before, and it has no jump at the end
    (it falls to 0.001 on the trained joint model). Equal to the number of steps (do not gate) when the
    distance at the last step is not below it, or was not recorded (NaN: CFG 1)."""
    return _first_step_staying_below(distance, threshold, last=len(distance) - 1)


def _first_step_staying_below(values: Sequence[float], threshold: float, last: int) -> int:
    """The first step g (1 <= g) from which every value up to step `last` is below `threshold`; the
    number of steps when the value at `last` is not (or is NaN); 0 for no steps."""
    steps = len(values)
    gate = steps
    for t in range(last, 0, -1):
        value = values[t]
        if math.isnan(value) or value >= threshold:
            break
        gate = t
    return max(gate, 1) if steps else 0


def percent_of_sigma(sigma: float, percent_to_sigma: Callable[[float], float], iterations: int = 60) -> float:
    """The percent p with percent_to_sigma(p) == sigma, by bisection (percent_to_sigma decreases)."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float(percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def gate_at_for_step(sigmas: Sequence[float], gate_step: int, percent_to_sigma: Callable[[float], float]) -> float:
    """The `gate_at` (ComfyUI's percent convention) that makes T-GATE gate at `gate_step` on a run
    with these sigmas (final sigma included): halfway, in percent, between the sigma of the last step
    with text (gate_step - 1) and that of the gate step, rounded to 2 or 3 decimals where that still
    gates at the same step. 1.0 (never gate) when `gate_step` is the number of steps or more."""
    steps = len(sigmas) - 1
    if gate_step >= steps:
        return 1.0
    gate_step = max(gate_step, 1)
    high = percent_of_sigma(float(sigmas[gate_step - 1]), percent_to_sigma)
    low = percent_of_sigma(float(sigmas[gate_step]), percent_to_sigma)
    middle = (high + low) / 2
    for candidate in (round(middle, 2), round(middle, 3), middle):
        if 0.0 <= candidate <= 1.0 and gate_step_of(sigmas, candidate, percent_to_sigma) == gate_step:
            return candidate
    return middle


def gate_step_of(sigmas: Sequence[float], gate_at: float, percent_to_sigma: Callable[[float], float]) -> int:
    """The step T-GATE gates at with `gate_at` on a run with these sigmas (as the T-GATE node places it)."""
    return GateSchedule.from_sigmas(list(sigmas), float(percent_to_sigma(gate_at))).gate_step


__all__ = [
    "CROSS",
    "SELF",
    "ProbeRecorder",
    "ProbeResult",
    "gate_at_for_step",
    "gate_step_of",
    "percent_of_sigma",
    "suggest_gate_from_distance",
    "suggest_gate_step",
]
