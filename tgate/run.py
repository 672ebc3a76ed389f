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

from .branch import BRANCH_NAMES, COND, FidelityBranch, fidelity_index, only_branch
from .config import SelfAttentionReuse, TGateConfig
from .deep import DeepLayout
from .families import CROSS, DEEP, SELF
from .forward import REPLACED_CROSS, CallSlot, ModelCall, gated_replacement
from .plan import Action, Kept, StepPlan, extra_evaluation_plan, plan_step, plan_steps
from .schedule import GateSchedule
from .stats import RunStats, announce
from .store import AttentionStore, layer_of

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

    def __init__(self, patch: GatePatch, schedule: GateSchedule, self_attention: SelfAttentionReuse | None = None):
        self.patch = patch
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
        self.last_plan: StepPlan | None = None  # what the last main evaluation did (extra evaluations follow it)
        self._capture_sigmas: dict[str, float] = {}  # per kind, the sigma of its last capture
        self.late_capture = False  # whether a capture fell past the gate
        self.single_branch_evaluations = 0
        self.branch_evaluations = 0  # CFG branches the main evaluations would have run without T-GATE
        self.saved_branch_evaluations = 0  # of those, the ones T-GATE did not run
        self.uncached_evaluations = 0
        self.unmatched_calls = 0  # model calls whose rows did not match their chunks (see apply_model_with_gate)
        self.many_cond_evaluations = 0  # evaluations of more than two cond lists (guiders T-GATE does not gate)
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
        plan = self.last_plan = plan_step(self.plans, step, self._kept())
        if plan.deep_blocks is Action.COMPUTE and self.store.holds(DEEP):
            # Nothing planned reads it any more (a late gate capture computes the deep blocks).
            self.store.clear((DEEP,))
        if plan.is_plain:
            return executor(model, conds, x_in, timestep, model_options)
        # The sampler never evaluated the capture step, or its capture kept nothing: this one captures.
        self.late_capture |= plan.cross_attention is Action.CAPTURE and step >= self.schedule.gate_step
        captures = plan.kinds(Action.CAPTURE)
        for kind in captures:
            if self._capture_sigmas.get(kind) != sigma:
                # A new capture; context windows call again at the same sigma and add to it.
                self.store.clear((kind,))
                self._capture_sigmas[kind] = sigma
        self.current = plan
        try:
            run_conds = conds if plan.both_branches else only_branch(conds, self.fidelity)
            out = executor(model, run_conds, x_in, timestep, model_options)
        finally:
            self.current = None
            if captures:
                # Only a capture changes what is kept: evaluations that just reuse keep the
                # store's tables, so steps after the gate build nothing.
                self.store.finish_capture()
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
        if plan.both_branches:
            return out
        self.single_branch_evaluations += 1
        self.saved_branch_evaluations += branches - 1
        # Both CFG inputs get the fidelity branch: cfg(u, u) == u whatever the scale.
        return [out[self.fidelity]] * len(conds)

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
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            self.current, self.extra = None, False

    def model_call(self, plan: StepPlan, chunk_ids: list, branches: list[int], device: torch.device) -> ModelCall:
        """The tables one batched model call of an evaluation planned by `plan` hands its modules."""
        reuse_kinds = plan.kinds(Action.REUSE)
        reuse = self.store.reuse_table(reuse_kinds, chunk_ids, device, partners=self.extra) if reuse_kinds else {}
        return ModelCall(reuse, plan.kinds(Action.CAPTURE), plan.reduction(branches, self.fidelity), {}, {})

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
            text += (
                f"{self.single_branch_evaluations} evaluations ran the {BRANCH_NAMES[self.fidelity or COND]} branch "
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
        if self.many_cond_evaluations:
            text += (
                f"; {self.many_cond_evaluations} evaluations passed more than two cond lists (PerpNegGuider, "
                "DualCFGGuider), which T-GATE leaves as they are"
            )
        if self.unmatched_calls:
            text += (
                f"; {self.unmatched_calls} model calls had fewer input rows than conditioning chunks (a model "
                "wrapper changed the batch) and ran without the cache"
            )
        elif self.late_capture:
            text += "; the sampler skipped the capture step, so the first evaluation past the gate captured"
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
    run = GateRun(patch, schedule, self_attention)
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
        level = logging.WARNING if run.uncached_evaluations or run.stopped or not acted else logging.INFO
        log.log(level, stats.summary)
        run.close()
        announce(stats)


def _run_of(options: Any) -> GateRun | None:
    """The run in progress of the T-GATE'd model whose transformer_options are `options`."""
    patch = options.get(CONFIG_KEY) if isinstance(options, dict) else None
    return patch.slot.run if isinstance(patch, GatePatch) else None


def calc_cond_batch_with_gate(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: carry out the step's plan in the main CFG call only.

    Extra model calls made by PAG, SAG, PerpNeg or DualCFG pass one or three cond lists; they
    run untouched and never see what the run keeps.
    """
    run = _run_of(model_options.get("transformer_options"))
    if run is None:
        return executor(model, conds, x_in, timestep, model_options)
    if len(conds) != 2:
        run.many_cond_evaluations += len(conds) > 2  # PerpNegGuider, DualCFGGuider: not gated (yet)
        return run.evaluate_extra(executor, model, conds, x_in, timestep, model_options)
    return run.evaluate(executor, model, conds, x_in, timestep, model_options)


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
    chunk_ids = _chunk_ids(options)
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
    for layer in list(call.captured):
        if layer.startswith(REPLACED_CROSS):
            run.store.layer_kinds.setdefault(layer_of(layer), CROSS)  # a replaced layer is cross-attention
        run.store.store(layer, call.captured.pop(layer), call.reduction, chunk_ids)  # one layer's copy at a time
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


def _chunk_ids(options: dict) -> list:
    """What identifies a chunk's kept output: its cond's uuid, and its context window if any
    (ComfyUI's context windows run the same conds on several slices of the latent)."""
    window = options.get("context_window")
    if window is None:
        return options["uuids"]
    span = tuple(getattr(window, "index_list", ()) or ())
    return [(uuid, span) for uuid in options["uuids"]]


def _first_sigma(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)
