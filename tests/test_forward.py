"""The attention forward T-GATE installs, on real torch modules."""

import torch

from engine_modules import CrossAttention
from tgate import CROSS, SELF, CallSlot, ChunkReduction, ModelCall, gated_attention

LAYER = "blocks.0.attn2"
SLOT = CallSlot()  # the wrappers' carrier of each model call's ModelCall, which the forwards hold


def setup():
    SLOT.call = None
    torch.manual_seed(0)
    module = CrossAttention()
    calls = []
    module.to_q.register_forward_pre_hook(lambda m, a: calls.append(1))
    return module, gated_attention(LAYER, CROSS, module.forward, SLOT), calls


def call_options(reuse=None, capture_kinds=frozenset(), reduction=None, captured=None):
    """One model call's ModelCall, put in the slot as APPLY_MODEL does; the transformer_options the call gets."""
    SLOT.call = ModelCall(reuse or {}, frozenset(capture_kinds), reduction, {} if captured is None else captured, {}, [])
    return {}


def test_without_tables_it_is_the_original_forward():
    module, forward, _ = setup()
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 3, 6)
    assert torch.equal(forward(x, context=ctx, transformer_options={"cond_or_uncond": [1, 0]}), module(x, context=ctx))
    assert torch.equal(forward(x, context=ctx), module(x, context=ctx))


def test_capture_leaves_the_output_unchanged_and_puts_its_reduction_in_the_table():
    module, forward, _ = setup()
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 3, 6)
    captured = {}
    reduction = ChunkReduction(n_chunks=2, stored=(0,), mixed_in=(1,), mean_of_branches=True)
    out = forward(x, context=ctx, transformer_options=call_options(capture_kinds={CROSS}, reduction=reduction, captured=captured))
    assert torch.equal(out, module(x, context=ctx))
    torch.testing.assert_close(captured[LAYER], (out[:1] + out[1:]) / 2)


def test_replay_returns_the_table_entry_and_computes_nothing():
    _, forward, calls = setup()
    cached = torch.randn(1, 4, 8)
    got = forward(torch.randn(1, 4, 8), context=torch.randn(1, 3, 6), transformer_options=call_options({LAYER: cached}))
    assert got is cached and calls == []


def test_replay_without_a_fitting_entry_computes_normally():
    module, forward, calls = setup()
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    for table in ({}, {"other.attn2": torch.randn(1, 4, 8)}, {LAYER: torch.randn(2, 4, 8)}):
        calls.clear()
        got = forward(x, context=ctx, transformer_options=call_options(table))
        assert torch.equal(got, module(x, context=ctx)) and calls


def test_wrapping_twice_chains_to_the_original_not_to_itself():
    module, forward, _ = setup()
    again = gated_attention(LAYER, CROSS, forward, SLOT)
    assert again.tgate_original is forward.tgate_original
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    assert torch.equal(again(x, context=ctx, transformer_options={}), module(x, context=ctx))


def test_another_packs_forward_patch_is_chained():
    module, _, _ = setup()
    seen = []

    def other_pack_forward(x, *args, **kwargs):
        seen.append(x.shape)
        return module.forward(x, *args, **kwargs) * 2

    forward = gated_attention("l", CROSS, other_pack_forward, SLOT)
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    assert torch.equal(forward(x, context=ctx, transformer_options={}), module(x, context=ctx) * 2) and seen


def test_a_module_captures_only_when_its_kind_is_captured():
    module, forward, _ = setup()
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 3, 6)
    reduction = ChunkReduction(n_chunks=2, stored=(0, 1), mixed_in=(), mean_of_branches=False)
    captured = {}
    forward(x, context=ctx, transformer_options=call_options(capture_kinds={SELF}, reduction=reduction, captured=captured))
    assert captured == {}  # a self-attention capture step leaves cross-attention alone
    forward(x, context=ctx, transformer_options=call_options(capture_kinds={SELF, CROSS}, reduction=reduction, captured=captured))
    assert torch.equal(captured[LAYER], module(x, context=ctx))  # the whole batch, both branches


def test_keyword_only_calls_are_served():
    """Some families call their attention with keywords only (ACE-Step: hidden_states=...)."""
    seen = []

    def keyword_forward(hidden_states=None, encoder_hidden_states=None, transformer_options={}):
        seen.append(1)
        return hidden_states * 2

    forward = gated_attention(LAYER, CROSS, keyword_forward, SLOT)
    x = torch.randn(1, 4, 8)
    cached = torch.randn(1, 4, 8)
    assert forward(hidden_states=x, transformer_options=call_options({LAYER: cached})) is cached and not seen
    torch.testing.assert_close(forward(hidden_states=x, transformer_options=call_options({LAYER: cached[:, :2]})), x * 2)


def test_a_tuple_output_is_captured_by_its_first_item_and_replayed_in_the_same_form():
    """ACE-Step's self-attention returns (output, None): the block unpacks two values."""
    seen = []

    def tuple_forward(hidden_states=None, encoder_hidden_states=None, transformer_options={}):
        seen.append(1)
        return hidden_states * 2, encoder_hidden_states

    forward = gated_attention("blocks.0.attn", SELF, tuple_forward, SLOT, tuple_output=2)
    x = torch.randn(2, 4, 8)
    reduction = ChunkReduction(n_chunks=2, stored=(0, 1), mixed_in=(), mean_of_branches=False)
    captured = {}
    out = forward(hidden_states=x, transformer_options=call_options(capture_kinds={SELF}, reduction=reduction, captured=captured))
    assert isinstance(out, tuple) and out[1] is None and torch.equal(captured["blocks.0.attn"], x * 2)
    seen.clear()
    cached = torch.randn(2, 4, 8)
    got = forward(hidden_states=x, transformer_options=call_options({"blocks.0.attn": cached}))
    assert got[0] is cached and got[1] is None and len(got) == 2 and not seen
    # A call that returns more than its output (joint use) is never kept.
    captured.clear()
    forward(
        hidden_states=x,
        encoder_hidden_states=x,
        transformer_options=call_options(capture_kinds={SELF}, reduction=reduction, captured=captured),
    )
    assert captured == {}


def test_a_module_run_twice_in_one_call_keeps_and_reuses_each_run_apart():
    """VACE runs each vace block once per control in one model call."""
    module, forward, calls = setup()
    reduction = ChunkReduction(n_chunks=1, stored=(0,), mixed_in=(), mean_of_branches=False)
    x1, x2, ctx = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    captured = {}
    options = call_options(capture_kinds={CROSS}, reduction=reduction, captured=captured)
    first, second = forward(x1, context=ctx, transformer_options=options), forward(x2, context=ctx, transformer_options=options)
    assert set(captured) == {LAYER, LAYER + "#1"} and not torch.equal(first, second)
    calls.clear()
    options = call_options({LAYER: captured[LAYER], LAYER + "#1": captured[LAYER + "#1"]})
    assert forward(x1, context=ctx, transformer_options=options) is captured[LAYER]
    assert forward(x2, context=ctx, transformer_options=options) is captured[LAYER + "#1"]
    assert calls == []
