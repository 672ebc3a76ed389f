"""The joint-attention study's model and instruments (issue #20; tgate_testkit.trained_joint,
tgate_bench.joint_study): a Flux-shaped model of ComfyUI's own classes that trains, and hooks that
freeze its text stream and a wrapper that runs one branch, doing what the study's table says they do."""

from __future__ import annotations

import pytest
import torch

from tgate_bench import joint_study
from tgate_testkit import trained, trained_joint

PROMPTS = list(trained.PROMPTS[:6])


@pytest.fixture(scope="module")
def fresh(comfy):
    torch.manual_seed(0)
    return trained_joint.build(None)


@pytest.fixture(scope="module")
def shapes(comfy):
    return trained_joint.build()


def test_the_model_is_comfyuis_flux_sampled_as_rectified_flow(comfy, fresh):
    import comfy.ldm.flux.model as flux
    import comfy.model_base as model_base

    net = fresh.model.diffusion_model
    assert type(net) is flux.Flux
    assert (len(net.double_blocks), len(net.single_blocks)) == (trained_joint.DOUBLE_BLOCKS, trained_joint.SINGLE_BLOCKS)
    assert fresh.model.model_type == model_base.ModelType.FLOW
    assert fresh.model.latent_format.latent_channels == trained.CHANNELS


def test_training_steps_through_the_blocks_in_place_adds(comfy, shapes):
    """Flux's blocks add to their inputs in place; the training wrapper makes autograd accept that
    without changing a value: the same forward, and a backward pass that reaches every block (on the
    trained weights: at initialisation the zeroed final layer passes no gradient back)."""
    net = shapes.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x0, prompts = trained.batch(4, g)
    context, s = trained.encode(prompts), torch.full((4,), 0.5)
    with torch.no_grad():
        plain = net(x0, s, context=context)
        wrapped = net(x0, s, context=context, transformer_options=trained_joint.TRAINING_OPTIONS)
    assert torch.equal(plain, wrapped)
    with pytest.raises(RuntimeError, match="inplace"):
        (net(x0, s, context=context) - x0).square().mean().backward()
    net.zero_grad(set_to_none=True)
    trained_joint.objective(shapes.model.model_sampling)(net, x0, context, g).backward()
    for name in ("double_blocks.0.txt_attn.qkv.weight", "single_blocks.1.linear1.weight", "final_layer.linear.weight"):
        assert net.get_parameter(name).grad is not None and net.get_parameter(name).grad.abs().sum() > 0, name
    net.zero_grad(set_to_none=True)


def test_a_frozen_text_stream_makes_the_image_rows_independent_of_the_text(comfy, shapes):
    net = shapes.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    x, s = torch.randn(2, trained.CHANNELS, trained.SIDE, trained.SIDE, generator=g), torch.full((2,), 0.6)
    red, blue = trained.encode([("red", "square", "left")] * 2), trained.encode([("blue", "circle", "top")] * 2)
    stream = joint_study.TextStream(net, trained.TOKENS)
    try:
        with torch.no_grad():
            stream.mode, stream.branches = "keep", [joint_study.COND, joint_study.UNCOND]
            kept = net(x, s, context=red)  # one sample per branch, both red
            stream.mode, stream.branches, stream.kept_from = "frozen", [joint_study.COND], "cond"
            frozen_blue = net(x[:1], s[:1], context=blue[:1])
            stream.mode = "live"
            live_blue = net(x[:1], s[:1], context=blue[:1])
    finally:
        stream.remove()
    assert set(stream.kept) == {f"double_blocks.{i}" for i in range(2)} | {f"single_blocks.{i}" for i in range(2)}
    torch.testing.assert_close(frozen_blue, kept[:1], rtol=1e-5, atol=1e-5)  # the blue text is never read
    assert (live_blue - kept[:1]).abs().max() > 1e-2  # while live, it is


def test_one_branch_at_cfg_1_is_the_live_run_and_the_kept_text_matters(comfy, shapes):
    """At cfg 1 ComfyUI runs the cond branch alone, so truncating guidance changes nothing (bit for
    bit: the wrapper computes exactly the live call); freezing the text changes the run, and which
    branch's text is kept matters."""
    variants = joint_study.variants()

    def run(variant):
        return joint_study.sample(comfy.nodes, shapes, variant, PROMPTS, seed=0)

    live, gate_step = run(variants["cfg1_live"])
    truncated, truncated_gate = run(joint_study.Variant("", "truncated", gate_at=0.4, cfg=1.0))
    assert gate_step is None and 0 < truncated_gate < joint_study.STEPS
    assert torch.equal(live, truncated)
    frozen, _ = run(variants["cfg1_frozen_0.4"])
    assert not torch.equal(live, frozen)
    baseline, _ = run(variants["baseline"])
    with_cond, _ = run(variants["frozen_cond_0.4"])
    with_uncond, _ = run(variants["frozen_uncond_0.4"])
    assert not torch.equal(with_cond, baseline) and not torch.equal(with_uncond, with_cond)


def test_the_rule_is_the_plans():
    acc = {name: 0.9 for name in joint_study.variants()} | {"text_after": 0.2}
    assert joint_study.decide(acc)[0] == "go"
    assert "mean" in joint_study.decide(acc)[1]  # ties go to the mean
    for kept in ("cond", "uncond", "mean"):
        acc[f"frozen_{kept}_0.4"] = 0.84
    assert joint_study.decide(acc)[0] == "live-text single branch only"
    acc["truncated_0.4"] = 0.8
    assert joint_study.decide(acc)[0] == "no-go"
    acc["text_after"] = 0.7
    assert joint_study.decide(acc)[0] == "inconclusive"


def test_the_pooled_model_reads_the_tokens_mean_in_its_modulation(comfy):
    """The second model (PLAN.md, addendum 2): Flux's `vector_in` reads a 64-wide pooled vector, the
    mean of the prompt's token embeddings, which its conditioning and its training objective both give;
    the gradient reaches `vector_in`."""
    torch.manual_seed(0)
    pooled = trained_joint.build(None, pooled=True)
    net = pooled.model.diffusion_model
    assert net.vector_in.in_layer.in_features == trained_joint.POOLED_WIDTH
    ((tokens, options),) = trained_joint.conditioning(PROMPTS, pooled=True)
    torch.testing.assert_close(options["pooled_output"], tokens.mean(dim=1))
    ((_, zeros),) = trained_joint.conditioning(PROMPTS)
    assert zeros["pooled_output"].abs().sum() == 0  # the first model's stays ComfyUI's zeros
    # Past initialisation (adaLN-zero: the modulations start at zero and ignore the vector), the
    # objective's pooled vector reaches the loss and its gradient reaches `vector_in`.
    from tgate_testkit.models import randomize

    randomize(net, 3)
    x0, prompts = trained.batch(4, torch.Generator().manual_seed(0))
    context = trained.encode(prompts)
    losses = {}
    for with_vector in (True, False):
        net.zero_grad(set_to_none=True)
        loss = trained_joint.objective(pooled.model.model_sampling, pooled=with_vector)
        losses[with_vector] = loss(net, x0, context, torch.Generator().manual_seed(1))
    losses[True].backward()
    assert net.vector_in.in_layer.weight.grad.abs().sum() > 0 and losses[True] != losses[False]
    net.zero_grad(set_to_none=True)


def test_the_pooled_variants_carry_the_chosen_vector_after_the_gate(comfy):
    """After the gate the one branch's pooled vector is the positive's, the branches' mean or the
    negative's, as the variant says; before it each branch has its own."""
    from functools import partial

    torch.manual_seed(0)
    pooled = trained_joint.build(None, pooled=True)
    net = pooled.model.diffusion_model
    seen = []
    hook = net.vector_in.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    conditioning = partial(trained_joint.conditioning, pooled=True)
    positive = conditioning(PROMPTS)[0][1]["pooled_output"]
    negative = conditioning([None] * len(PROMPTS))[0][1]["pooled_output"]
    expected = {"cond": positive, "mean": (positive + negative) / 2, "uncond": negative}
    try:
        for kept, vector in expected.items():
            seen.clear()
            variant = joint_study.Variant("", "frozen", "cond", 0.4, pooled=kept)
            _, gate_step = joint_study.sample(comfy.nodes, pooled, variant, PROMPTS, 0, conditioning=conditioning)
            assert len(seen) == joint_study.STEPS and 0 < gate_step < joint_study.STEPS
            before, after = seen[gate_step - 1], seen[gate_step]
            assert before.shape[0] == 2 * len(PROMPTS) and after.shape[0] == len(PROMPTS)  # both branches, then one
            torch.testing.assert_close(after, vector)
    finally:
        hook.remove()
