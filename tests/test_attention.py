"""The cross-attention forward T-GATE installs, on real torch modules."""

import torch

from engine_modules import CrossAttention
from tgate import CAPTURE_KEY, REPLAY_KEY, ChunkPlan, cached_cross_attention
from tgate.attention import CAPTURE_PLAN_KEY

LAYER = "blocks.0.attn2"


def setup():
    torch.manual_seed(0)
    module = CrossAttention()
    calls = []
    module.to_q.register_forward_pre_hook(lambda m, a: calls.append(1))
    return module, cached_cross_attention(LAYER, module.forward), calls


def test_without_tables_it_is_the_original_forward():
    module, forward, _ = setup()
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 3, 6)
    assert torch.equal(forward(x, context=ctx, transformer_options={"cond_or_uncond": [1, 0]}), module(x, context=ctx))
    assert torch.equal(forward(x, context=ctx), module(x, context=ctx))


def test_capture_leaves_the_output_unchanged_and_puts_its_reduction_in_the_table():
    module, forward, _ = setup()
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 3, 6)
    captured = {}
    plan = ChunkPlan(n_chunks=2, kept=(0,), others=(1,))
    out = forward(x, context=ctx, transformer_options={CAPTURE_KEY: captured, CAPTURE_PLAN_KEY: plan})
    assert torch.equal(out, module(x, context=ctx))
    (mean,) = captured[LAYER]
    torch.testing.assert_close(mean, (out[:1] + out[1:]) / 2)


def test_replay_returns_the_table_entry_and_computes_nothing():
    _, forward, calls = setup()
    cached = torch.randn(1, 4, 8)
    got = forward(torch.randn(1, 4, 8), context=torch.randn(1, 3, 6), transformer_options={REPLAY_KEY: {LAYER: cached}})
    assert got is cached and calls == []


def test_replay_without_a_fitting_entry_computes_normally():
    module, forward, calls = setup()
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    for table in ({}, {"other.attn2": torch.randn(1, 4, 8)}, {LAYER: torch.randn(2, 4, 8)}):
        calls.clear()
        got = forward(x, context=ctx, transformer_options={REPLAY_KEY: table})
        assert torch.equal(got, module(x, context=ctx)) and calls


def test_wrapping_twice_chains_to_the_original_not_to_itself():
    module, forward, _ = setup()
    again = cached_cross_attention(LAYER, forward)
    assert again.tgate_original is forward.tgate_original
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    assert torch.equal(again(x, context=ctx, transformer_options={}), module(x, context=ctx))


def test_another_packs_forward_patch_is_chained():
    module, _, _ = setup()
    seen = []

    def other_pack_forward(x, *args, **kwargs):
        seen.append(x.shape)
        return module.forward(x, *args, **kwargs) * 2

    forward = cached_cross_attention("l", other_pack_forward)
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    assert torch.equal(forward(x, context=ctx, transformer_options={}), module(x, context=ctx) * 2) and seen
