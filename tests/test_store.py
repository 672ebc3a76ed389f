"""AttentionStore: what is kept at a capture and what comes back when a later step reuses it."""

import pytest
import torch

from tgate import COND, CROSS, SELF, UNCOND, Action, AttentionStore, StepPlan, reduce_chunks

P, N, A = "positive-uuid", "negative-uuid", "area-uuid"
CPU = torch.device("cpu")
LAYERS = {"l0": CROSS, "other-layer": CROSS, "s0": SELF}


FIDELITY = {}  # {store: the fidelity branch of its capture}, which the run holds in the engine


def reduction(branches, keep, mean, lists=2):
    """How a capture step's plan (the gate's: mean=True) reduces a call, `keep` being the fidelity
    branch, in an evaluation of `lists` cond lists."""
    plan = StepPlan(Action.CAPTURE, Action.COMPUTE, both_branches=True, mean_of_branches=mean)
    return plan.reduction(branches, keep, lists)


def capture(cache, layer, output, branches, chunk_ids, mean=True, lists=2):
    """What T-GATE does with one layer of one model call at a capture step (the gate's: mean=True)."""
    plan = reduction(branches, FIDELITY[cache], mean, lists)
    cache.store(layer, reduce_chunks(output, plan), plan, chunk_ids)


def begin_capture(cache, keep):
    cache.clear()
    FIDELITY[cache] = keep


def captured(keep, *calls, storage=None, mean=True):
    """A store after one capture of `calls`: (layer, batched output, branches, chunk ids) each."""
    cache = AttentionStore(LAYERS, storage)
    begin_capture(cache, keep)
    for call in calls:
        capture(cache, *call, mean=mean)
    cache.finish_capture()
    return cache


def lookup(cache, layer, chunk_ids, kinds=(CROSS,)):
    return cache.reuse_table(kinds, chunk_ids, CPU).get(layer)


def test_stores_the_mean_of_the_kept_chunk_and_the_other_branch():
    cond, uncond = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cache = captured(UNCOND, ("l0", torch.cat([uncond, cond]), [UNCOND, COND], [N, P]))
    torch.testing.assert_close(lookup(cache, "l0", [N]), (cond + uncond) / 2)
    assert lookup(cache, "l0", [P]) is None  # the dropped branch is not stored
    assert len(cache) == 1 and cache.layers(CROSS) == 1 and cache.nbytes == 2 * 5 * 8 * 4


def test_several_other_chunks_are_averaged_first():
    a, b, u = torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    cache = captured(UNCOND, ("l0", torch.cat([u, a, b]), [UNCOND, COND, COND], [N, P, A]))
    torch.testing.assert_close(lookup(cache, "l0", [N]), (u + (a + b) / 2) / 2)


def test_fp16_mean_is_computed_in_float32():
    big = torch.full((1, 2, 2), 60000.0, dtype=torch.float16)
    out = lookup(captured(UNCOND, ("l0", torch.cat([big, big]), [UNCOND, COND], [N, P])), "l0", [N])
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_a_chunk_without_partner_keeps_its_own_output():
    cond = torch.randn(1, 3, 4)
    torch.testing.assert_close(lookup(captured(COND, ("l0", cond, [COND], [P])), "l0", [P]), cond)  # cfg 1.0


def test_branches_run_in_separate_calls_are_still_paired():
    cond, uncond = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    calls = [("l0", uncond, [UNCOND], [N]), ("l0", cond, [COND], [P])]
    for order in (calls, calls[::-1]):
        torch.testing.assert_close(lookup(captured(UNCOND, *order), "l0", [N]), (cond + uncond) / 2)


def test_chunks_of_other_shapes_are_not_mixed():
    uncond, area = torch.randn(1, 16, 4), torch.randn(1, 4, 4)
    cache = captured(UNCOND, ("l0", uncond, [UNCOND], [N]), ("l0", area, [COND], [A]))
    torch.testing.assert_close(lookup(cache, "l0", [N]), uncond)


def test_stored_entries_do_not_alias_the_model_output():
    for out, branches, ids in ((torch.randn(1, 3, 4), [COND], [P]), (torch.randn(2, 3, 4), [UNCOND, COND], [N, P])):
        cache = captured(COND, ("l0", out, branches, ids))
        expected = lookup(cache, "l0", [P]).clone()
        out.zero_()  # the model reuses its buffers; a CUDA graph replay overwrites its outputs
        torch.testing.assert_close(lookup(cache, "l0", [P]), expected)


def test_split_partner_sums_do_not_alias_the_model_output():
    cond, uncond = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    expected = (cond + uncond) / 2
    cache = AttentionStore(LAYERS)
    begin_capture(cache, UNCOND)
    capture(cache, "l0", cond, [COND], [P])  # the other branch comes first, in a call of its own
    cond.zero_()
    capture(cache, "l0", uncond, [UNCOND], [N])
    cache.finish_capture()
    torch.testing.assert_close(lookup(cache, "l0", [N]), expected)


def test_tables_concatenate_chunks_in_call_order_and_leave_out_missing_layers():
    a, b = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    cache = captured(COND, ("l0", torch.cat([a, b]), [COND, COND], [P, A]))
    torch.testing.assert_close(lookup(cache, "l0", [A, P]), torch.cat([b, a]))
    assert lookup(cache, "l0", [P, "unknown"]) is None
    assert lookup(cache, "other-layer", [P]) is None


def test_tables_are_built_once_per_chunk_combination_and_dropped_with_the_capture():
    cache = captured(COND, ("l0", torch.randn(1, 3, 4), [COND], [P]))
    table = cache.reuse_table([CROSS], [P], CPU)
    assert cache.reuse_table([CROSS], [P], CPU) is table  # no allocation per step after the gate
    begin_capture(cache, COND)
    assert cache.reuse_table([CROSS], [P], CPU) == {}


def test_cpu_storage_hands_out_copies_for_the_call_only():
    cache = captured(COND, ("l0", torch.randn(1, 3, 4), [COND], [P]), storage="cpu")
    assert cache.reuse_table([CROSS], [P], CPU) is not cache.reuse_table([CROSS], [P], CPU)


def test_cpu_storage_and_clear_free_everything():
    cache = captured(COND, ("l0", torch.randn(1, 3, 4), [COND], [P]), storage="cpu")
    assert lookup(cache, "l0", [P]).device.type == "cpu"
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and lookup(cache, "l0", [P]) is None


def test_the_plan_places_each_branch():
    assert reduction([UNCOND, COND, COND], UNCOND, True) == (3, (0,), (1, 2), True, False)
    assert reduction([COND], UNCOND, True) == (1, (), (0,), True, False)
    assert reduction([UNCOND, COND], UNCOND, False) == (2, (0, 1), (), False, False)  # a whole capture keeps every chunk
    # A guider's three lists (PerpNeg, DualCFG): every chunk weighs the same.
    assert reduction([COND, UNCOND, 2], UNCOND, True, lists=3) == (3, (1,), (0, 2), True, True)


def test_three_lists_keep_the_mean_of_every_chunk_in_one_call_or_several():
    pos, neg, empty = torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    one_call = AttentionStore(LAYERS)
    begin_capture(one_call, UNCOND)
    capture(one_call, "l0", torch.cat([pos, neg, empty]), [COND, UNCOND, 2], [P, N, A], lists=3)
    one_call.finish_capture()
    several = AttentionStore(LAYERS)
    begin_capture(several, UNCOND)
    capture(several, "l0", neg, [UNCOND], [N], lists=3)
    capture(several, "l0", torch.cat([pos, empty]), [COND, 2], [P, A], lists=3)
    several.finish_capture()
    for cache in (one_call, several):
        torch.testing.assert_close(lookup(cache, "l0", [N]), (pos + neg + empty) / 3)
        # The mean is every list's: the other lists' chunks get it too where asked (their partners).
        torch.testing.assert_close(cache.reuse_table((CROSS,), [P], CPU, partners=True)["l0"], (pos + neg + empty) / 3)


def test_a_new_capture_starts_empty_and_keeps_its_own_branch():
    cache = captured(COND, ("l0", torch.randn(1, 3, 4), [COND], [P]))
    begin_capture(cache, UNCOND)
    assert len(cache) == 0 and cache.nbytes == 0 and lookup(cache, "l0", [P]) is None
    # The next capture stores the newly kept branch (uncond), mixed with the other one.
    cond, uncond = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    capture(cache, "l0", torch.cat([uncond, cond]), [UNCOND, COND], [N, P])
    cache.finish_capture()
    torch.testing.assert_close(lookup(cache, "l0", [N]), (cond + uncond) / 2)
    assert lookup(cache, "l0", [P]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_storage_from_cuda_is_pinned_and_comes_back():
    a = torch.randn(1, 3, 4, device="cuda")
    cache = captured(COND, ("l0", a, [COND], [P]), storage="cpu")
    assert next(iter(cache._entries["l0"].values())).block.is_pinned()
    out = cache.reuse_table([CROSS], [P], a.device)["l0"]
    assert out.is_cuda
    torch.testing.assert_close(out, a)


def test_a_whole_capture_keeps_both_branches_and_hands_the_same_call_its_tensor_back():
    """Self-attention before the gate: each chunk's own output, kept once for the whole call."""
    out = torch.randn(4, 3, 4)  # two chunks of two images
    cache = captured(UNCOND, ("s0", out, [UNCOND, COND], [N, P]), mean=False)
    whole = lookup(cache, "s0", [N, P], kinds=(SELF,))
    torch.testing.assert_close(whole, out)
    assert lookup(cache, "s0", [N, P], kinds=(SELF,)) is whole  # no copy, no concatenation per step
    assert cache.nbytes == out.numel() * 4  # one block, not one per chunk plus a joined copy
    torch.testing.assert_close(lookup(cache, "s0", [P, N], kinds=(SELF,)), torch.cat([out[2:], out[:2]]))
    torch.testing.assert_close(lookup(cache, "s0", [N], kinds=(SELF,)), out[:2])  # the branch grouped alone


def test_kinds_are_kept_and_cleared_apart():
    cache = captured(UNCOND, ("s0", torch.randn(2, 3, 4), [UNCOND, COND], [N, P]), mean=False)
    capture(cache, "l0", torch.randn(2, 3, 4), [UNCOND, COND], [N, P])
    cache.finish_capture()
    assert cache.holds(SELF) and cache.holds(CROSS)
    assert set(cache.reuse_table([CROSS], [N], CPU)) == {"l0"}
    assert set(cache.reuse_table([CROSS, SELF], [N], CPU)) == {"l0", "s0"}
    cache.clear([SELF])
    assert cache.holds(CROSS) and not cache.holds(SELF)


def test_cpu_storage_copies_a_block_once_however_many_chunks_share_it(monkeypatch):
    import tgate.store

    moves = []
    move = tgate.store._move
    monkeypatch.setattr(tgate.store, "_move", lambda t, d: moves.append(t) or move(t, d))
    captured(COND, ("l0", torch.randn(3, 3, 4), [COND, COND, COND], [P, A, N]), storage="cpu", mean=False)
    assert len(moves) == 1


def test_the_dropped_branch_finds_the_mean_it_was_averaged_into_only_when_asked():
    """Extra evaluations (PAG's positive-only call) ask for the other branch's chunk: the mean serves it."""
    cond, uncond = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    for calls in (
        [("l0", torch.cat([uncond, cond]), [UNCOND, COND], [N, P])],  # one call
        [("l0", cond, [COND], [P]), ("l0", uncond, [UNCOND], [N])],  # the branches in calls of their own
    ):
        cache = captured(UNCOND, *calls)
        assert cache.reuse_table([CROSS], [P], CPU) == {}  # the main evaluation never gets it
        torch.testing.assert_close(cache.reuse_table([CROSS], [P], CPU, partners=True)["l0"], (cond + uncond) / 2)
        begin_capture(cache, UNCOND)
        assert cache.reuse_table([CROSS], [P], CPU, partners=True) == {}  # gone with the capture
