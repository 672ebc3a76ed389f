"""T-GATE on the transformer families, tested as the SD family is: tiny random-weight models built
from ComfyUI's own model classes, conditioned by each family's own ComfyUI nodes, sampled by
ComfyUI's samplers through both nodes.

Each case is one entry of CASES; every test runs on every case:
gate 1.0 is bit-identical to the unpatched model, no cross-attention compute and one branch after
the gate, the cached output equals the mean of the branches at the capture step, the V2 schedule
holds step by step in the advanced node, a batch of 2 works, and a cancelled run leaves nothing.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from test_reference_v2 import REUSE, self_attention_plan

from tgate_testkit.models import ARCHITECTURES, random_cond
from tgate_testkit.recorders import ModelCalls

STEPS = 12


@dataclass(frozen=True)
class Case:
    model: str  # the ComfyRuntime method that builds the tiny model
    inputs: Callable  # (comfy, batch) -> (positive, negative, latent tensor), as the family's nodes make them
    cfg: float
    cross: str  # module path suffix of cross-attention
    self_attention: str  # of self-attention
    cross_q: str  # the attribute of the query projection, computed only when the module computes
    self_q: str
    seeded: bool = False  # the model draws random numbers while sampling (ACE-Step's lyric encoder dropout)


def _ltxv(image):
    def inputs(comfy, batch):
        positive, negative, latent = comfy.ltxv_conditioning(0, image=image, size=64, length=9, batch=batch)
        return positive, negative, latent["samples"]

    return inputs


def _cosmos(comfy, batch):
    import comfy.sample as comfy_sample

    positive, negative, latent = comfy.cosmos_predict2_conditioning(0, size=64, batch=batch)
    # KSampler adds the frame axis the model's latent format wants to an empty image latent.
    return positive, negative, comfy_sample.fix_empty_latent_channels(comfy.family_model("cosmos_predict2"), latent["samples"])


def _ace(comfy, batch):
    positive, negative = comfy.ace_conditioning(0)
    return positive, negative, torch.zeros(batch, 8, 16, 32)


def _wan(arch, conditioning=None):
    def inputs(comfy, batch):
        if conditioning == "i2v":
            return comfy.wan_i2v_conditioning(0, batch=batch)
        if conditioning == "vace":
            positive, negative = comfy.wan_vace_conditioning(0)
        else:
            positive, negative = random_cond(arch, 1), random_cond(arch, 2)  # UMT5 text, as CLIPTextEncode gives it
        return positive, negative, ARCHITECTURES[arch].empty_latent(batch, 64)

    return inputs


# Two prompts of the same length (11 T5 tokens), so ComfyUI batches the branches in one model call.
PIXART_PROMPT, PIXART_NEGATIVE = "a small house by a lake at dawn", "blurry, low quality, watermark, text"


def _pixart(size=None):
    def inputs(comfy, batch):
        # size: CLIPTextEncodePixArtAlpha with alpha's size micro-condition, on both prompts
        positive, negative = comfy.pixart_conditioning(PIXART_PROMPT, PIXART_NEGATIVE, size=size)
        return positive, negative, torch.zeros(batch, 4, 64, 64)  # 512 px: tiny PixArt needs a latent above 32

    return inputs


CASES = {
    "wan21-t2v": Case("wan", _wan("tiny-wan21-t2v"), 6.0, ".cross_attn", ".self_attn", "q", "q"),
    "wan21-i2v": Case("wan_i2v", _wan("tiny-wan21-i2v", "i2v"), 6.0, ".cross_attn", ".self_attn", "q", "q"),
    "wan22-5b": Case("wan22_5b", _wan("tiny-wan22-5b"), 5.0, ".cross_attn", ".self_attn", "q", "q"),
    # Two controls: each vace block runs twice per model call.
    "wan21-vace": Case("wan_vace", _wan("tiny-wan21-vace", "vace"), 6.0, ".cross_attn", ".self_attn", "q", "q"),
    "ltxv-t2v": Case("ltxv", _ltxv(False), 3.0, ".attn2", ".attn1", "to_q", "to_q"),
    "ltxv-i2v": Case("ltxv", _ltxv(True), 3.0, ".attn2", ".attn1", "to_q", "to_q"),
    "cosmos-predict2": Case("cosmos_predict2", _cosmos, 4.0, ".cross_attn", ".self_attn", "q_proj", "q_proj"),
    "ace-step": Case("ace_step", _ace, 5.0, ".cross_attn", ".attn", "to_q", "to_q", seeded=True),
    "pixart-sigma": Case("pixart", _pixart(), 4.5, ".cross_attn", ".attn", "q_linear", "qkv"),
    "pixart-alpha": Case("pixart_alpha", _pixart(512), 4.5, ".cross_attn", ".attn", "q_linear", "qkv"),
}


@pytest.fixture(params=sorted(CASES))
def case(request, comfy):
    case = CASES[request.param]
    return case, comfy.family_model(case.model)


_INPUTS: dict = {}


def inputs(comfy, case: Case, batch: int):
    """The case's conditioning and latent, made once per batch size (the family's nodes are not free)."""
    key = (case, batch)
    if key not in _INPUTS:
        _INPUTS[key] = case.inputs(comfy, batch)
    return _INPUTS[key]


def calls_of(case: Case, outputs: bool = False) -> ModelCalls:
    """A recorder of the case's model calls, its attention modules and their query projections."""
    return ModelCalls(case.cross, case.self_attention, case.cross_q, case.self_q, outputs=outputs)


def sample(comfy, case, patched, watched, batch=1, outputs=False, **settings):
    positive, negative, latent = inputs(comfy, case[0], batch)
    if case[0].seeded:
        torch.manual_seed(0)
    with calls_of(case[0], outputs).watch(watched) as calls:
        out = comfy.sample(patched, positive, negative, latent=latent, steps=STEPS, cfg=case[0].cfg, **settings)
    return out, calls


def gate_of(calls):
    return calls.column("batch").index(min(calls.column("batch")))


def test_gate_one_is_bit_identical_for_both_nodes(comfy, case):
    model = case[1]
    base, _ = sample(comfy, case, model, model)
    for patched in (comfy.tgate(model, gate_at=1.0), comfy.tgate_advanced(model, gate_at=1.0)):
        out, _ = sample(comfy, case, patched, model)
        assert torch.equal(out, base)


def test_one_branch_and_no_cross_attention_compute_after_the_gate(comfy, case):
    model = case[1]
    _, calls = sample(comfy, case, comfy.tgate(model, fidelity_branch="auto"), model)
    gate = gate_of(calls)
    layers = calls.column("cross_q")[0]
    assert 0 < gate < STEPS and layers > 0
    assert calls.column("batch") == [2] * gate + [1] * (STEPS - gate)
    assert calls.column("cross_q") == [layers] * gate + [0] * (STEPS - gate)


def test_the_cache_is_the_mean_of_the_branches_at_the_capture_step(comfy, case):
    model = case[1]
    _, plain = sample(comfy, case, model, model, outputs=True)
    _, gated = sample(comfy, case, comfy.tgate(model), model, outputs=True)
    gate = gate_of(gated)
    captured = plain.calls[gate - 1]["out"]  # the unpatched run computed the same step before the gate
    assert captured and len(gated.calls) == STEPS
    for call in gated.calls[gate:]:
        assert set(call["out"]) == set(captured)  # every layer replayed, at every step after the gate
        for name, replayed in call["out"].items():
            uncond, cond = captured[name].chunk(2)  # ComfyUI batches uncond first
            torch.testing.assert_close(replayed, ((uncond.float() + cond.float()) / 2).to(uncond.dtype), rtol=0, atol=0)


def test_the_advanced_node_follows_the_v2_schedule_step_by_step(comfy, case):
    model = case[1]
    settings = dict(gate_at=0.75, warm_up=2, sp_interval=3, fi_interval=2)
    out, calls = sample(comfy, case, comfy.tgate_advanced(model, **settings), model)
    gate = gate_of(calls)
    plan = self_attention_plan(STEPS, gate, settings["warm_up"], settings["sp_interval"], settings["fi_interval"])
    layers = calls.column("self_q")[0]
    assert REUSE in plan and torch.isfinite(out).all()
    assert calls.column("self_q") == [0 if action == REUSE else layers for action in plan], plan
    assert calls.column("cross_q") == [layers] * gate + [0] * (STEPS - gate)


def test_a_batch_of_two(comfy, case):
    model = case[1]
    out, calls = sample(comfy, case, comfy.tgate(model), model, batch=2)
    gate = gate_of(calls)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert calls.column("batch") == [4] * gate + [2] * (STEPS - gate)


def test_a_cancelled_run_leaves_nothing_behind(comfy, case):
    import comfy.model_management as mm

    model = case[1]
    patched = comfy.tgate_advanced(model, gate_at=0.75, warm_up=1, sp_interval=2, fi_interval=2)
    kept = []

    def keep_weak(module, args, output):
        kept.append(weakref.ref(output[0] if isinstance(output, tuple) else output))

    def cancel(step, x0, x, total):
        if step == STEPS - 2:
            raise mm.InterruptProcessingException()

    modules = [m for n, m in model.model.diffusion_model.named_modules() if n.endswith((case[0].cross, case[0].self_attention))]
    handles = [m.register_forward_hook(keep_weak) for m in modules]
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(comfy, case, patched, model, callback=cancel)
    finally:
        for h in handles:
            h.remove()
    gc.collect()
    assert kept and all(ref() is None for ref in kept), "a kept attention output outlived its cancelled run"


def test_wan22_two_experts_chained_as_comfyui_template_does(comfy):
    """Wan 2.2 14B samples with two expert models in two runs (KSamplerAdvanced: the high-noise model
    from step 0 with leftover noise, the low-noise model to the end). The gate falls in the first run;
    the second starts past it, captures at its first step (both branches) and runs one branch after."""
    high, low = comfy.wan("tiny-wan21-t2v", seed=0), comfy.wan("tiny-wan21-t2v", seed=1)
    case = CASES["wan21-t2v"]
    positive, negative, latent = case.inputs(comfy, 1)
    advanced = comfy.nodes.KSamplerAdvanced()
    split = STEPS // 2
    with calls_of(case).watch(high) as first_calls:
        first = advanced.sample(
            comfy.tgate(high), "enable", 0, STEPS, case.cfg, "euler", "normal", positive, negative, {"samples": latent}, 0,
            split, "enable",
        )[0]  # fmt: skip
    with calls_of(case).watch(low) as second_calls:
        second = advanced.sample(
            comfy.tgate(low), "disable", 0, STEPS, case.cfg, "euler", "normal", positive, negative, first, split, 10000,
            "disable",
        )[0]  # fmt: skip
    gate = gate_of(first_calls)
    layers = first_calls.column("cross_q")[0]
    assert 0 < gate < split and first_calls.column("batch") == [2] * gate + [1] * (split - gate)
    assert second_calls.column("batch") == [2] + [1] * (STEPS - split - 1)
    assert second_calls.column("cross_q") == [layers] + [0] * (STEPS - split - 1)
    assert torch.isfinite(second["samples"]).all()


def test_pixart_with_an_empty_negative_runs_the_branches_apart_and_still_gates(comfy):
    """ComfyUI's PixArt T5 does not pad: the empty negative is one token against the prompt's eleven,
    too far apart to share a model call, so each step before the gate makes two calls of one image,
    and the capture mixes the outputs of the two calls."""
    case = CASES["pixart-sigma"]
    model = comfy.family_model(case.model)
    positive, negative = comfy.pixart_conditioning(PIXART_PROMPT, "")
    runs = {}
    for label, patched in (("plain", model), ("tgate", comfy.tgate(model))):
        with calls_of(case, outputs=True).watch(model) as calls:
            comfy.sample(patched, positive, negative, latent=torch.zeros(1, 4, 64, 64), steps=STEPS, cfg=case.cfg)
        runs[label] = calls
    gate = 5  # gate_at 0.4 with 12 steps
    layers = runs["plain"].column("cross_q")[0]
    assert runs["plain"].column("batch") == [1] * 2 * STEPS
    assert runs["tgate"].column("batch") == [1] * (2 * gate + STEPS - gate)
    assert runs["tgate"].column("cross_q") == [layers] * 2 * gate + [0] * (STEPS - gate)
    first, second = runs["plain"].calls[2 * gate - 2]["out"], runs["plain"].calls[2 * gate - 1]["out"]
    assert first and set(first) == set(second)
    for call in runs["tgate"].calls[2 * gate :]:
        assert set(call["out"]) == set(first)
        for name, replayed in call["out"].items():
            mean = ((first[name].float() + second[name].float()) / 2).to(replayed.dtype)
            torch.testing.assert_close(replayed, mean, rtol=0, atol=0)


def test_pixart_official_gate_falls_after_15_of_25_steps(comfy):
    """The official PixArt setting, gate step 15 of 25, is gate_at 0.6 with ComfyUI's normal scheduler."""
    import comfy.samplers as samplers

    from tgate import FAMILIES, GateSchedule

    (pixart,) = [f for f in FAMILIES if "PixArtSigma" in f.model_configs]
    model_sampling = comfy.family_model("pixart").get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(model_sampling, "normal", 25).tolist()
    gate_at, reuse = pixart.official
    assert GateSchedule.from_sigmas(sigmas, model_sampling.percent_to_sigma(gate_at)).gate_step == 15
    assert (reuse.warm_up, reuse.sp_interval, reuse.fi_interval) == (2, 3, 1)
