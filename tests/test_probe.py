"""The T-GATE probe node on every family: it runs, its plot has the promised size, its numbers match a
recomputation with plain forward hooks on the same run, its suggestion fed to T-GATE gates at the
suggested step, it counts the first evaluation of each step, and it reads nothing back while sampling.
On the joint-attention families its cond/uncond distance matches the predictions a model function
wrapper sees on the same run, and the gate is suggested from it."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import PACK_ROOT
from test_joint_families import CASES as JOINT_CASES
from test_joint_families import conds as joint_conds
from test_joint_families import latent as joint_latent
from test_transformer_families import CASES, inputs

from tgate.probe import gate_at_for_step, gate_step_of, suggest_gate_from_distance, suggest_gate_step
from tgate_testkit.models import build_model
from tgate_testkit.recorders import ModelCalls, SyncCounter

STEPS = 12
WIDTH, HEIGHT = 1024, 640  # the plot's promised size


@dataclass(frozen=True)
class ProbeCase:
    model: str  # ComfyRuntime builder
    inputs: Callable  # comfy -> (positive, negative, latent tensor)
    cfg: float
    suffixes: tuple[str, str]  # module path suffixes of cross- and self-attention
    seeded: bool = False


def _family_case(name):
    case = CASES[name]
    return ProbeCase(case.model, lambda comfy: inputs(comfy, case, 1), case.cfg, (case.cross, case.self_attention), case.seeded)


def _sd(pooled):
    return lambda comfy: (comfy.cond(1, pooled=pooled), comfy.cond(2, pooled=pooled), torch.zeros(1, 4, 16, 16))


PROBE_CASES = {
    "sd15": ProbeCase("sd15", _sd(False), 7.0, (".attn2", ".attn1")),
    "sdxl": ProbeCase("sdxl", _sd(True), 7.0, (".attn2", ".attn1")),
    "svd": ProbeCase("svd", lambda comfy: comfy.svd_conditioning(0, size=8), 2.5, (".attn2", ".attn1")),
    **{
        name: _family_case(name)
        for name in ("pixart-sigma", "wan21-t2v", "wan21-vace", "ltxv-t2v", "cosmos-predict2", "ace-step")
    },
}


def probe_node(comfy):
    return comfy.nodes.NODE_CLASS_MAPPINGS["TGateProbe"]


def probe_module(comfy):
    return sys.modules[probe_node(comfy).__module__]


class PlainHooks:
    """Every attention output of every model call, with the call's chunk layout: plain forward hooks."""

    def __init__(self, model, suffixes):
        self.model, self.suffixes = model.model.diffusion_model, suffixes
        self.calls: list[dict] = []

    def __enter__(self):
        self.handles = [self.model.register_forward_pre_hook(self._call, with_kwargs=True)]
        for name, module in self.model.named_modules():
            if name.endswith(self.suffixes):
                self.handles.append(module.register_forward_hook(self._output(name)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _call(self, module, args, kwargs):
        options = kwargs["transformer_options"]
        sigma = options["sigmas"].detach().reshape(-1)[:1].clone()  # read back after the run
        self.calls.append({"layout": list(options["cond_or_uncond"]), "sigma": sigma, "out": {}})

    def _output(self, name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.calls[-1]["out"].setdefault(name, []).append(out.detach().double().clone())

        return hook

    def relative_change(self, calls, name, branch):
        """Per step t >= 1: sqrt(sum ||o_t - o_(t-1)||^2 / sum ||o_(t-1)||^2) over the layer's occurrences."""
        values = [math.nan]
        for before, now in zip(calls[:-1], calls[1:], strict=True):
            num = den = 0.0
            for a, b in zip(before["out"][name], now["out"][name], strict=True):
                a, b = (
                    a.chunk(len(before["layout"]))[before["layout"].index(branch)],
                    b.chunk(len(now["layout"]))[now["layout"].index(branch)],
                )
                num += float((b - a).square().sum())
                den += float(a.square().sum())
            values.append(math.sqrt(num / den))
        return values


def run_probe(comfy, monkeypatch, case: ProbeCase, model, sampler="euler", threshold=0.05, watch=True):
    """Run the node with plain hooks watching; returns (node outputs, the ProbeResult it plotted, hooks)."""
    positive, negative, latent = case.inputs(comfy)
    module = probe_module(comfy)
    seen = {}

    def plot(result, marks):
        seen["result"], seen["marks"] = result, marks
        return plot_probe(result, marks)

    plot_probe = module.plot_probe
    monkeypatch.setattr(module, "plot_probe", plot)
    if case.seeded:
        torch.manual_seed(0)
    hooks = PlainHooks(model, case.suffixes)
    with hooks if watch else _nothing():
        out = probe_node(comfy).execute(
            model, 0, STEPS, case.cfg, sampler, "normal", positive, negative, {"samples": latent}, 1.0, threshold
        )
    return out.result, seen["result"], seen["marks"], hooks


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(params=sorted(PROBE_CASES))
def probe_case(request, comfy):
    case = PROBE_CASES[request.param]
    return case, comfy.family_model(case.model)


def test_the_probe_runs_plots_and_matches_plain_hooks(comfy, monkeypatch, probe_case):
    case, model = probe_case
    (latent, image, gate_at, summary), result, marks, hooks = run_probe(comfy, monkeypatch, case, model)
    # The plot: the promised size, a real image (not blank), and the numbers in the summary.
    assert image.shape == (1, HEIGHT, WIDTH, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    assert "Suggested gate" in summary and "Official gate" in summary and torch.isfinite(latent["samples"]).all()
    # Every attention layer was recorded, both kinds, each by the family table.
    assert set(result.layers) == {name for call in hooks.calls for name in call["out"]}
    assert {"cross_attention", "self_attention"} == set(result.kinds)
    # euler: one evaluation per step, both branches batched in one call.
    assert len(hooks.calls) == STEPS and all(sorted(c["layout"]) == [0, 1] for c in hooks.calls)
    change = result.relative_change()
    assert change.shape == (STEPS, len(result.layers), 2) and change[0].isnan().all()
    for index, name in enumerate(result.layers):
        for branch in (0, 1):
            expected = hooks.relative_change(hooks.calls, name, branch)
            expected = torch.tensor(expected, dtype=change.dtype)
            torch.testing.assert_close(change[:, index, branch], expected, rtol=2e-4, atol=1e-7, equal_nan=True)
    # The suggestion: the rule applied to the recomputed means, converted with the model's sigmas.
    percent_to_sigma = model.get_model_object("model_sampling").percent_to_sigma
    cross = [i for i, k in enumerate(result.kinds) if k == "cross_attention"]
    means = [math.nan] + [float(change[t, cross].mean()) for t in range(1, STEPS)]
    assert marks.suggested_step == suggest_gate_step(means, 0.05)
    assert gate_at == marks.suggested_gate_at and 0.0 <= gate_at <= 1.0
    if marks.suggested_step < STEPS:
        assert gate_step_of(result.sigmas, gate_at, percent_to_sigma) == marks.suggested_step


def test_the_suggested_gate_at_makes_tgate_gate_at_the_suggested_step(comfy, monkeypatch):
    case = PROBE_CASES["sd15"]
    model = comfy.family_model("sd15")
    (latent, _, gate_at, _), result, marks, _ = run_probe(comfy, monkeypatch, case, model, watch=False)
    assert 1 < marks.suggested_step < STEPS - 1, "the default threshold should fall mid-run on the tiny model"
    positive, negative, noise_latent = case.inputs(comfy)
    # The probe's LATENT is KSampler's, bit for bit (T-GATE off, hooks only read).
    plain = comfy.ksampler(model, positive, negative, latent={"samples": noise_latent}, steps=STEPS, cfg=case.cfg)
    assert torch.equal(latent["samples"], plain)
    with ModelCalls().watch(model) as calls:
        comfy.ksampler(comfy.tgate(model, gate_at=gate_at), positive, negative, steps=STEPS, cfg=case.cfg)
    assert calls.batch_sizes == [2] * marks.suggested_step + [1] * (STEPS - marks.suggested_step)


@pytest.mark.parametrize("builder", ["sd15", "wan", "cosmos_predict2", "pixart"])
@pytest.mark.parametrize("scheduler", ["normal", "karras", "simple", "beta"])
def test_gate_at_for_every_step_gates_there(comfy, builder, scheduler):
    """Each family's own model_sampling (discrete eps/v, flow with shift, EDM), every step of the run, and a
    cut schedule (denoise 0.6): the converted gate_at puts T-GATE's gate at that step."""
    import comfy.samplers as samplers

    model_sampling = comfy.family_model(builder).get_model_object("model_sampling")
    full = samplers.calculate_sigmas(model_sampling, scheduler, STEPS)
    cut = samplers.calculate_sigmas(model_sampling, scheduler, 20)[-(STEPS + 1) :]  # as denoise 0.6 cuts it
    for sigmas in (full.tolist(), cut.tolist()):
        for step in range(1, STEPS):
            gate_at = gate_at_for_step(sigmas, step, model_sampling.percent_to_sigma)
            assert gate_step_of(sigmas, gate_at, model_sampling.percent_to_sigma) == step, (step, gate_at)
        assert gate_at_for_step(sigmas, STEPS, model_sampling.percent_to_sigma) == 1.0


def test_the_rule():
    nan = math.nan
    assert suggest_gate_step([nan, 0.5, 0.2, 0.04, 0.03, 0.01], 0.05) == 3
    assert suggest_gate_step([nan, 0.5, 0.04, 0.06, 0.03, 0.01], 0.05) == 4  # must STAY below
    assert suggest_gate_step([nan, 0.5, 0.2, 0.1, 0.07, 0.06], 0.05) == 6  # never: do not gate
    assert suggest_gate_step([nan, 0.01, 0.01], 0.05) == 1  # never before the first step
    assert suggest_gate_step([nan], 0.05) == 1
    # The last step is left out (normal's last step jumps in every layer); the one before it is not.
    assert suggest_gate_step([nan, 0.5, 0.04, 0.03, 0.2], 0.05) == 2
    assert suggest_gate_step([nan, 0.5, 0.04, 0.2, 0.01], 0.05) == 5


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_a_multi_evaluation_sampler_counts_the_first_evaluation_of_each_step(comfy, monkeypatch, sampler):
    """Each evaluation belongs to the step T-GATE maps it to (the last step whose sigma is at or above its
    sigma); the first of each step is recorded. heun's correction at the next step's sigma is that step's
    first; dpm_2's midpoint evaluation is its own step's second."""
    from tgate import GateSchedule

    case = PROBE_CASES["sd15"]
    model = comfy.family_model("sd15")
    _, result, _, hooks = run_probe(comfy, monkeypatch, case, model, sampler=sampler)
    assert len(hooks.calls) == 2 * STEPS - 1
    schedule = GateSchedule.from_sigmas(result.sigmas, 0.0)
    steps = [schedule.step_of(float(c["sigma"])) for c in hooks.calls]
    first = [hooks.calls[steps.index(t)] for t in range(STEPS)]
    if sampler == "heun":
        assert first == [hooks.calls[0]] + hooks.calls[1::2]
    else:
        assert first == hooks.calls[::2]
    change = result.relative_change()
    for index, name in enumerate(result.layers):
        for branch in (0, 1):
            expected = torch.tensor(hooks.relative_change(first, name, branch), dtype=change.dtype)
            torch.testing.assert_close(change[:, index, branch], expected, rtol=2e-4, atol=1e-7, equal_nan=True)


def test_no_host_sync_while_sampling(comfy):
    """The probe's sampling makes no more host-device syncs than KSampler's, bar the one read-back at the end
    (the sigmas and the sums): none per layer, step or evaluation."""
    case = PROBE_CASES["sd15"]
    model = comfy.family_model("sd15")
    positive, negative, latent = case.inputs(comfy)
    args = (0, STEPS, case.cfg, "euler", "normal", positive, negative, {"samples": latent}, 1.0)
    counts = []
    for run in (comfy.nodes.common_ksampler, probe_module(comfy).record_run):
        counter = SyncCounter()
        with counter.around_attention(model, ("attn1", "attn2")):
            run(model, *args)
        counts.append((counter.total, counter.in_attention))
    (plain, _), (probe, in_attention) = counts
    assert in_attention == 0 and probe - plain <= 3, counts


def test_a_cfg_one_run_records_the_cond_branch_only(comfy, monkeypatch):
    case = PROBE_CASES["sd15"]
    model = comfy.family_model("sd15")
    one = ProbeCase(case.model, case.inputs, 1.0, case.suffixes)
    (_, image, gate_at, summary), result, _, hooks = run_probe(comfy, monkeypatch, one, model)
    change = result.relative_change()
    assert all(c["layout"] == [0] for c in hooks.calls)
    assert not change[1:, :, 0].isnan().any() and change[:, :, 1].isnan().all()
    assert image.shape == (1, HEIGHT, WIDTH, 3) and 0.0 <= gate_at <= 1.0


def test_the_schema(comfy):
    schema = probe_node(comfy).GET_SCHEMA()
    inputs = [i.id for i in schema.inputs]
    assert inputs == [
        "model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image", "denoise",
        "threshold",
    ]  # fmt: skip
    assert [o.get_io_type() for o in schema.outputs] == ["LATENT", "IMAGE", "FLOAT", "STRING"]
    assert schema.display_name == "T-GATE probe" and schema.category == comfy.TGate.GET_SCHEMA().category
    threshold = next(i for i in schema.inputs if i.id == "threshold")
    assert "heuristic" in threshold.tooltip and "stays below" in threshold.tooltip


def test_the_distance_rule():
    """A joint family's rule: the first step from which the cond/uncond distance stays below the threshold,
    the last step included (the distance has no end jump); never step 0; NaN (cfg 1) never gates."""
    nan = math.nan
    assert suggest_gate_from_distance([0.5, 0.2, 0.04, 0.03, 0.01], 0.05) == 2
    assert suggest_gate_from_distance([0.5, 0.04, 0.06, 0.03, 0.01], 0.05) == 3  # must STAY below
    assert suggest_gate_from_distance([0.5, 0.2, 0.04, 0.03, 0.06], 0.05) == 5  # the last step counts: do not gate
    assert suggest_gate_from_distance([0.5, 0.2, 0.1, 0.07, 0.06], 0.05) == 5  # never: do not gate
    assert suggest_gate_from_distance([0.01, 0.01, 0.01], 0.05) == 1  # never before the first step
    assert suggest_gate_from_distance([nan, nan, nan], 0.05) == 3  # cfg 1: no distance, do not gate
    assert suggest_gate_from_distance([0.5], 0.05) == 1 and suggest_gate_from_distance([], 0.05) == 0


def test_the_joint_threshold_is_the_one_chosen_on_the_trained_joint_model(comfy):
    """JOINT_THRESHOLD on the study's recorded distances (docs/joint/results.json) suggests the step that
    tgate_bench.joint_probe measured (docs/joint/probe.json), at or before the default gate's step, where
    the positive's text frozen kept prompt-following within the study's margin of the baseline."""
    from tgate_bench.joint_study import HOLDS

    threshold = probe_module(comfy).JOINT_THRESHOLD
    # One `threshold` input serves both rules: its default must be the joint threshold too.
    default = next(i for i in probe_node(comfy).GET_SCHEMA().inputs if i.id == "threshold").default
    assert default == threshold
    study = json.loads((PACK_ROOT / "docs" / "joint" / "results.json").read_text())
    measured = json.loads((PACK_ROOT / "docs" / "joint" / "probe.json").read_text())
    step = suggest_gate_from_distance(study["cond_uncond_distance"], threshold)
    row = measured["thresholds"][str(threshold)]
    assert step == row["step"] <= study["results"]["frozen_cond_0.4"]["gate_step"]
    assert row["accuracy"] >= measured["baseline_accuracy"] - HOLDS and row["holds"]
    assert measured["largest_relative_difference_from_results_json"] < 1e-4  # the probe's distance is the study's


class Predictions:
    """A model function wrapper (ComfyUI's unet wrapper, below the CFG function the probe wraps): the
    denoised prediction of every model call and the call's chunk layout."""

    def __init__(self):
        self.calls: list[tuple[list[int], torch.Tensor]] = []

    def wrapper(self):
        """The wrapper function: a closure, since ComfyUI deep-copies the model options (a wrapper object
        would record into its copy)."""
        calls = self.calls

        def wrapper(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            calls.append((list(args["cond_or_uncond"]), out.detach().double().clone()))
            return out

        return wrapper

    def distance(self) -> list[float]:
        """Per call: ||cond - uncond|| / ||cond|| per sample, averaged over the batch."""
        values = []
        for layout, out in self.calls:
            chunks = out.chunk(len(layout))
            cond, uncond = (chunks[layout.index(b)].flatten(1) for b in (0, 1))
            values.append(float(((cond - uncond).norm(dim=1) / cond.norm(dim=1)).mean()))
        return values


_JOINT_MODELS: dict = {}


@pytest.mark.parametrize("name", sorted(JOINT_CASES))
def test_the_probe_on_a_joint_family_reports_the_cond_uncond_distance(comfy, monkeypatch, name):
    joint = JOINT_CASES[name]
    if joint.arch not in _JOINT_MODELS:
        _JOINT_MODELS[joint.arch] = build_model(joint.arch, seed=4)
    model = _JOINT_MODELS[joint.arch].clone()
    predictions = Predictions()
    model.set_model_unet_function_wrapper(predictions.wrapper())
    positive, negative = joint_conds(joint)
    case = ProbeCase(joint.arch, lambda comfy: (positive, negative, joint_latent(joint)), 4.0, (*joint.text_only, *joint.joined))
    (latent, image, gate_at, summary), result, marks, hooks = run_probe(comfy, monkeypatch, case, model)
    assert image.shape == (1, HEIGHT, WIDTH, 3) and float(image.std()) > 0.05 and torch.isfinite(latent["samples"]).all()
    assert "cond/uncond distance" in summary and "Text-stream mean change" in summary and "Official gate" in summary
    # euler: one evaluation per step, both branches in one call; the distance is the wrapper's.
    assert len(predictions.calls) == STEPS and all(sorted(layout) == [0, 1] for layout, _ in predictions.calls)
    expected = predictions.distance()
    assert all(0.0 < v < math.inf for v in expected)
    torch.testing.assert_close(torch.tensor(result.cond_uncond_distance()), torch.tensor(expected), rtol=1e-4, atol=1e-7)
    # The text stream is recorded as before: every module of it, the cross kind, as plain hooks see it.
    assert set(result.layers) == {n for call in hooks.calls for n in call["out"]} and set(result.kinds) == {"cross_attention"}
    change = result.relative_change()
    for index, layer in enumerate(result.layers):
        for branch in (0, 1):
            recomputed = torch.tensor(hooks.relative_change(hooks.calls, layer, branch), dtype=change.dtype)
            torch.testing.assert_close(change[:, index, branch], recomputed, rtol=2e-4, atol=1e-7, equal_nan=True)
    # The suggestion: the distance rule on the wrapper's distances, converted with the model's sigmas.
    assert marks.suggested_step == suggest_gate_from_distance(expected, 0.05)
    assert gate_at == marks.suggested_gate_at
    if marks.suggested_step < STEPS:
        percent_to_sigma = model.get_model_object("model_sampling").percent_to_sigma
        assert gate_step_of(result.sigmas, gate_at, percent_to_sigma) == marks.suggested_step


def test_the_probe_on_a_joint_family_at_cfg_one_reads_the_distance_with_the_negative_evaluated(comfy, monkeypatch):
    """At cfg 1 (Flux dev, schnell) ComfyUI evaluates the positive alone; the probe's run evaluates the
    negative too, for the distance only: the distance is the wrapper's, the suggestion follows the same
    rule, the summary says so, and the sampled latent is cfg 1's (the positive's prediction)."""
    import comfy.sample as comfy_sample

    joint = JOINT_CASES["flux"]
    positive, negative = joint_conds(joint)
    model = build_model(joint.arch, seed=4)
    predictions = Predictions()
    watched = model.clone()
    watched.set_model_unet_function_wrapper(predictions.wrapper())
    case = ProbeCase(joint.arch, lambda comfy: (positive, negative, joint_latent(joint)), 1.0, ())
    (latent, image, gate_at, summary), result, marks, _ = run_probe(comfy, monkeypatch, case, watched)
    assert len(predictions.calls) == STEPS and all(sorted(layout) == [0, 1] for layout, _ in predictions.calls)
    expected = predictions.distance()
    assert all(0.0 < v < math.inf for v in expected)
    torch.testing.assert_close(torch.tensor(result.cond_uncond_distance()), torch.tensor(expected), rtol=1e-4, atol=1e-7)
    assert marks.suggested_step == suggest_gate_from_distance(expected, 0.05)
    assert gate_at == marks.suggested_gate_at
    assert "At cfg 1 the probe evaluated the negative as well" in summary
    assert image.shape == (1, HEIGHT, WIDTH, 3)
    # What KSampler gives at cfg 1, where the negative is never evaluated.
    noise = comfy_sample.prepare_noise(joint_latent(joint), 0)
    plain = comfy_sample.sample(model, noise, STEPS, 1.0, "euler", "normal", positive, negative, joint_latent(joint), seed=0)
    torch.testing.assert_close(latent["samples"], plain, rtol=1e-5, atol=1e-5)
    # At cfg > 1 nothing is said about it.
    case = ProbeCase(joint.arch, lambda comfy: (positive, negative, joint_latent(joint)), 4.0, ())
    assert "At cfg 1" not in run_probe(comfy, monkeypatch, case, model)[0][3]


def test_no_host_sync_while_probing_a_joint_family(comfy):
    """The distance, like the sums, is accumulated on the device: no sync in the text stream, and none
    beyond KSampler's but the read-back at the end."""
    joint = JOINT_CASES["flux"]
    model = build_model(joint.arch, seed=4)
    positive, negative = joint_conds(joint)
    args = (0, STEPS, 4.0, "euler", "normal", positive, negative, {"samples": joint_latent(joint)}, 1.0)
    counts = []
    for run in (comfy.nodes.common_ksampler, probe_module(comfy).record_run):
        counter = SyncCounter()
        with counter.around_attention(model, (*joint.text_only, *joint.joined)):
            run(model, *args)
        counts.append((counter.total, counter.in_attention))
    (plain, _), (probe, in_attention) = counts
    assert in_attention == 0 and probe - plain <= 4, counts
