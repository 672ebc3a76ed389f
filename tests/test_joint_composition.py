"""T-GATE on the joint-attention families combined with the add-ons users chain with them: LoRA
weight patches, SkipLayerGuidanceDiT (a DiT block replace patch and an extra evaluation), EasyCache
and LazyCache, the CFG add-ons, TorchCompileModel, and a KSamplerAdvanced split. The tiny models and
the FLOP probe are test_joint_families'.

For each: with the gate past the last step T-GATE changes nothing; with it, after the gate every model
call runs one branch and its text modules compute nothing (once a capture kept something), and the
add-on's effect persists at about its own size.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_joint_families import CASES, STEPS, _flops_per_call, conds, latent, sample

from tgate_testkit.logs import RunLog
from tgate_testkit.models import build_model

_MODELS: dict = {}


def _model(name: str):
    arch = CASES[name].arch
    if arch not in _MODELS:
        _MODELS[arch] = build_model(arch, seed=6)
    return _MODELS[arch]


def _lora(model):
    """Weight patches as LoRA loaders add them (ModelPatcher.add_patches): on the text keys and values'
    projection and on an image-row module of every block."""
    patched = model.clone()
    suffixes = (
        "txt_attn.qkv.weight",
        "img_attn.qkv.weight",
        "linear1.weight",
        "attn.add_k_proj.weight",
        "attn.add_v_proj.weight",
        "attn.to_q.weight",
        "context_block.attn.qkv.weight",
        "x_block.attn.qkv.weight",
        "attn.w1k.weight",
        "attn.w2q.weight",
        "attn.qkv_y.weight",
        "attn.qkv_x.weight",
        "attention.qkv.weight",
        "attn1.to_k_t.weight",
        "attn1.to_v.weight",
    )
    keys = [k for k in patched.model_state_dict() if k.endswith(suffixes)]
    g = torch.Generator().manual_seed(13)
    patched.add_patches({k: (0.3 * torch.randn(patched.get_model_object(k).shape, generator=g),) for k in keys}, 1.0)
    return patched


def _addons():
    from comfy_extras.nodes_apg import APG
    from comfy_extras.nodes_cfg import CFGZeroStar
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from comfy_extras.nodes_model_advanced import RescaleCFG
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    return {
        "LoRA": _lora,
        "SkipLayerGuidanceDiT": lambda m: SkipLayerGuidanceDiT.execute(m, 3.0, 0.0, 1.0, "1", "1").result[0],
        "EasyCache": lambda m: EasyCacheNode.execute(m, 0.2, 0.15, 0.95, False).result[0],
        "LazyCache": lambda m: LazyCacheNode.execute(m, 0.2, 0.15, 0.95, False).result[0],
        "RescaleCFG": lambda m: RescaleCFG().patch(m, 0.7)[0],
        "CFGZeroStar": lambda m: CFGZeroStar.execute(m).result[0],
        "APG": lambda m: APG.execute(m, 1.0, 5.0, 0.5).result[0],
    }


# ||both - T-GATE alone|| / ||add-on alone - plain||: the add-on still acts, at a size within these
# bounds (wide: in tiny random models freezing the text moves the output about as much as the add-on,
# so the two do not add up; the LoRA is checked exactly below). EasyCache and LazyCache pick the steps
# they skip from how much the output changes, which T-GATE changes after the gate.
# RescaleCFG, CFGZeroStar and APG act on the CFG combination, which after the gate is one branch
# (cond = uncond): what is left of them is what they did before the gate.
EFFECT_BOUNDS = {
    # EasyCache skips nothing after the gate (test_easycache_skips_no_step_after_the_gate): what is left is
    # what it skipped before it, none at all in some of these models.
    "EasyCache": (-1.0, 4.0),
    "LazyCache": (0.02, 4.0),
    "RescaleCFG": (0.005, 4.0),
    "CFGZeroStar": (0.005, 4.0),
    "APG": (0.005, 4.0),
}
SKIPS_MODEL_CALLS = {"EasyCache", "LazyCache"}


ADDONS = ("LoRA", "SkipLayerGuidanceDiT", "EasyCache", "LazyCache", "RescaleCFG", "CFGZeroStar", "APG")


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("addon", ADDONS)
def test_each_addon_composes(comfy, addon, family):
    case, model = CASES[family], _model(family)
    apply = _addons()[addon]
    positive, negative = conds(case)
    plain = sample(comfy, model, case, positive, negative)
    addon_alone = sample(comfy, apply(model), case, positive, negative)
    tgate_alone = sample(comfy, comfy.tgate(model, fidelity_branch="auto"), case, positive, negative)
    with RunLog().on() as log:
        calls = _flops_per_call(comfy, apply(comfy.tgate(model, fidelity_branch="auto")), model, case, positive, negative)
    (run,) = log.runs
    assert run["single_branch_evaluations"] > 0
    # After the gate (and its capture), the text-only modules compute nothing in any model call.
    text_only = [n for n in calls[0] if n.endswith(case.text_only)]
    silent = [i for i, call in enumerate(calls) if all(call.get(n, 0) == 0 for n in text_only)]
    assert text_only and silent, "no model call ran on the frozen text"
    assert all(all(call.get(n, 0) == 0 for n in text_only) for call in calls[silent[0] :])
    if addon not in SKIPS_MODEL_CALLS and addon != "SkipLayerGuidanceDiT":
        assert silent[0] == run["gate_step"]  # one model call per step: the first after the gate is silent
    both = sample(comfy, apply(comfy.tgate(model, fidelity_branch="auto")), case, positive, negative)
    assert torch.isfinite(both).all()
    if not torch.equal(addon_alone, plain):
        effect = (both - tgate_alone).norm() / (addon_alone - plain).norm()
        low, high = EFFECT_BOUNDS.get(addon, (0.25, 4.0))
        assert low < effect < high, f"{addon}: effect ratio {effect:.3f}"
    assert torch.equal(sample(comfy, apply(comfy.tgate(model, gate_at=1.0)), case, positive, negative), addon_alone)


def test_easycache_skips_no_step_after_the_gate_and_the_run_says_why(comfy):
    """EasyCache decides its skips in the calls of the first cond ComfyUI batches, the negative, which
    T-GATE stops running at the gate: EasyCache then skips nothing more. On this model EasyCache alone
    skips steps past the gate; under T-GATE it reports none skipped, and T-GATE warns, naming LazyCache."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    case, model = CASES["lumina2"], _model("lumina2")
    positive, negative = conds(case)
    reports = RunLog()
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(reports)
    root.setLevel(logging.INFO)  # EasyCache reports its skips at INFO on the root logger
    try:
        sample(comfy, EasyCacheNode.execute(model, 0.2, 0.15, 0.95, False).result[0], case, positive, negative)
        alone = [m for m in reports.messages() if m.startswith("EasyCache - skipped")]
        reports.records.clear()
        with RunLog().on() as log:
            patched = EasyCacheNode.execute(comfy.tgate(model, fidelity_branch="auto"), 0.2, 0.15, 0.95, False).result[0]
            sample(comfy, patched, case, positive, negative)
        together = [m for m in reports.messages() if m.startswith("EasyCache - skipped")]
    finally:
        root.removeHandler(reports)
        root.setLevel(level)
    assert alone and not alone[0].startswith("EasyCache - skipped 0/"), alone
    assert together and together[0].startswith("EasyCache - skipped 0/"), together
    assert any("EasyCache skips no step after it" in m and "LazyCache" in m for m in log.messages(logging.WARNING))
    # At cfg 1 no negative runs: EasyCache follows the positive, and nothing is said.
    with RunLog().on() as log:
        sample(comfy, patched, case, positive, negative, cfg=1.0)
    assert not any("EasyCache" in m for m in log.messages())


@pytest.mark.parametrize("family", sorted(CASES))
def test_a_lora_on_the_text_modules_reaches_the_kept_rows(comfy, family):
    """The LoRA'd model under T-GATE is the reference rule on a model with the LoRA merged in."""
    from test_joint_families import reference

    case, model = CASES[family], _model(family)
    lora = _lora(model)
    merged = build_model(case.arch, seed=6)
    state = merged.model.diffusion_model.state_dict()
    with torch.no_grad():
        for key, patches in lora.patches.items():
            state[key.removeprefix("diffusion_model.")] += patches[0][1][0]
    positive, negative = conds(case)
    expected, _ = reference(merged, case, positive, negative, 0.4, "cond")
    got = sample(comfy, comfy.tgate(lora, fidelity_branch="auto"), case, positive, negative)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    unpatched, _ = reference(model, case, positive, negative, 0.4, "cond")
    assert (unpatched - expected).abs().max() > 1e-2  # the LoRA makes a difference the check sees


def test_a_flux_post_input_patch_that_adds_text_tokens_is_frozen_with_them(comfy):
    """PuLID-style packs change Flux's streams after its input layers (a `post_input` patch): here two
    more text tokens. The text rows are counted where the text modules see them, so the added tokens
    are frozen with the rest."""
    from dataclasses import replace

    from test_joint_families import reference

    case, model = CASES["flux"], _model("flux")
    extra = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(3))

    def add_tokens(streams):
        txt, ids = streams["txt"], streams["txt_ids"]
        more = torch.cat((txt, extra.to(txt).expand(txt.shape[0], -1, -1)), 1)
        return {**streams, "txt": more, "txt_ids": torch.cat((ids, ids[:, :2]), 1)}

    patched = comfy.tgate(model, fidelity_branch="auto")
    patched.set_model_post_input_patch(add_tokens)
    positive, negative = conds(case)
    options = {"patches": {"post_input": [add_tokens]}}
    expected, _ = reference(model, replace(case, text_extra=2), positive, negative, 0.4, "cond", transformer_options=options)
    torch.testing.assert_close(sample(comfy, patched, case, positive, negative), expected, rtol=1e-4, atol=1e-4)


def test_a_flux_controlnet_keeps_acting_on_the_branch_that_runs(comfy):
    """A Flux ControlNet (XLabs-style, a model of ComfyUI's ControlNetFlux class) recomputes its own
    text stream every step and adds residuals to the image rows only: T-GATE leaves it alone, and its
    effect persists after the gate on the branch that runs."""
    import comfy.controlnet as controlnet
    import comfy.ldm.flux.controlnet as flux_controlnet
    import comfy.model_management as mm
    import comfy.ops as ops

    from tgate_testkit.models import ARCHITECTURES, randomize

    case, model = CASES["flux"], _model("flux")
    unet = {k: v for k, v in ARCHITECTURES[case.arch].unet.items() if k != "image_model"}
    control_model = flux_controlnet.ControlNetFlux(operations=ops.disable_weight_init, **unet)
    randomize(control_model, 21)
    control = controlnet.ControlNet(control_model, load_device=mm.get_torch_device(), extra_conds=["y", "guidance"])
    image = torch.rand(1, case.size, case.size, 3, generator=torch.Generator().manual_seed(2))
    positive, negative = conds(case)
    with_control = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, image, 1.0, 0.0, 1.0)
    plain = sample(comfy, model, case, positive, negative)
    control_alone = sample(comfy, model, case, *with_control)
    gated = comfy.tgate(model, fidelity_branch="auto")
    with RunLog().on() as log:
        both = sample(comfy, gated, case, *with_control)
    assert log.runs[0]["single_branch_evaluations"] > 0 and torch.isfinite(both).all()
    tgate_alone = sample(comfy, gated, case, positive, negative)
    effect = (both - tgate_alone).norm() / (control_alone - plain).norm()
    assert 0.25 < effect < 4.0, f"effect ratio {effect:.3f}"
    assert torch.equal(sample(comfy, comfy.tgate(model, gate_at=1.0), case, *with_control), control_alone)


def test_a_ksampler_advanced_split_gates_in_the_first_run_and_captures_again_in_the_second(comfy):
    """Two KSamplerAdvanced runs over one schedule (steps 0-5 with leftover noise, then 5-10): the gate
    falls in the first; the second starts past it, captures at its first step and runs one branch."""
    case, model = CASES["chroma"], _model("chroma")
    positive, negative = conds(case)
    advanced = comfy.nodes.KSamplerAdvanced()
    split = STEPS // 2
    empty = {"samples": latent(case)}
    with RunLog().on() as log:
        first = advanced.sample(
            comfy.tgate(model, fidelity_branch="auto"), "enable", 0, STEPS, 4.0, "euler", "normal", positive, negative,
            empty, 0, split, "enable",
        )[0]  # fmt: skip
        second = advanced.sample(
            comfy.tgate(model, fidelity_branch="auto"), "disable", 0, STEPS, 4.0, "euler", "normal", positive, negative,
            first, split, 10000, "disable",
        )[0]  # fmt: skip
    one, two = log.runs
    assert 0 < one["gate_step"] < split and one["single_branch_evaluations"] == split - one["gate_step"]
    assert two["single_branch_evaluations"] == STEPS - split - 1  # its first step captured with both branches
    assert torch.isfinite(second["samples"]).all()


def test_torch_compile_model_matches_the_uncompiled_run(comfy):
    """TorchCompileModel compiles the whole diffusion model; T-GATE's decisions stay outside it."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    case, model = CASES["flux"], _model("flux")
    positive, negative = conds(case)
    eager = sample(comfy, comfy.tgate(model, fidelity_branch="auto"), case, positive, negative)
    compiled_model = TorchCompileModel.execute(comfy.tgate(model, fidelity_branch="auto"), "inductor").result[0]
    torch._dynamo.reset()
    compiled = sample(comfy, compiled_model, case, positive, negative)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
