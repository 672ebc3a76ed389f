"""One sampling run under T-GATE, and the three ComfyUI wrappers that carry out its plan.

OUTER_SAMPLE builds a fresh GateRun for each sampling run (a hires-fix pass or a refiner is a run
of its own) and drops it in `finally`, so a cancelled or failed run leaves nothing behind.
CALC_COND_BATCH looks up, once per model evaluation, the plan of the evaluation's step (plan.py)
and runs one or both CFG branches. APPLY_MODEL, once per batched model call and outside any
torch.compile'd region, hands the attention modules that call's ModelCall (forward.py) and keeps
what they captured. These are plain functions of the arguments ComfyUI passes: the engine imports
nothing from ComfyUI.

One transformer_options key, CONFIG_KEY, holds the node's GatePatch on the patched model; the
run and each model call's tables travel in the patch's CallSlot (forward.py), which the patched
forwards hold.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import torch

from .branch import BRANCH_NAMES, COND, FidelityBranch, fidelity_index, only_lists, stand_ins
from .config import SelfAttentionReuse, TGateConfig
from .deep import DeepLayout
from .families import CROSS, DEEP, SELF
from .forward import REPLACED_CROSS, CallSlot, ModelCall, gated_replacement
from .plan import Action, Kept, StepPlan, extra_evaluation_plan, plan_step, plan_steps
from .schedule import GateSchedule, active_conds
from .stats import RunStats, announce
from .store import AttentionStore

log = logging.getLogger("tgate")

CONFIG_KEY = "tgate"  # transformer_options key of the GatePatch a node put on the model, and its wrappers' key

# The exceptions by which a run is cancelled rather than failed, by class name: ComfyUI's cancel
# (comfy.model_management.InterruptProcessingException) and Ctrl-C. Names, since the engine imports
# nothing from ComfyUI.
CANCELLING_EXCEPTIONS = frozenset({"InterruptProcessingException", "KeyboardInterrupt"})


def stop_reason(error: BaseException) -> str:
    """How a run that raised `error` ended: "cancelled", or "failed (TypeName)"."""
    if any(cls.__name__ in CANCELLING_EXCEPTIONS for cls in type(error).__mro__):
        return "cancelled"
    return f"failed ({type(error).__name__})"


@dataclass(frozen=True)
class GatePatch:
    """What a T-GATE node put on a model: the user's settings, resolved for the model's family."""

    config: TGateConfig  # as the user set them
    family: str
    fidelity_branch: FidelityBranch  # uncond or cond: `auto` resolved for the family
    layer_kinds: Mapping[str, str]  # {patched attention module path: kind}
    slot: CallSlot = field(default_factory=CallSlot)  # the run and the model call in progress; the forwards hold it
    deep: DeepLayout | None = None  # where DeepCache cuts the UNet; None: DeepCache off


# Patches ComfyUI applies around every self-attention module (comfy/ldm/modules/attention.py): ToMe
# merges tokens and HyperTile tiles them with a layout drawn anew at every call, so an output kept at
# one step comes back in another step's layout. Self-attention is not reused where one is set.
LAYOUT_PATCHES = ("attn1_patch", "attn1_output_patch")


def layout_patches(transformer_options: Mapping) -> list[str]:
    """The self-attention patches on a model that make reusing self-attention inexact, named."""
    patches = transformer_options.get("patches", {}) if isinstance(transformer_options, Mapping) else {}
    return [f"{kind} {getattr(f, '__qualname__', type(f).__name__)}" for kind in LAYOUT_PATCHES for f in patches.get(kind, ())]


class GateRun:
    """The state of one sampling run: its schedule and plan, what it keeps, and what happened.

    `self_attention`: the self-attention reuse the run plans with; None where the node asked for none
    or where self-attention patches make reuse inexact (layout_patches).
    """

    def __init__(
        self,
        patch: GatePatch,
        schedule: GateSchedule,
        self_attention: SelfAttentionReuse | None = None,
        guider: str = "CFGGuider",
    ):
        self.patch = patch
        self.guider = guider  # the class name of the run's guider, for what the summary says
        self.schedule = schedule
        self.self_attention = self_attention
        deep = patch.config.deep_cache
        self.plans = plan_steps(schedule.num_steps, schedule.gate_step, self_attention, deep.interval if deep else 1)
        layer_kinds = {**patch.layer_kinds, patch.deep.layer: DEEP} if patch.deep else patch.layer_kinds
        self.store = AttentionStore(layer_kinds, "cpu" if patch.config.cache_device == "cpu" else None)
        self.current: StepPlan | None = None  # the plan of the evaluation in progress
        self.extra = False  # whether that evaluation is an extra one (evaluate_extra)
        # The index in `conds` of the branch the evaluation in progress (or the last) runs after the gate.
        self.fidelity: int | None = None
        self.lists = 2  # how many cond lists that evaluation has (PerpNeg and DualCFG guiders: three)
        # {the cond lists' ids: stand_ins of them}: worked out once per run and layout (it reads tensors).
        self._stand_ins: dict[tuple, tuple[int, ...]] = {}
        self.last_plan: StepPlan | None = None  # what the last main evaluation did (extra evaluations follow it)
        self._capture_sigmas: dict[str, float] = {}  # per kind, the sigma of its last capture
        self.late_capture = False  # whether a capture fell past the gate
        self.single_branch_evaluations = 0
        self.branch_evaluations = 0  # CFG branches the main evaluations would have run without T-GATE
        self.saved_branch_evaluations = 0  # of those, the ones T-GATE did not run
        self.uncached_evaluations = 0
        self.unmatched_calls = 0  # model calls whose rows did not match their chunks (see apply_model_with_gate)
        # Evaluations past the gate that ran several cond lists: a guider's lists whose inputs other
        # than the text differ (branch.stand_ins).
        self.several_list_evaluations = 0
        self.latent_shape: tuple[int, ...] | None = None  # the sampled latent's shape (a window's is smaller)
        self._main_lists: list[int] = []  # id() of each cond list of the last main evaluation
        # For an extra evaluation in progress, the position each of its cond lists had in the main
        # evaluation (PAG passes the main call's cond list, SAG its uncond list): chunks are kept by
        # (uuid, branch), so its chunks are looked up under their main-evaluation branch.
        self.extra_branches: tuple[int, ...] = ()
        # Whether the last main evaluation was one list evaluated for all of a guider's three or more
        # (guided_by_stand_in reads it).
        self.one_for_all = False
        self.misfits: list[str] = []  # layers whose kept output did not fit, in the evaluation in progress
        self.recaptures = 0  # captures taken again after a layer's shape changed
        self.refused: str | None = None  # why the run stopped gating part way (_refuse_windows)
        self.self_attention_reuses = 0
        self.deep_block_reuses = 0  # evaluations that skipped the deep blocks (DeepCache)
        self.peak_bytes = 0
        self.peak_deep_bytes = 0
        self.last_step: int | None = None  # the step of the last evaluation
        self.stop: str | None = None  # how the run stopped early: "cancelled" or "failed (TypeName)"
        # Host wall-clock seconds of the steps before / after the gate, and how many steps each sums.
        self._step_seconds = {False: 0.0, True: 0.0}
        self._steps_timed = {False: 0, True: 0}
        self._step_start: tuple[int, float] | None = None  # (step, perf_counter) of its first evaluation
        # The run's wrappers of attn2 replace patches (forward.gated_replacement), made at first use.
        self.replacements: dict[int, tuple] = {}

    def _kept(self) -> Kept:
        return Kept(self.store.holds(CROSS), self.store.holds(SELF), self.store.holds(DEEP))

    @property
    def stopped(self) -> bool:
        """Whether the run was cancelled or failed."""
        return self.stop is not None

    def _clock(self, step: int) -> None:
        """Time the steps from one step's first evaluation to the next step's.

        Called right after the evaluation's sigma read, a host read of a device tensor: it returns
        only once the device has finished the work queued before it, that is the previous steps'
        model calls. So the host clock here marks when the device was done, and the time from one
        step's mark to the next step's is the whole of that step (every evaluation of it, the
        sampler's own work, guidance nodes' extra calls) without adding a synchronisation. The last
        step has no mark after it and is not timed.
        """
        now = perf_counter()
        if self._step_start is not None:
            start_step, start = self._step_start
            if step == start_step:
                return  # another evaluation of the same step (heun, dpm_2, ...)
            if step > start_step:  # steps a sampler skipped share the time
                for s in range(start_step, step):
                    self._step_seconds[s >= self.schedule.gate_step] += (now - start) / (step - start_step)
                    self._steps_timed[s >= self.schedule.gate_step] += 1
        self._step_start = (step, now)

    def seconds_per_step(self, after_gate: bool) -> float | None:
        """Mean host wall-clock seconds of the timed steps before (or after) the gate; None if none."""
        n = self._steps_timed[after_gate]
        return self._step_seconds[after_gate] / n if n else None

    def evaluate(self, executor, model, conds, x_in, timestep, model_options) -> list:
        """Run one CALC_COND_BATCH evaluation of the main CFG call as the plan says (plan.py): the
        run records what it keeps and asks the plan, and carries the answer out unchanged."""
        sigma = _first_sigma(timestep)  # the evaluation's one host read
        step = self.schedule.step_of(sigma)
        self._clock(step)
        self.last_step = step
        branches = sum(1 for c in conds if c)
        self.branch_evaluations += branches
        self.fidelity = fidelity_index(conds, self.patch.fidelity_branch)
        self.lists = len(conds)
        self.one_for_all = False
        self._main_lists = [id(c) for c in conds]
        plan = self.last_plan = plan_step(self.plans, step, self._kept())
        if plan.deep_blocks is Action.COMPUTE and self.store.holds(DEEP):
            # Nothing planned reads it any more (a late gate capture computes the deep blocks).
            self.store.clear((DEEP,))
        if plan.is_plain:
            return executor(model, conds, x_in, timestep, model_options)
        # The sampler never evaluated the capture step, or its capture kept nothing: this one captures.
        self.late_capture |= plan.cross_attention is Action.CAPTURE and step >= self.schedule.gate_step and not self.recaptures
        out = self._carry_out(plan, step, sigma, branches, executor, model, conds, x_in, timestep, model_options)
        if self.misfits:
            # Kept outputs did not fit some layers: a patch (Deep Shrink) changed their shape since
            # the capture, so what ran is not T-GATE's and is dropped. Nothing kept fits any more:
            # the plan makes this evaluation a capture, as it does for one that finds nothing kept.
            self._recapture(step)
            plan = self.last_plan = plan_step(self.plans, step, Kept())
            out = self._carry_out(plan, step, sigma, branches, executor, model, conds, x_in, timestep, model_options)
        return out

    def _recapture(self, step: int) -> None:
        """Drop everything kept after a misfit at `step`, saying so once per run."""
        if not self.recaptures:
            log.warning(
                "T-GATE: at step %d of %d the kept output of %s no longer fits it: a patch such as Deep Shrink "
                "(PatchModelAddDownscale) changed the layer's shape since the capture. The step runs both branches "
                "and captures again, and so does any later step where a shape changes (no layer runs one branch on "
                "outputs of another shape)",
                step + 1,
                self.schedule.num_steps,
                self.misfits[0],
            )
        self.recaptures += 1
        self.misfits.clear()
        self.store.clear()
        self._capture_sigmas.clear()

    def _refuse_windows(self, step: int) -> None:
        """One chunk was captured twice at `step`: a sampler wrapper evaluates windows of the latent
        with the same conds without naming them (see _chunk_ids), and a window would reuse another's
        attention. The evaluation computed everything (a capture changes no output); the rest of the
        run is planned without a gate."""
        log.warning(
            "T-GATE: at step %d of %d the same conditioning was captured twice: a sampler wrapper (sliding "
            "context windows such as AnimateDiff-Evolved's) evaluates parts of the latent one after another "
            "without naming them in transformer_options ('context_window' or 'ad_params' 'sub_idxs'), so one "
            "part would reuse another's attention. T-GATE is off for the rest of this run",
            step + 1,
            self.schedule.num_steps,
        )
        self.refused = "sliding windows T-GATE cannot tell apart"
        self.plans = plan_steps(self.schedule.num_steps, self.schedule.num_steps, None)
        self.store.clear()

    def _carry_out(self, plan, step, sigma, branches, executor, model, conds, x_in, timestep, model_options) -> list:
        """Carry out one evaluation's plan and record what it did (evaluate); an evaluation whose
        kept outputs did not fit (misfits) is left unrecorded, since it runs again."""
        captures = plan.kinds(Action.CAPTURE)
        # Context windows evaluate parts of the latent one after another at the same sigma: those add
        # to the capture. An evaluation of the whole latent starts a new one, at the same sigma too
        # (heun evaluates a step's sigma twice: the previous step's correction, then the step itself).
        whole = self.latent_shape is None or tuple(x_in.shape) == self.latent_shape
        for kind in captures:
            if self._capture_sigmas.get(kind) != sigma or whole:
                self.store.clear((kind,))
                self._capture_sigmas[kind] = sigma
        self.current = plan
        evaluated_for = None if plan.both_branches else self.stand_ins(conds)
        try:
            run_conds = conds if evaluated_for is None else only_lists(conds, evaluated_for)
            out = executor(model, run_conds, x_in, timestep, model_options)
        finally:
            self.current = None
            if captures:
                # Only a capture changes what is kept: evaluations that just reuse keep the
                # store's tables, so steps after the gate build nothing.
                self.store.finish_capture()
        if self.misfits:
            return out
        if self.store.repeated is not None:
            self._refuse_windows(step)
            return out
        if captures:
            self.peak_bytes = max(self.peak_bytes, self.store.nbytes)
            self.peak_deep_bytes = max(self.peak_deep_bytes, self.store.nbytes_of((DEEP,)))
        if plan.cross_attention is Action.CAPTURE:
            # A capture past the gate that kept nothing ran both branches in full.
            self.uncached_evaluations += not self.store.holds(CROSS) and step >= self.schedule.gate_step
        self.self_attention_reuses += plan.self_attention is Action.REUSE
        self.deep_block_reuses += plan.deep_blocks is Action.REUSE
        freed = [kind for kind in plan.free_after if self.store.holds(kind)]
        if freed:
            self.store.clear(freed)
        if evaluated_for is None:
            return out
        evaluated = sum(1 for i in set(evaluated_for) if conds[i])
        self.single_branch_evaluations += evaluated == 1
        self.several_list_evaluations += evaluated > 1
        self.saved_branch_evaluations += branches - evaluated
        self.one_for_all = evaluated == 1 and len(conds) > 2
        # Every list gets the output of the list evaluated for it: cfg(u, u) == u whatever the scale,
        # and so do PerpNeg's and DualCFG's formulas.
        return [out[i] for i in evaluated_for]

    def stand_ins(self, conds: list) -> tuple[int, ...]:
        """branch.stand_ins of `conds`, worked out once per run and cond layout."""
        key = (self.fidelity, *(id(c) if c else None for c in conds))
        found = self._stand_ins.get(key)
        if found is None:
            found = self._stand_ins[key] = stand_ins(conds, self.fidelity)
        return found

    def evaluate_extra(self, executor, model, conds, x_in, timestep, model_options) -> list:
        """Run an evaluation other than the main CFG one (PAG, SAG, SLG: one cond list; guiders with
        three) as plan.extra_evaluation_plan says for what the last main evaluation did (a late capture
        reuses nothing): these guidance nodes evaluate right after it, at the same sigma, so no sigma
        is read here."""
        main = self.last_plan
        plan = extra_evaluation_plan(main, self._kept()) if main else None
        if plan is None:
            return executor(model, conds, x_in, timestep, model_options)
        self.current, self.extra = plan, True
        self.extra_branches = tuple(
            next((j for j, main in enumerate(self._main_lists) if c and main == id(c)), i) for i, c in enumerate(conds)
        )
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            self.current, self.extra, self.extra_branches = None, False, ()

    def model_call(self, plan: StepPlan, chunk_ids: list, branches: list[int], device: torch.device) -> ModelCall:
        """The tables one batched model call of an evaluation planned by `plan` hands its modules."""
        reuse_kinds = plan.kinds(Action.REUSE)
        # A chunk of a list the mean capture dropped gets the mean it was averaged into (the mean is
        # the same for every list): extra evaluations, a guider's lists that run apart.
        reuse = self.store.reuse_table(reuse_kinds, chunk_ids, device, partners=True) if reuse_kinds else {}
        return ModelCall(reuse, plan.kinds(Action.CAPTURE), plan.reduction(branches, self.fidelity, self.lists), {}, {}, [])

    def stats(self) -> RunStats:
        """What the run did, for listeners (benchmarks, tests): see stats.py."""
        return RunStats(
            family=self.patch.family,
            gate_step=self.schedule.gate_step,
            num_steps=self.schedule.num_steps,
            captured_layers=self.store.layers(CROSS),
            self_attention_layers=self.store.layers(SELF),
            cache_bytes=self.store.nbytes,
            peak_cache_bytes=self.peak_bytes,
            single_branch_evaluations=self.single_branch_evaluations,
            self_attention_reuses=self.self_attention_reuses,
            deep_block_reuses=self.deep_block_reuses,
            peak_deep_cache_bytes=self.peak_deep_bytes,
            uncached_evaluations=self.uncached_evaluations,
            late_capture=self.late_capture,
            stopped_at_step=self.last_step if self.stopped else None,
            stop=self.stop,
            recaptures=self.recaptures,
            branch_evaluations=self.branch_evaluations,
            saved_branch_evaluations=self.saved_branch_evaluations,
            seconds_per_step_before_gate=self.seconds_per_step(False),
            seconds_per_step_after_gate=self.seconds_per_step(True),
            summary=self.summary(),
        )

    def summary(self) -> str:
        s = self.schedule
        if not s.gates:
            text = f"T-GATE: gate_at past the last of {s.num_steps} steps, so only DeepCache acts; "
            if self.stopped:
                text += f"the run {self._ended()}" + (f" at step {self.last_step + 1}; " if self.last_step is not None else "; ")
        elif not self.stopped:
            text = f"T-GATE: {s.gate_step} of {s.num_steps} steps planned with text, then "
        elif self.last_step is None:
            text = f"T-GATE: the run {self._ended()} before its first step of {s.num_steps}; "
        else:
            text = (
                f"T-GATE: the run {self._ended()} at step {self.last_step + 1} of {s.num_steps}, "
                f"the gate being after step {s.gate_step}; until then "
            )
        if not s.gates:
            text += "no evaluation ran one branch alone"
        elif self.single_branch_evaluations:
            branch = BRANCH_NAMES[self.fidelity or COND]
            alone = f"the {branch} branch" if self.lists <= 2 else f"one of {self.guider}'s cond lists"
            text += (
                f"{self.single_branch_evaluations} evaluations ran {alone} "
                f"alone on {self.store.layers(CROSS)} cached cross-attention layers ({self.store.nbytes / 2**20:.1f} MiB)"
            )
        else:
            text += f"no evaluation ran one branch alone ({self.store.layers(CROSS)} cached cross-attention layers)"
        if self.self_attention is not None:
            text += (
                f"; self-attention was reused in {self.self_attention_reuses} evaluations "
                f"(peak cache {self.peak_bytes / 2**20:.1f} MiB)"
            )
        elif self.patch.config.self_attention is not None and s.gates:
            text += "; self-attention was not reused (self-attention patches on the model)"
        if self.patch.deep is not None:
            d = self.patch.config.deep_cache
            text += (
                f"; DeepCache (interval {d.interval}, branch {d.branch}) skipped the deep blocks in "
                f"{self.deep_block_reuses} evaluations (peak {self.peak_deep_bytes / 2**20:.1f} MiB kept)"
            )
        text += f"; {self.saved_branch_evaluations} of {self.branch_evaluations} CFG branch evaluations saved"
        timing = [
            f"{seconds:.3g} s per step {where} the gate"
            for seconds, where in ((self.seconds_per_step(False), "before"), (self.seconds_per_step(True), "after"))
            if seconds is not None
        ]
        if timing:
            text += "; " + " and ".join(timing)
        if self.several_list_evaluations:
            text += (
                f"; {self.several_list_evaluations} evaluations after the gate ran several of {self.guider}'s cond lists "
                "on the cache, since their inputs other than the text differ (area, mask, ControlNet, or a pooled "
                "text vector such as SDXL's): one list stands for another only where they agree"
            )
        if self.unmatched_calls:
            text += (
                f"; {self.unmatched_calls} model calls had fewer input rows than conditioning chunks (a model "
                "wrapper changed the batch) and ran without the cache"
            )
        elif self.late_capture:
            text += "; the sampler skipped the capture step, so the first evaluation past the gate captured"
        if self.recaptures:
            text += f"; {self.recaptures} captures were taken again after a layer's shape changed (Deep Shrink)"
        if self.refused:
            text += f"; gating was turned off part way: {self.refused}"
        if self.uncached_evaluations:
            text += f"; {self.uncached_evaluations} evaluations after the gate found no cache and ran in full"
        return text

    def _ended(self) -> str:
        """How a run that stopped early ended, for its summary: was cancelled, or failed (TypeName)."""
        return "was cancelled" if self.stop == "cancelled" else str(self.stop)

    def close(self) -> None:
        self.store.clear()
        self.replacements.clear()


def sample_with_gate(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: one GateRun per sampling run, freed however the run ends."""
    guider = executor.class_obj
    options = guider.model_options.get("transformer_options", {})
    patch: GatePatch | None = options.get(CONFIG_KEY)
    sigmas = kwargs["sigmas"] if "sigmas" in kwargs else args[3]
    if patch is None or sigmas is None or len(sigmas) < 2:
        return executor(*args, **kwargs)
    config = patch.config
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    gate_sigma = float(model_sampling.percent_to_sigma(config.gate_at))
    schedule = GateSchedule.from_sigmas(sigmas.tolist(), gate_sigma)
    if schedule.gates:
        schedule = _settled(schedule, guider)
    if not schedule.gates and patch.deep is None:
        log.info("T-GATE: gate_at %.2f is past the last of %d steps; sampling unchanged", config.gate_at, schedule.num_steps)
        return executor(*args, **kwargs)
    if schedule.gates:
        log.info(
            "T-GATE: gating after step %d of %d (gate_at %.2f); cross-attention is cached there",
            schedule.gate_step,
            schedule.num_steps,
            config.gate_at,
        )
    else:
        log.info("T-GATE: gate_at %.2f is past the last of %d steps; DeepCache alone", config.gate_at, schedule.num_steps)
    patches = attention_patches(options) if schedule.gates else []
    if patches:
        log.warning(
            "T-GATE: the model has %s: what they add to cross-attention is captured at the gate with the text "
            "(the mean of both branches) and reused after it; a patch that changes its behaviour after the gate "
            "(an image prompt that starts or ends later) is not seen",
            " and ".join(patches),
        )
    # A run that never gates has T-GATE off, self-attention reuse included: DeepCache alone acts.
    self_attention = config.self_attention if schedule.gates else None
    refused = layout_patches(options) if self_attention is not None else []
    if refused:
        log.warning(
            "T-GATE: self-attention is not reused in this run: %s change its tokens at every step (token merging "
            "or tiling), so a kept output would not fit a later step; cross-attention is gated as usual",
            ", ".join(refused),
        )
        self_attention = None
    run = GateRun(patch, schedule, self_attention, guider=type(guider).__name__)
    noise = kwargs["noise"] if "noise" in kwargs else args[0]
    run.latent_shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else None
    outer, patch.slot.run = patch.slot.run, run  # a run sampled inside another gets the slot back after it
    try:
        return executor(*args, **kwargs)
    except BaseException as error:
        run.stop = stop_reason(error)
        raise
    finally:
        patch.slot.run = outer
        stats = run.stats()
        # Anything that kept T-GATE from acting is a warning: a run that stopped, evaluations past the
        # gate without a cache, or a finished run that never ran one branch alone.
        acted = run.single_branch_evaluations or run.deep_block_reuses or run.stopped
        warn = run.uncached_evaluations or run.several_list_evaluations or run.stopped or not acted
        level = logging.WARNING if warn else logging.INFO
        log.log(level, stats.summary)
        run.close()
        announce(stats)


def _settled(schedule: GateSchedule, guider) -> GateSchedule:
    """`schedule` with the gate moved past the last change in what the capture cannot stand for
    (GateSchedule.settled): the guider's active conds and the layers a block patch resizes, with a
    WARNING naming the step and what changes there."""
    conds = getattr(guider, "conds", None) or {}
    named = [(name, i, c) for name, cond_list in conds.items() for i, c in enumerate(cond_list or ()) if isinstance(c, dict)]
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    ranges = [_sigma_range(c, model_sampling) for _, _, c in named]
    resizes = _resizing_patches(guider)
    if not resizes and all(r == (None, None) for r in ranges):
        return schedule
    facts = [(active_conds(ranges, sigma), tuple(resized(sigma) for resized in resizes)) for sigma in schedule.sigmas]
    settled = schedule.settled(facts)
    if settled.gate_step == schedule.gate_step:
        return settled
    step = settled.gate_step - 1  # the first step of the settled facts (0-based)
    (conds_now, sizes_now), (conds_before, sizes_before) = facts[step], facts[step - 1]
    changes = [_cond_name(*named[j]) for j in range(len(named)) if conds_now[j] != conds_before[j]]
    if sizes_now != sizes_before:
        changes.append("a block patch (Deep Shrink, PatchModelAddDownscale) resizes the model's inner layers or stops")
    where = (
        f"the capture moves to step {settled.gate_step} and the gate to after it"
        if settled.gates
        else "no step is left to gate, so this run samples without T-GATE"
    )
    log.warning(
        "T-GATE: what the model is given changes at step %d of %d, after the gate (after step %d): %s. What the gate "
        "captures stands for every later step, so %s",
        settled.gate_step,
        schedule.num_steps,
        schedule.gate_step,
        "; ".join(changes),
        where,
    )
    return settled


def _resizing_patches(guider) -> list:
    """For each of the model's input block patches (Deep Shrink's downscale), a function of a sigma
    giving the blocks at which it resizes a dummy latent there: the patch is asked, as the UNet
    would ask it, with each input block's index and the sigma. Patches that cannot answer a dummy
    (they read more than `block` and `sigmas`) are left to the run's check (GateRun.misfits)."""
    patches = guider.model_options.get("transformer_options", {}).get("patches", {})
    found = [p for kind in ("input_block_patch", "input_block_patch_after_skip") for p in patches.get(kind, ())]
    if not found:
        return []
    blocks = len(getattr(guider.model_patcher.get_model_object("diffusion_model"), "input_blocks", ()))
    if not blocks:
        return []
    dummy = torch.zeros(1, 1, 16, 16)

    def resizer(patch):
        def resized(sigma: float) -> tuple[int, ...]:
            sigmas = torch.tensor([sigma])
            out = []
            for block in range(blocks):
                try:
                    shape = patch(dummy, {"block": ("input", block), "sigmas": sigmas}).shape
                except Exception:
                    return ()
                if shape != dummy.shape:
                    out.append(block)
            return tuple(out)

        return resized

    return [resizer(p) for p in found]


_PERCENT_KEYS = ("start_percent", "end_percent", "clip_start_percent", "clip_end_percent")


def _cond_name(name: str, index: int, cond: dict) -> str:
    """`the positive's cond 2 (start_percent 0.5, end_percent 1) starts or ends`: a cond as a user finds it."""
    percents = ", ".join(f"{k} {cond[k]:g}" for k in _PERCENT_KEYS if k in cond)
    return f"the {name}'s cond {index + 1} ({percents}) starts or ends"


def _sigma_range(cond: dict, model_sampling) -> tuple[float | None, float | None]:
    """The (start, end) sigmas of a cond, as comfy.samplers.calculate_start_end_timesteps sets them."""
    if "clip_start_percent" in cond:
        start = max(cond["clip_start_percent"], cond.get("start_percent", 0.0))
        end = min(cond["clip_end_percent"], cond.get("end_percent", 1.0))
    else:
        start, end = cond.get("start_percent"), cond.get("end_percent")
    return (
        None if start is None else float(model_sampling.percent_to_sigma(start)),
        None if end is None else float(model_sampling.percent_to_sigma(end)),
    )


def _run_of(options: Any) -> GateRun | None:
    """The run in progress of the T-GATE'd model whose transformer_options are `options`."""
    patch = options.get(CONFIG_KEY) if isinstance(options, dict) else None
    return patch.slot.run if isinstance(patch, GatePatch) else None


def calc_cond_batch_with_gate(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: carry out the step's plan.

    The guider's own evaluation passes two cond lists (CFG) or three (PerpNegGuider,
    DualCFGGuider); the extra calls of PAG, SAG and SLG pass one (evaluate_extra).
    """
    run = _run_of(model_options.get("transformer_options"))
    if run is None:
        return executor(model, conds, x_in, timestep, model_options)
    if len(conds) < 2:
        return run.evaluate_extra(executor, model, conds, x_in, timestep, model_options)
    return run.evaluate(executor, model, conds, x_in, timestep, model_options)


def guided_by_stand_in(args: dict):
    """A sampler_post_cfg_function, first of the model's: where one evaluation stood for all the cond
    lists of a guider with three (PerpNegGuider, DualCFGGuider), the guided result is its output.
    Every difference the guider's formula takes is then zero; DualCFG's formula gives the output
    itself, PerpNeg's divides zero by zero (NaN), and its limit is the output. Otherwise the result
    passes unchanged, so later post-CFG functions (PAG, SAG, RescaleCFG) act on it as usual."""
    run = _run_of((args.get("model_options") or {}).get("transformer_options"))
    if run is None or not run.one_for_all:
        return args["denoised"]
    return args["cond_denoised"]


def apply_model_with_gate(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: hand one batched model call its ModelCall, then keep what it captured.

    ComfyUI calls `_apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)`;
    `transformer_options` carries the call's chunk layout (`cond_or_uncond`, `uuids`).
    """
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    run = _run_of(options)
    plan = run.current if run is not None else None
    if plan is None or "uuids" not in options or "cond_or_uncond" not in options:
        # Outside the main CFG evaluation, or without the chunk layout nothing can be matched:
        # this call runs as usual.
        return executor(*args, **kwargs)
    rows, chunks = args[0].shape[0], len(options["cond_or_uncond"])
    if rows < chunks or rows % chunks:
        # A model wrapper handed the model fewer rows than the chunks its options list: no output
        # can be matched to a chunk, so this call neither captures nor reuses.
        if not run.unmatched_calls:
            log.warning(
                "T-GATE: a model call got %d input rows for %d conditioning chunks (a model wrapper changed the "
                "batch); such calls run without T-GATE's cache",
                rows,
                chunks,
            )
        run.unmatched_calls += 1
        return executor(*args, **kwargs)
    branches = options["cond_or_uncond"]
    if run.extra:
        branches = [run.extra_branches[b] if b < len(run.extra_branches) else b for b in branches]
    chunk_ids = _chunk_ids(options, branches)
    call = run.model_call(plan, chunk_ids, options["cond_or_uncond"], args[0].device)
    slot = run.patch.slot
    deep = run.patch.deep
    if deep is not None and deep.layer in call.reuse:
        # This call skips the deep blocks: their ControlNet residuals have nothing to add to.
        control = args[4] if len(args) > 4 else kwargs.get("control")
        if control is not None:
            if len(args) > 4:
                args = (*args[:4], deep.trim_control(control), *args[5:])
            else:
                kwargs = {**kwargs, "control": deep.trim_control(control)}
    gated = _with_gated_replacements(options, run)
    if gated is not options:
        if len(args) > 5:
            args = (*args[:5], gated, *args[6:])
        else:
            kwargs = {**kwargs, "transformer_options": gated}
    slot.call = call
    try:
        out = executor(*args, **kwargs)
    finally:
        slot.call = None
    if call.misfits and not run.extra:
        run.misfits.extend(call.misfits)
    for layer in list(call.captured):
        kind = CROSS if layer.startswith(REPLACED_CROSS) else None  # a replaced layer is cross-attention
        run.store.store(layer, call.captured.pop(layer), call.reduction, chunk_ids, kind)  # one layer's copy at a time
    return out


def _with_gated_replacements(options: dict, run: GateRun) -> dict:
    """`options` with each attn2 replace patch wrapped for T-GATE (forward.gated_replacement), as a
    new dict: the model's own options, and the replacements, are left unchanged. Done per model
    call, so replacements added after the T-GATE node in the chain are served too."""
    replace = options.get("patches_replace")
    attn2 = replace.get("attn2") if isinstance(replace, dict) else None
    if not attn2:
        return options
    wrapped = {block: gated_replacement(patch, run.patch.slot, run.replacements) for block, patch in attn2.items()}
    return {**options, "patches_replace": {**replace, "attn2": wrapped}}


def attention_patches(transformer_options: Any) -> list[str]:
    """The patches in `transformer_options` that act on cross-attention from outside it, by kind."""
    if not isinstance(transformer_options, dict):
        return []
    found = []
    if (transformer_options.get("patches_replace") or {}).get("attn2"):
        found.append("attn2 replace patches (IPAdapter-style)")
    if (transformer_options.get("patches") or {}).get("attn2_patch"):
        found.append("attn2_patch")
    return found


def _chunk_ids(options: dict, branches: list[int]) -> list:
    """What identifies a chunk's kept output: its cond's uuid and branch, and its context window if
    any. The branch, since ComfyUI gives the negative a copy of each positive area cond, uuid
    included (create_cond_with_same_area_if_none). Context windows run the same conds on several
    slices of the latent: ComfyUI's own name theirs in `context_window`, AnimateDiff-Evolved's
    (through sampler_calc_cond_batch_function) in `ad_params["sub_idxs"]`. Windows named otherwise
    are found by the store (a chunk captured twice at one step) and the run is left ungated."""
    chunks = list(zip(options["uuids"], branches, strict=False))
    window = options.get("context_window")
    if window is not None:
        span = tuple(getattr(window, "index_list", ()) or ())
    else:
        ad_params = options.get("ad_params")
        sub_idxs = ad_params.get("sub_idxs") if isinstance(ad_params, dict) else None
        if sub_idxs is None:
            return chunks
        span = tuple(sub_idxs.tolist() if hasattr(sub_idxs, "tolist") else sub_idxs)
    return [(*chunk, span) for chunk in chunks]


def _first_sigma(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)
