"""The T-GATE probe node: sample as KSampler does (T-GATE off) and measure how fast each attention
layer's output settles, to choose `gate_at` for the T-GATE nodes."""

from __future__ import annotations

import logging
import math

import comfy.patcher_extension
import comfy.samplers
from comfy_api.latest import io

from .inputs import ValidatedCombo
from .probe_plot import HEIGHT, WIDTH, Marks, blank_image, plot_probe
from .tgate import CONFIG_KEY, CROSS, KINDS, SELF, attention_layers, family_of, supported_families
from .tgate.probe import (
    ProbeRecorder,
    ProbeResult,
    gate_at_for_step,
    gate_step_of,
    suggest_gate_from_distance,
    suggest_gate_step,
)

log = logging.getLogger("tgate")

WRAPPER_KEY = "tgate_probe"
# A heuristic, checked on one small trained model (README "Choosing the gate", docs/trained/table.md):
# there 0.05 suggests step 12 of 25 (gate_at 0.46), inside the range where prompt-following holds
# (gate_at 0.3 and later); 0.07 and above suggest step 5 or earlier, where it drops by 0.1 or more.
DEFAULT_THRESHOLD = 0.05
# On a joint-attention family the same `threshold` input is read against the cond/uncond distance of
# the predictions (tgate/probe.py says why). Chosen on the trained joint model at the joint study's
# settings (python -m tgate_bench.joint_probe; docs/choosing-the-gate.md, "Joint-attention models"):
# 0.05 suggests step 8 of 25 (gate_at 0.3), before the default gate (step 11), and the positive's text
# frozen there keeps prompt-following within the study's 0.05 of the baseline. It equals
# DEFAULT_THRESHOLD, so the input's one default serves both rules (tests/test_probe.py checks that).
JOINT_THRESHOLD = 0.05

RULE = (
    "The suggested gate is the first step from which the mean relative change of cross-attention "
    "(||output at step t - output at step t-1|| / ||output at step t-1||, averaged over the layers and both "
    "CFG branches) stays below `threshold` until the step before the last (the last step is left out: "
    "schedules such as normal end with a jump every layer follows); it is converted to gate_at with the model's "
    "sigmas (ComfyUI's percent convention), so T-GATE fed this value gates at that step on the same "
    "steps, sampler and scheduler. 1.0 (never gate) when the mean never stays below it. On a joint-attention "
    "model (Flux, Chroma, Qwen-Image, SD3, AuraFlow, Mochi, Lumina 2, HiDream), whose text stream keeps changing with "
    "the timestep, it is the first step from which the distance of CFG's two predictions, ||cond - uncond|| / "
    "||cond||, stays below `threshold` to the last step (at cfg 1 the probe evaluates the negative too, for this distance only)."
)


def record_run(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
    """Sample exactly as KSampler does (nodes.common_ksampler) on a clone of `model` with T-GATE off,
    recording every cross- and self-attention layer. Returns (latent dict, ProbeResult, family)."""
    import nodes as comfy_nodes  # ComfyUI's own nodes module (it comes first on sys.path)

    family = family_of(model.model.model_config)
    diffusion_model = model.get_model_object("diffusion_model")
    # A joint family's gate is suggested from the cond/uncond distance (tgate/probe.py says why).
    joint = family.text_stream is not None
    recorder = ProbeRecorder(attention_layers(family, diffusion_model, KINDS), distance=joint)
    patched = model.clone()
    if joint and math.isclose(cfg, 1.0):
        # At CFG 1 ComfyUI evaluates the positive alone (its cfg-1 optimisation), which leaves no distance to
        # read: the probe's run evaluates the negative too. CFG 1 still guides to the positive's prediction.
        patched.model_options["disable_cfg1_optimization"] = True
    options = dict(patched.model_options.get("transformer_options", {}))
    if options.pop(CONFIG_KEY, None) is not None:
        log.warning("T-GATE probe: the model has T-GATE applied; the probe samples it with T-GATE off")
        patched.model_options["transformer_options"] = options

    def outer_sample(executor, *args, **kwargs):
        recorder.start_run(kwargs["sigmas"] if "sigmas" in kwargs else args[3])
        return executor(*args, **kwargs)

    def calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
        # The main CFG call passes [positive, negative] (negative None at cfg 1); PAG, SAG, PerpNeg... pass 1 or 3.
        main = len(conds) == 2
        with recorder.evaluation(timestep, main=main):
            out = executor(model, conds, x_in, timestep, model_options)
            if main:  # at cfg 1 the negative is None and its output zeros: no distance
                recorder.record_predictions(out[0], out[1] if conds[1] is not None else None)
            return out

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, calc_cond_batch)
    with recorder.hooks(diffusion_model):
        (latent,) = comfy_nodes.common_ksampler(
            patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise
        )
    return latent, recorder.result(), family


def _numbers(values) -> str:
    return ", ".join("-" if math.isnan(v) else f"{v:.3g}" for v in values)


def summarize(result: ProbeResult, family, marks: Marks, settings: str, cfg: float | None = None) -> str:
    if result.distance_sums is not None:
        return _summarize_joint(result, family, marks, settings, cfg is not None and math.isclose(cfg, 1.0))
    steps = result.num_steps
    cross, self_ = result.layers_of(CROSS), result.layers_of(SELF)
    lines = [
        f"T-GATE probe: {family.name}, {steps} steps ({settings}); {len(cross)} cross- and {len(self_)} self-attention "
        "layers; relative change of each layer's output from one step to the next, first evaluation of each step.",
        f"Cross-attention mean, steps 1-{steps - 1}: {_numbers(result.mean_change(CROSS)[1:])}",
    ]
    if self_:
        lines.append(f"Self-attention mean, steps 1-{steps - 1}: {_numbers(result.mean_change(SELF)[1:])}")
    g = marks.suggested_step
    if g < steps:
        at_gate = [result.mean_change(CROSS, b)[g] for b in (0, 1)]
        lines.append(
            f"Suggested gate: step {g} of {steps}, gate_at {marks.suggested_gate_at:.4g}: the cross-attention mean stays "
            f"below threshold {marks.threshold:g} from step {g} on (there cond {_numbers(at_gate[:1])}, "
            f"uncond {_numbers(at_gate[1:])})."
        )
    else:
        lines.append(
            f"Suggested gate: none (gate_at 1.0): the cross-attention mean does not stay below threshold {marks.threshold:g}."
        )
    lines.append(_official(family, marks))
    return "\n".join(lines)


def _summarize_joint(result: ProbeResult, family, marks: Marks, settings: str, cfg_one: bool) -> str:
    steps = result.num_steps
    distance = result.cond_uncond_distance()
    lines = [
        f"T-GATE probe: {family.name} (joint attention), {steps} steps ({settings}), first evaluation of each step. "
        f"The gate is suggested from the cond/uncond distance ||cond - uncond|| / ||cond|| of the model's predictions; "
        f"the change of the {len(result.layers)} text-stream modules is shown for reference (their modulation follows "
        "the timestep, so it does not settle).",
        f"Cond/uncond distance, steps 0-{steps - 1}: {_numbers(distance)}",
        f"Text-stream mean change, steps 1-{steps - 1}: {_numbers(result.mean_change(CROSS)[1:])}",
    ]
    if cfg_one:
        lines.append(
            "At cfg 1 the probe evaluated the negative as well, for this distance only (cfg 1 still samples the "
            "positive's prediction); the rule and its threshold are the same as with CFG, checked at cfg 1 on the "
            "trained joint model (docs/choosing-the-gate.md)."
        )
    g = marks.suggested_step
    if g < steps:
        lines.append(
            f"Suggested gate: step {g} of {steps}, gate_at {marks.suggested_gate_at:.4g}: the cond/uncond distance stays "
            f"below threshold {marks.threshold:g} from step {g} on (there {_numbers(distance[g : g + 1])})."
        )
    elif all(math.isnan(v) for v in distance):
        lines.append("Suggested gate: none (gate_at 1.0): no uncond branch (cfg 1), so no cond/uncond distance to read.")
    else:
        lines.append(
            f"Suggested gate: none (gate_at 1.0): the cond/uncond distance does not stay below threshold {marks.threshold:g}."
        )
    lines.append(_official(family, marks))
    return "\n".join(lines)


def _official(family, marks: Marks) -> str:
    return f"Official gate for {family.name}: step {marks.official_step} (gate_at {marks.official_gate_at:g})."


def report(result: ProbeResult, family, model, threshold: float, sampler_name: str, scheduler: str, cfg: float):
    """The suggestion (by the family's rule), the summary and the plot of a recorded run: (Marks, text, IMAGE)."""
    percent_to_sigma = model.get_model_object("model_sampling").percent_to_sigma
    if result.distance_sums is not None:
        suggested = suggest_gate_from_distance(result.cond_uncond_distance(), threshold)
    else:
        suggested = suggest_gate_step(result.mean_change(CROSS), threshold)
    official_at = family.official[0]
    marks = Marks(
        title=f"T-GATE probe: {family.name}, {result.num_steps} steps, {sampler_name}/{scheduler}, cfg {cfg:g}",
        threshold=threshold,
        suggested_step=suggested,
        suggested_gate_at=gate_at_for_step(result.sigmas, suggested, percent_to_sigma),
        official_step=gate_step_of(result.sigmas, official_at, percent_to_sigma) if result.num_steps else 0,
        official_gate_at=official_at,
        family=family.name,
    )
    summary = summarize(result, family, marks, f"{sampler_name}, {scheduler}, cfg {cfg:g}", cfg)
    try:
        image = plot_probe(result, marks)
    except ImportError as error:  # matplotlib is in requirements.txt; without it the numbers still come
        image = blank_image(str(error))
        summary += f"\nNo plot: {error}; install matplotlib (pip install -r requirements.txt)."
    return marks, summary, image


class TGateProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TGateProbe",
            display_name="T-GATE probe",
            category="model_patches/unet",
            description=(
                "Samples exactly like KSampler (T-GATE off) and measures, for every cross- and self-attention layer, "
                "how much its output changes from one step to the next, per CFG branch (on a joint-attention model, "
                "its text stream's modules, and the distance between the cond and uncond predictions). Plots it and "
                f"suggests where to gate. {RULE} Serves {supported_families()}."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to probe; cloned, never changed. T-GATE, if applied, is off."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                ValidatedCombo("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS)),
                ValidatedCombo("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS)),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input(
                    "threshold",
                    default=DEFAULT_THRESHOLD,
                    min=0.0,
                    max=10.0,
                    step=0.005,
                    tooltip=(
                        f"{RULE} The default {DEFAULT_THRESHOLD} (5 % change per step; on a joint model, 5 % apart) is a "
                        "heuristic, checked on one small trained model of each kind only (there it gates where "
                        "prompt-following holds; 0.07 gated too early on the cross-attention one): read the plot, and "
                        "compare images gated at the suggestion and earlier."
                    ),
                ),
            ],
            outputs=[
                io.Latent.Output(tooltip="The ungated result, as KSampler gives it: compare it with the gated one."),
                io.Image.Output(
                    tooltip=f"The plot ({WIDTH}x{HEIGHT}): step on x, relative change on a log y axis, one thin curve "
                    "per depth group of layers, the mean in bold, the threshold, the suggested and the official gate; "
                    "on a joint-attention model the cond/uncond distance (with the threshold) beside the text stream's change."
                ),
                io.Float.Output(
                    display_name="suggested_gate_at",
                    tooltip="The suggested gate in ComfyUI's percent convention: connect it to gate_at of T-GATE.",
                ),
                io.String.Output(tooltip="The numbers: mean change per step, the suggested and official gates."),
            ],
        )

    @classmethod
    def execute(
        cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise, threshold
    ) -> io.NodeOutput:
        latent, result, family = record_run(
            model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise
        )
        marks, summary, image = report(result, family, model, threshold, sampler_name, scheduler, cfg)
        log.info("%s", summary)
        return io.NodeOutput(latent, image, marks.suggested_gate_at, summary)
