"""Image-conditioned models stay conditioned after the gate.

ComfyUI's SVD_img2vid_Conditioning node (like SV3D's and Stable Zero123's) gives the negative a
zeroed CLIP-vision embedding and a zeroed concat_latent_image: only the positive carries the input
image. After the gate one branch runs; `auto` must keep the positive there, or every step after the
gate samples without the image. Built from ComfyUI's own SVD model class and conditioning node.
"""

from __future__ import annotations

import pytest
import torch

from tgate_testkit.recorders import ModelCalls

FRAMES, STEPS, CFG = 4, 12, 2.5


@pytest.fixture(scope="module")
def svd(comfy):
    model = comfy.svd(0)
    positive, negative, latent = comfy.svd_conditioning(seed=0, frames=FRAMES, size=16)
    return model, positive, negative, latent


def sample(comfy, model, svd, watched, **settings):
    _, positive, negative, latent = svd
    # x[:, 4:] is c_concat: the concat_latent_image, repeated over the frames.
    with ModelCalls(keep_input=lambda x: x[:, 4:]).watch(watched) as inputs:
        out = comfy.sample(model, positive, negative, latent=latent, steps=STEPS, cfg=CFG, seed=1, **settings)
    return out, [(call["layout"], call["input"]) for call in inputs.calls]


def gate_of(calls):
    return next(i for i, (layout, _) in enumerate(calls) if len(layout) == 1)


@pytest.mark.parametrize("node", ["simple", "advanced"])
def test_auto_keeps_the_input_image_after_the_gate_and_equals_cond(comfy, svd, node):
    model, positive, _, _ = svd
    apply = comfy.tgate if node == "simple" else comfy.tgate_advanced
    concat = positive[0][1]["concat_latent_image"]
    auto, calls = sample(comfy, apply(model, fidelity_branch="auto"), svd, model)
    gate = gate_of(calls)
    assert 0 < gate < STEPS
    for layout, image in calls[gate:]:
        assert layout == [0]  # the positive branch alone
        assert torch.equal(image, concat.expand_as(image))  # with the real input image
        assert image.abs().sum() > 0
    cond, _ = sample(comfy, apply(model, fidelity_branch="cond"), svd, model)
    assert torch.equal(auto, cond)


def test_uncond_would_sample_without_the_image(comfy, svd):
    """Why auto keeps cond here: the negative branch's image latent is zeros."""
    model = svd[0]
    out, calls = sample(comfy, comfy.tgate(model, fidelity_branch="uncond"), svd, model)
    gate = gate_of(calls)
    assert all(layout == [1] and not image.any() for layout, image in calls[gate:])
    auto, _ = sample(comfy, comfy.tgate(model, fidelity_branch="auto"), svd, model)
    assert not torch.allclose(out, auto)


def test_temporal_attention_is_gated_and_reused_like_spatial(comfy, svd):
    model = svd[0]
    names = [n for n, _ in model.model.diffusion_model.named_modules()]
    temporal_cross = [n for n in names if ".time_stack." in n and n.endswith("attn2")]
    temporal_self = [n for n in names if ".time_stack." in n and n.endswith("attn1")]
    assert temporal_cross and temporal_self
    patched = comfy.tgate_advanced(model, sp_interval=3, fi_interval=2, warm_up=1)
    assert {f"diffusion_model.{n}.forward" for n in temporal_cross + temporal_self} <= set(patched.object_patches)
    with ModelCalls(self_attention=tuple(temporal_self)).watch(model) as probe:
        out, _ = sample(comfy, patched, svd, model)
    self_q = sum(probe.column("self_q"))
    assert torch.isfinite(out).all()
    gate = probe.batch_sizes.index(FRAMES)
    assert probe.batch_sizes == [2 * FRAMES] * gate + [FRAMES] * (STEPS - gate)
    # No cross-attention q projection after the gate, spatial or temporal.
    assert probe.to_q_calls == gate * len([n for n in names if n.endswith("attn2")])
    # Temporal self-attention computed only on the steps the V2 schedule computes.
    engine = comfy.engine
    plans = engine.plan_steps(STEPS, gate, engine.SelfAttentionReuse(warm_up=1, sp_interval=3, fi_interval=2))
    computed = sum(p.self_attention is not engine.Action.REUSE for p in plans)
    assert computed < STEPS and self_q == computed * len(temporal_self)
