"""One sampling run under T-GATE, and the three ComfyUI wrappers that drive it.

OUTER_SAMPLE builds a fresh GateRun for each sampling run (a hires-fix pass or a refiner is a run
of its own) and drops it in `finally`, so a cancelled or failed run leaves nothing behind.
CALC_COND_BATCH decides, once per model evaluation, what the evaluation does: run unchanged,
capture, or run one CFG branch on the cache. APPLY_MODEL, once per batched model call and outside
any torch.compile'd region, hands the cross-attention modules that call's cached outputs, or
collects what they computed. These are plain functions of the arguments ComfyUI passes: the engine
imports nothing from ComfyUI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .attention import CAPTURE_KEY, CAPTURE_PLAN_KEY, REPLAY_KEY
from .branch import BRANCH_NAMES, kept_branch, only_branch
from .cache import CrossAttentionCache
from .config import TGateConfig
from .schedule import GateSchedule, Stage

log = logging.getLogger("tgate")

CONFIG_KEY = "tgate"  # transformer_options key of the node's TGateConfig
RUN_KEY = "tgate_run"  # transformer_options key of the current GateRun
PASS_KEY = "tgate_pass"  # transformer_options key of the current evaluation's GatePass


@dataclass(frozen=True)
class GatePass:
    """What one model evaluation does with cross-attention: capture it, or replay the cache."""

    stage: Stage
    cache: CrossAttentionCache


class GateRun:
    """The state of one sampling run: its schedule, its cache and what happened."""

    def __init__(self, config: TGateConfig, schedule: GateSchedule):
        self.config = config
        self.schedule = schedule
        self.cache = CrossAttentionCache("cpu" if config.cache_device == "cpu" else None)
        # Built once per run so that evaluations allocate nothing on the host side.
        self.capture_pass = GatePass(Stage.CAPTURE, self.cache)
        self.replay_pass = GatePass(Stage.FIDELITY, self.cache)
        self._capture_sigma: float | None = None  # the sigma of the last capture; None before any
        self.late_capture = False
        self.single_branch_evaluations = 0
        self.uncached_evaluations = 0

    def evaluate(self, executor, model, conds, x_in, timestep, model_options) -> list:
        """Run one CALC_COND_BATCH evaluation of the main CFG call."""
        sigma = _first_sigma(timestep)  # the evaluation's one host read
        stage = self.schedule.stage_of(sigma)
        if stage is Stage.PLAN:
            return executor(model, conds, x_in, timestep, model_options)
        keep = kept_branch(conds, self.config.fidelity_branch)
        if stage is Stage.FIDELITY and not self.captured:
            # The sampler never evaluated the capture step (dpm_fast and dpm_adaptive pick their
            # own sigmas; EasyCache may skip it): capture at the first evaluation past the gate.
            stage = Stage.CAPTURE
            self.late_capture = True
        if stage is Stage.CAPTURE:
            if sigma != self._capture_sigma:
                # A new capture; context windows call again at the same sigma and add to it.
                self.cache.begin_capture(keep)
                self._capture_sigma = sigma
            out = executor(model, conds, x_in, timestep, _with_option(model_options, PASS_KEY, self.capture_pass))
            self.cache.finish_capture()
            return out
        if len(self.cache) == 0:
            # No layer could be cached (all of them replaced by other packs' attn2 patches): one
            # branch would lose the prompt altogether, so guidance stays whole.
            self.uncached_evaluations += 1
            return executor(model, conds, x_in, timestep, model_options)
        out = executor(model, only_branch(conds, keep), x_in, timestep, _with_option(model_options, PASS_KEY, self.replay_pass))
        self.single_branch_evaluations += 1
        # Both CFG inputs get the kept branch: cfg(u, u) == u whatever the scale.
        return [out[keep]] * len(conds)

    @property
    def captured(self) -> bool:
        return self._capture_sigma is not None

    @property
    def captured_layers(self) -> int:
        return self.cache.layers

    @property
    def captured_bytes(self) -> int:
        return self.cache.nbytes

    def stats(self) -> dict:
        """What the run did, for logs and benchmarks."""
        return {
            "gate_step": self.schedule.gate_step,
            "num_steps": self.schedule.num_steps,
            "captured_layers": self.captured_layers,
            "cache_bytes": self.captured_bytes,
            "single_branch_evaluations": self.single_branch_evaluations,
            "uncached_evaluations": self.uncached_evaluations,
            "late_capture": self.late_capture,
        }

    def summary(self) -> str:
        s = self.schedule
        text = (
            f"T-GATE: {s.gate_step} of {s.num_steps} steps planned with text, then "
            f"{self.single_branch_evaluations} evaluations ran the {BRANCH_NAMES[self.cache.keep_branch]} branch "
            f"alone on {self.captured_layers} cached cross-attention layers ({self.captured_bytes / 2**20:.1f} MiB)"
        )
        if self.late_capture:
            text += "; the sampler skipped the capture step, so the first evaluation past the gate captured"
        if self.uncached_evaluations:
            text += f"; {self.uncached_evaluations} evaluations after the gate found no cache and ran in full"
        return text

    def close(self) -> None:
        self.cache.clear()


def sample_with_gate(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: one GateRun per sampling run, freed however the run ends."""
    guider = executor.class_obj
    original_options = guider.model_options
    config: TGateConfig | None = original_options.get("transformer_options", {}).get(CONFIG_KEY)
    sigmas = kwargs["sigmas"] if "sigmas" in kwargs else args[3]
    if config is None or sigmas is None or len(sigmas) < 2:
        return executor(*args, **kwargs)
    model_sampling = guider.model_patcher.get_model_object("model_sampling")
    gate_sigma = float(model_sampling.percent_to_sigma(config.gate_at))
    schedule = GateSchedule.from_sigmas(sigmas.tolist(), gate_sigma)
    if not schedule.gates:
        log.info("T-GATE: gate_at %.2f is past the last of %d steps; sampling unchanged", config.gate_at, schedule.num_steps)
        return executor(*args, **kwargs)
    log.info(
        "T-GATE: gating after step %d of %d (gate_at %.2f); cross-attention is cached there",
        schedule.gate_step,
        schedule.num_steps,
        config.gate_at,
    )
    run = GateRun(config, schedule)
    guider.model_options = _with_option(original_options, RUN_KEY, run)
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        level = logging.WARNING if run.uncached_evaluations else logging.INFO
        log.log(level, run.summary(), extra={"tgate_run": run.stats()})
        run.close()


def calc_cond_batch_with_gate(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: capture or skip the text branch in the main CFG call only.

    Extra model calls made by PAG, SAG, PerpNeg or DualCFG pass one or three cond lists; they
    run untouched and never see the cache.
    """
    run: GateRun | None = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is None or len(conds) != 2:
        return executor(model, conds, x_in, timestep, model_options)
    return run.evaluate(executor, model, conds, x_in, timestep, model_options)


def apply_model_with_gate(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: give one batched model call its replay table, or collect its capture.

    ComfyUI calls `_apply_model(x, t, c_concat, c_crossattn, control, transformer_options, ...)`;
    `transformer_options` carries the call's chunk layout (`cond_or_uncond`, `uuids`).
    """
    position = 5 if len(args) > 5 else None
    options = args[5] if position else kwargs.get("transformer_options")
    gate: GatePass | None = options.get(PASS_KEY) if isinstance(options, dict) else None
    if gate is None or "uuids" not in options or "cond_or_uncond" not in options:
        # Without the chunk layout nothing can be matched: this call runs as usual, and an
        # evaluation past the gate that finds no cache keeps both branches (GateRun.evaluate).
        return executor(*args, **kwargs)
    chunk_ids = _chunk_ids(options)
    if gate.stage is Stage.FIDELITY:
        table = gate.cache.replay_table(chunk_ids, args[0].device)
        call_args, call_kwargs = _with_call_options(args, kwargs, position, options, {REPLAY_KEY: table})
        return executor(*call_args, **call_kwargs)
    captured: dict = {}
    plan = gate.cache.plan(options["cond_or_uncond"])
    additions = {CAPTURE_KEY: captured, CAPTURE_PLAN_KEY: plan}
    call_args, call_kwargs = _with_call_options(args, kwargs, position, options, additions)
    out = executor(*call_args, **call_kwargs)
    for layer in list(captured):
        gate.cache.store(layer, captured.pop(layer), plan, chunk_ids)  # one layer's copy at a time
    return out


def _chunk_ids(options: dict) -> list:
    """What identifies a chunk's cached output: its cond's uuid, and its context window if any
    (ComfyUI's context windows run the same conds on several slices of the latent)."""
    window = options.get("context_window")
    if window is None:
        return options["uuids"]
    span = tuple(getattr(window, "index_list", ()) or ())
    return [(uuid, span) for uuid in options["uuids"]]


def _with_call_options(args, kwargs, position, options, additions):
    """The call's arguments with a copy of `transformer_options` that carries `additions`."""
    options = {**options, **additions}
    if position is None:
        return args, {**kwargs, "transformer_options": options}
    return (*args[:position], options, *args[position + 1 :]), kwargs


def _first_sigma(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


def _with_option(model_options: dict, key: str, value: Any) -> dict:
    """A copy of `model_options` whose transformer_options carry `key`; the input is unchanged."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), key: value}
    return options
