"""The cross-attention forward T-GATE installs, on real torch modules."""

import torch

from engine_modules import CrossAttention
from tgate import COND, PASS_KEY, UNCOND, CrossAttentionCache, GatePass, Stage, cached_cross_attention

P, N = "p", "n"


def setup():
    torch.manual_seed(0)
    module = CrossAttention()
    calls = []
    module.to_q.register_forward_pre_hook(lambda m, a: calls.append(1))
    forward = cached_cross_attention("blocks.0.attn2", module.forward)
    return module, forward, calls


def options(gate, cond_or_uncond, uuids):
    return {PASS_KEY: gate, "cond_or_uncond": cond_or_uncond, "uuids": uuids}


def test_without_a_gate_pass_it_is_the_original_forward():
    module, forward, _ = setup()
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 3, 6)
    assert torch.equal(forward(x, context=ctx, transformer_options={}), module(x, context=ctx))
    assert torch.equal(forward(x, context=ctx), module(x, context=ctx))


def test_capture_then_replay_computes_nothing_after_the_gate():
    module, forward, calls = setup()
    cache = CrossAttentionCache()
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 3, 6)
    cache.begin_capture(UNCOND)
    out = forward(x, context=ctx, transformer_options=options(GatePass(Stage.CAPTURE, cache), [UNCOND, COND], [N, P]))
    cache.finish_capture()
    assert torch.equal(out, module(x, context=ctx))  # capturing changes nothing
    expected = out.chunk(2)[0] / 2 + out.chunk(2)[1] / 2

    calls.clear()
    replay = options(GatePass(Stage.FIDELITY, cache), [UNCOND], [N])
    got = forward(torch.randn(1, 4, 8), context=torch.randn(1, 3, 6), transformer_options=replay)
    torch.testing.assert_close(got, expected)
    assert calls == []  # no projection ran


def test_replay_without_a_fitting_entry_computes_normally():
    module, forward, calls = setup()
    cache = CrossAttentionCache()
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    got = forward(x, context=ctx, transformer_options=options(GatePass(Stage.FIDELITY, cache), [UNCOND], [N]))
    assert torch.equal(got, module(x, context=ctx)) and calls


def test_wrapping_twice_chains_to_the_original_not_to_itself():
    module, forward, _ = setup()
    again = cached_cross_attention("blocks.0.attn2", forward)
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
