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
from functools import cached_property
from typing import Any

import torch

from .branch import FidelityBranch, StandIns, fidelity_index
from .clock import StepClock
from .config import SelfAttentionReuse, TGateConfig
from .deep import DeepLayout
from .evaluation import Evaluation
from .families import CROSS, DEEP, SELF, TextRole, TextStream
from .forward import REPLACED_CROSS, CallSlot, ModelCall, gated_replacement
from .plan import Action, Kept, StepPlan, extra_evaluation_plan, plan_step, plan_steps
from .schedule import GateSchedule, active_conds
from .stats import RunCounts, RunStats, announce
from .store import AttentionStore
from .summary import run_summary
from .text_stream import call_text_rows

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
    # A joint-attention family's text stream (text_stream.py): {module path: TextRole}; empty otherwise.
    # The gate then keeps the fidelity branch's own text rows, not the mean of the branches.
    text_roles: Mapping[str, TextRole] = field(default_factory=dict)
    text_stream: TextStream | None = None  # the family's (families.TextStream); None without one

    @cached_property  # read by every model call: worked out once
    def text_read_layers(self) -> frozenset[str]:
        """The text-stream modules whose rows the image reads: the text is frozen where all return kept rows."""
        return frozenset(p for p, r in self.text_roles.items() if r in (TextRole.READ, TextRole.JOINED_READ))


# Patches ComfyUI applies around every self-attention module (comfy/ldm/modules/attention.py): ToMe
# merges tokens and HyperTile tiles them with a layout drawn anew at every call, so an output kept at
# one step comes back in another step's layout. Self-attention is not reused where one is set.
LAYOUT_PATCHES = ("attn1_patch", "attn1_output_patch")


def layout_patches(transformer_options: Mapping) -> list[str]:
    """The self-attention patches on a model that make reusing self-attention inexact, named."""
    patches = transformer_options.get("patches", {}) if isinstance(transformer_options, Mapping) else {}
    return [f"{kind} {getattr(f, '__qualname__', type(f).__name__)}" for kind in LAYOUT_PATCHES for f in patches.get(kind, ())]


class GateRun:
    """One sampling run under T-GATE: its schedule and plan, what it keeps, and the wiring that
    carries the plan out, evaluation by evaluation.

    `self_attention`: the self-attention reuse the run plans with; None where the node asked for none
    or where self-attention patches make reuse inexact (layout_patches). What the run did is counted
    in `counts` (stats.RunCounts), its steps timed by `clock` (clock.StepClock).
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
        self.counts = RunCounts()
        self.clock = StepClock(schedule.gate_step)
        self.stand_ins = StandIns()
        self.latent_shape: tuple[int, ...] | None = None  # the sampled latent's shape (a window's is smaller)
        self.main: Evaluation | None = None  # the last main evaluation (extra evaluations follow it)
        self.current: Evaluation | None = None  # the evaluation in progress, for its model calls
        # The run's wrappers of attn2 replace patches (forward.gated_replacement), made at first use.
        self.replacements: dict[int, tuple] = {}

    def _kept(self) -> Kept:
        return Kept(self.store.holds(CROSS), self.store.holds(SELF), self.store.holds(DEEP))

    def _main_evaluation(self, plan: StepPlan, conds: list, fidelity: int) -> Evaluation:
        evaluated_for = None if plan.both_branches else self.stand_ins(conds, fidelity)
        self.main = Evaluation(plan, conds, fidelity, len(conds), evaluated_for)
        return self.main

    def evaluate(self, executor, model, conds, x_in, timestep, model_options) -> list:
        """Run one CALC_COND_BATCH evaluation of the main CFG call as the plan says (plan.py): the
        run records what it keeps and asks the plan, and carries the answer out unchanged."""
        sigma = _first_sigma(timestep)  # the evaluation's one host read
        step = self.schedule.step_of(sigma)
        self.clock.mark(step)
        counts = self.counts
        counts.last_step = step
        branches = sum(1 for c in conds if c)
        counts.branch_evaluations += branches
        fidelity = fidelity_index(conds, self.patch.fidelity_branch)
        plan = plan_step(self.plans, step, self._kept())
        evaluation = self._main_evaluation(plan, conds, fidelity)
        if plan.deep_blocks is Action.COMPUTE and self.store.holds(DEEP):
            # Nothing planned reads it any more (a late gate capture computes the deep blocks).
            self.store.clear((DEEP,))
        if plan.is_plain:
            return executor(model, conds, x_in, timestep, model_options)
        # The sampler never evaluated the capture step, or its capture kept nothing: this one captures.
        past_gate = step >= self.schedule.gate_step
        counts.late_capture |= plan.cross_attention is Action.CAPTURE and past_gate and not counts.recaptures
        out = self._carry_out(evaluation, step, sigma, branches, executor, model, x_in, timestep, model_options)
        if evaluation.misfits:
            # Kept outputs did not fit some layers: a patch (Deep Shrink) changed their shape since
            # the capture, so what ran is not T-GATE's and is dropped. Nothing kept fits any more:
            # the plan makes this evaluation a capture, as it does for one that finds nothing kept.
            self._recapture(step, evaluation.misfits[0])
            evaluation = self._main_evaluation(plan_step(self.plans, step, Kept()), conds, fidelity)
            out = self._carry_out(evaluation, step, sigma, branches, executor, model, x_in, timestep, model_options)
        return out

    def _carry_out(self, evaluation, step, sigma, branches, executor, model, x_in, timestep, model_options) -> list:
        """Carry out one evaluation's plan and record what it did (evaluate); an evaluation whose
        kept outputs did not fit (misfits) is left unrecorded, since it runs again."""
        plan, counts = evaluation.plan, self.counts
        captures = plan.kinds(Action.CAPTURE)
        self.store.start_capture(captures, sigma, whole=self.latent_shape is None or tuple(x_in.shape) == self.latent_shape)
        self.current = evaluation
        try:
            out = executor(model, evaluation.run_conds, x_in, timestep, model_options)
        finally:
            self.current = None
            if captures:
                # Only a capture changes what is kept: evaluations that just reuse keep the
                # store's tables, so steps after the gate build nothing.
                self.store.finish_capture()
        if evaluation.misfits:
            return out
        if self.store.repeated is not None:
            self._refuse_windows(step)
            return out
        if captures:
            counts.peak_cache_bytes = max(counts.peak_cache_bytes, self.store.nbytes)
            counts.peak_deep_cache_bytes = max(counts.peak_deep_cache_bytes, self.store.nbytes_of((DEEP,)))
        if plan.cross_attention is Action.CAPTURE:
            # A capture past the gate that kept nothing ran both branches in full.
            counts.uncached_evaluations += not self.store.holds(CROSS) and step >= self.schedule.gate_step
        counts.self_attention_reuses += plan.self_attention is Action.REUSE
        counts.deep_block_reuses += plan.deep_blocks is Action.REUSE
        freed = [kind for kind in plan.free_after if self.store.holds(kind)]
        if freed:
            self.store.clear(freed)
        evaluated_for = evaluation.evaluated_for
        if evaluated_for is None:
            return out
        evaluated = sum(1 for i in set(evaluated_for) if evaluation.conds[i])
        counts.single_branch_evaluations += evaluated == 1
        counts.several_list_evaluations += evaluated > 1
        counts.saved_branch_evaluations += branches - evaluated
        evaluation.one_for_all = evaluated == 1 and evaluation.lists > 2
        # Every list gets the output of the list evaluated for it: cfg(u, u) == u whatever the scale,
        # and so do PerpNeg's and DualCFG's formulas.
        return [out[i] for i in evaluated_for]

    def _recapture(self, step: int, misfit: str) -> None:
        """Drop everything kept after the kept output of layer `misfit` did not fit it at `step`,
        saying so once per run."""
        if not self.counts.recaptures:
            log.warning(
                "T-GATE: at step %d of %d the kept output of %s no longer fits it: a patch such as Deep Shrink "
                "(PatchModelAddDownscale) changed the layer's shape since the capture. The step runs both branches "
                "and captures again, and so does any later step where a shape changes (no layer runs one branch on "
                "outputs of another shape)",
                step + 1,
                self.schedule.num_steps,
                misfit,
            )
        self.counts.recaptures += 1
        self.store.clear()

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
        self.counts.refused = "sliding windows T-GATE cannot tell apart"
        self.plans = plan_steps(self.schedule.num_steps, self.schedule.num_steps, None)
        self.store.clear()

    def evaluate_extra(self, executor, model, conds, x_in, timestep, model_options) -> list:
        """Run an evaluation other than the main CFG one (PAG, SAG, SLG: one cond list) as
        plan.extra_evaluation_plan says for what the last main evaluation did (a late capture reuses
        nothing): these guidance nodes evaluate right after it, at the same sigma, so no sigma is
        read here."""
        main = self.main
        plan = extra_evaluation_plan(main.plan, self._kept()) if main else None
        if plan is None:
            return executor(model, conds, x_in, timestep, model_options)
        self.current = evaluation = main.extra_evaluation(plan, conds)
        try:
            return executor(model, evaluation.run_conds, x_in, timestep, model_options)
        finally:
            self.current = None

    def model_call(
        self,
        evaluation: Evaluation,
        chunk_ids: list,
        cond_or_uncond: list[int],
        device: torch.device,
        text_rows: int | None = None,
    ) -> ModelCall:
        """The tables one batched model call of `evaluation` hands its modules; `text_rows`: how many
        text rows its joined rows hold, where the call says (text_stream.call_text_rows)."""
        plan = evaluation.plan
        reuse_kinds = plan.kinds(Action.REUSE)
        # A chunk of a list the mean capture dropped gets the mean it was averaged into (the mean is
        # the same for every list): a guider's lists that run apart, and an extra evaluation's lists
        # that the main evaluation had not (Evaluation.extra_evaluation).
        reuse = self.store.reuse_table(reuse_kinds, chunk_ids, device, partners=True) if reuse_kinds else {}
        text = self.patch.text_read_layers
        return ModelCall(
            reuse,
            plan.kinds(Action.CAPTURE),
            evaluation.reduction(cond_or_uncond, own=bool(text)),
            {},
            {},
            [],
            text_frozen=bool(text) and text.issubset(reuse),
            text_rows=[] if text_rows is None else [text_rows],
        )

    def stats(self) -> RunStats:
        """What the run did, for listeners (benchmarks, tests): see stats.py."""
        return self.counts.stats(
            family=self.patch.family,
            gate_step=self.schedule.gate_step,
            num_steps=self.schedule.num_steps,
            captured_layers=self.store.layers(CROSS),
            self_attention_layers=self.store.layers(SELF),
            cache_bytes=self.store.nbytes,
            seconds_per_step_before_gate=self.clock.seconds_per_step(False),
            seconds_per_step_after_gate=self.clock.seconds_per_step(True),
            summary=self.summary(),
        )

    def summary(self) -> str:
        """The run's log line (summary.py)."""
        return run_summary(self)

    def close(self) -> None:
        self.store.clear()
        self.replacements.clear()
        self.main = None


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
            "T-GATE: gating after step %d of %d (gate_at %.2f); %s cached there",
            schedule.gate_step,
            schedule.num_steps,
            config.gate_at,
            "the text stream's keys and values are" if patch.text_roles else "cross-attention is",
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
    if schedule.gates and _easycache_follows_the_negative(guider, options):
        log.warning(
            "T-GATE: EasyCache is on this model too. It decides which steps to skip only in the model calls of the "
            "first cond ComfyUI batches, which is the negative, and T-GATE stops running the negative after step "
            "%d of %d: EasyCache skips no step after it (what it skipped before stands). LazyCache decides from "
            "the guided prediction and keeps skipping with T-GATE",
            schedule.gate_step,
            schedule.num_steps,
        )
    # A run that never gates has T-GATE off, self-attention reuse included: DeepCache alone acts. A
    # model with no self-attention patched (joint attention) has none to reuse.
    self_attention = config.self_attention if schedule.gates and SELF in patch.layer_kinds.values() else None
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
        run.counts.stop = stop_reason(error)
        raise
    finally:
        patch.slot.run = outer
        stats = run.stats()
        # Anything that kept T-GATE from acting is a warning: a run that stopped, evaluations past the
        # gate without a cache, or a finished run that never ran one branch alone.
        counts = run.counts
        acted = counts.single_branch_evaluations or counts.deep_block_reuses or counts.stopped
        warn = counts.uncached_evaluations or counts.several_list_evaluations or counts.stopped or not acted
        level = logging.WARNING if warn else logging.INFO
        log.log(level, stats.summary)
        run.close()
        announce(stats)


def _easycache_follows_the_negative(guider, transformer_options: Mapping) -> bool:
    """Whether ComfyUI's EasyCache (comfy_extras/nodes_easycache.py, by its holder's class name) is on
    the model of a run that evaluates a negative: EasyCache takes the first cond of the first batched
    call as the one whose calls decide its skips, and ComfyUI batches the negative first. At cfg 1
    ComfyUI evaluates the positive alone, which T-GATE keeps running."""
    if type(transformer_options.get("easycache")).__name__ != "EasyCacheHolder":
        return False
    conds = getattr(guider, "conds", None) or {}
    return bool(conds.get("negative")) and getattr(guider, "cfg", None) != 1.0


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
    if run is None or run.main is None or not run.main.one_for_all:
        return args["denoised"]
    return args["cond_denoised"]


def apply_model_with_gate(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: hand one batched model call its ModelCall, then keep what it captured.

    ComfyUI calls `_apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)`;
    `transformer_options` carries the call's chunk layout (`cond_or_uncond`, `uuids`).
    """
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    run = _run_of(options)
    evaluation = run.current if run is not None else None
    if evaluation is None or "uuids" not in options or "cond_or_uncond" not in options:
        # Outside the main CFG evaluation, or without the chunk layout nothing can be matched:
        # this call runs as usual.
        return executor(*args, **kwargs)
    rows, chunks = args[0].shape[0], len(options["cond_or_uncond"])
    if rows < chunks or rows % chunks:
        # A model wrapper handed the model fewer rows than the chunks its options list: no output
        # can be matched to a chunk, so this call neither captures nor reuses.
        if not run.counts.unmatched_calls:
            log.warning(
                "T-GATE: a model call got %d input rows for %d conditioning chunks (a model wrapper changed the "
                "batch); such calls run without T-GATE's cache",
                rows,
                chunks,
            )
        run.counts.unmatched_calls += 1
        return executor(*args, **kwargs)
    chunk_ids = _chunk_ids(options, evaluation.chunk_branches(options["cond_or_uncond"]))
    stream = run.patch.text_stream
    text_rows = call_text_rows(stream, kwargs) if stream is not None else None
    if text_rows is None and stream is not None and stream.text_rows_keyword is not None:
        if not run.counts.uneven_text_calls:
            log.warning(
                "T-GATE: a model call holds texts of different lengths for its images (padded captions whose "
                "attention masks differ), so their text rows end at different rows and no kept text fits them: "
                "such calls compute their text in full, and the evaluations they are part of run both branches"
            )
        run.counts.uneven_text_calls += 1
    call = run.model_call(evaluation, chunk_ids, options["cond_or_uncond"], args[0].device, text_rows)
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
    if call.misfits and not evaluation.extra:
        evaluation.misfits.extend(call.misfits)
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
