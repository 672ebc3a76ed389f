"""CrossAttentionCache: what is stored at the gate and what comes back after it."""

import pytest
import torch

from tgate import COND, UNCOND, CrossAttentionCache

P, N, A = "positive-uuid", "negative-uuid", "area-uuid"


def batched(*chunks):
    return torch.cat(chunks)


def lookup(cache, layer, chunk_ids):
    return cache.replay_table(chunk_ids, torch.device("cpu")).get(layer)


def test_stores_the_mean_of_the_kept_chunk_and_the_other_branch():
    cond, uncond = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    cache = CrossAttentionCache()
    cache.begin_capture(UNCOND)
    cache.capture("l0", batched(uncond, cond), [UNCOND, COND], [N, P])
    cache.finish_capture()
    out = lookup(cache, "l0", [N])
    torch.testing.assert_close(out, (cond + uncond) / 2)
    assert lookup(cache, "l0", [P]) is None  # the dropped branch is not stored
    assert len(cache) == 1 and cache.layers == 1 and cache.nbytes == 2 * 5 * 8 * 4


def test_several_other_chunks_are_averaged_first():
    a, b, u = torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    cache = CrossAttentionCache()
    cache.begin_capture(UNCOND)
    cache.capture("l0", batched(u, a, b), [UNCOND, COND, COND], [N, P, A])
    cache.finish_capture()
    torch.testing.assert_close(lookup(cache, "l0", [N]), (u + (a + b) / 2) / 2)


def test_fp16_mean_is_computed_in_float32():
    big = torch.full((1, 2, 2), 60000.0, dtype=torch.float16)
    cache = CrossAttentionCache()
    cache.begin_capture(UNCOND)
    cache.capture("l0", batched(big, big), [UNCOND, COND], [N, P])
    cache.finish_capture()
    out = lookup(cache, "l0", [N])
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_a_chunk_without_partner_keeps_its_own_output():
    cond = torch.randn(1, 3, 4)
    cache = CrossAttentionCache()
    cache.begin_capture(COND)  # cfg 1.0
    cache.capture("l0", cond, [COND], [P])
    cache.finish_capture()
    torch.testing.assert_close(lookup(cache, "l0", [P]), cond)


def test_branches_run_in_separate_calls_are_still_paired():
    cond, uncond = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    for order in ([(uncond, UNCOND, N), (cond, COND, P)], [(cond, COND, P), (uncond, UNCOND, N)]):
        cache = CrossAttentionCache()
        cache.begin_capture(UNCOND)
        for tensor, branch, chunk_id in order:
            cache.capture("l0", tensor, [branch], [chunk_id])
        cache.finish_capture()
        torch.testing.assert_close(lookup(cache, "l0", [N]), (cond + uncond) / 2)


def test_chunks_of_other_shapes_are_not_mixed():
    uncond, area = torch.randn(1, 16, 4), torch.randn(1, 4, 4)
    cache = CrossAttentionCache()
    cache.begin_capture(UNCOND)
    cache.capture("l0", uncond, [UNCOND], [N])
    cache.capture("l0", area, [COND], [A])
    cache.finish_capture()
    torch.testing.assert_close(lookup(cache, "l0", [N]), uncond)


def test_stored_entries_do_not_alias_the_model_output():
    out = torch.randn(1, 3, 4)
    cache = CrossAttentionCache()
    cache.begin_capture(COND)
    cache.capture("l0", out, [COND], [P])
    cache.finish_capture()
    expected = out.clone()
    out.zero_()  # the model reuses its buffers
    torch.testing.assert_close(lookup(cache, "l0", [P]), expected)


def test_tables_concatenate_chunks_in_call_order_and_leave_out_missing_layers():
    a, b = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    cache = CrossAttentionCache()
    cache.begin_capture(COND)
    cache.capture("l0", batched(a, b), [COND, COND], [P, A])
    cache.finish_capture()
    torch.testing.assert_close(lookup(cache, "l0", [A, P]), batched(b, a))
    assert lookup(cache, "l0", [P, "unknown"]) is None
    assert lookup(cache, "other-layer", [P]) is None


def test_tables_are_built_once_per_chunk_combination_and_dropped_with_the_capture():
    cache = CrossAttentionCache()
    cache.begin_capture(COND)
    cache.capture("l0", torch.randn(1, 3, 4), [COND], [P])
    cache.finish_capture()
    cpu = torch.device("cpu")
    table = cache.replay_table([P], cpu)
    assert cache.replay_table([P], cpu) is table  # no allocation per step after the gate
    cache.begin_capture(COND)
    assert cache.replay_table([P], cpu) == {}


def test_cpu_storage_hands_out_copies_for_the_call_only():
    cache = CrossAttentionCache("cpu")
    cache.begin_capture(COND)
    cache.capture("l0", torch.randn(1, 3, 4), [COND], [P])
    cache.finish_capture()
    cpu = torch.device("cpu")
    assert cache.replay_table([P], cpu) is not cache.replay_table([P], cpu)


def test_cpu_storage_and_clear_free_everything():
    cache = CrossAttentionCache("cpu")
    cache.begin_capture(COND)
    cache.capture("l0", torch.randn(1, 3, 4), [COND], [P])
    cache.finish_capture()
    assert lookup(cache, "l0", [P]).device.type == "cpu"
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_a_new_capture_starts_empty():
    cache = CrossAttentionCache()
    cache.begin_capture(COND)
    cache.capture("l0", torch.randn(1, 3, 4), [COND], [P])
    cache.finish_capture()
    cache.begin_capture(UNCOND)
    assert len(cache) == 0 and cache.keep_branch == UNCOND


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_storage_from_cuda_is_pinned_and_comes_back():
    a = torch.randn(1, 3, 4, device="cuda")
    cache = CrossAttentionCache("cpu")
    cache.begin_capture(COND)
    cache.capture("l0", a, [COND], [P])
    cache.finish_capture()
    out = cache.replay_table([P], a.device)["l0"]
    assert out.is_cuda
    torch.testing.assert_close(out, a)
