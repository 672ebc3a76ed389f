"""plan_steps: the official tgate_scheduler, step by step, as a pure function."""

import pytest

from tgate import Action, Kept, SelfAttentionReuse, plan_step, plan_steps
from tgate.plan import extra_evaluation_plan

LETTERS = {Action.COMPUTE: "c", Action.CAPTURE: "k", Action.REUSE: "r"}


def letters(plans, kind):
    return "".join(LETTERS[p.action(kind)] for p in plans)


def test_v1_computes_until_the_gate_captures_once_then_reuses_with_one_branch():
    plans = plan_steps(8, 4, None)
    assert letters(plans, "cross_attention") == "ccckrrrr"
    assert letters(plans, "self_attention") == "cccccccc"
    assert [p.both_branches for p in plans] == [True] * 4 + [False] * 4
    assert [p.mean_of_branches for p in plans] == [False, False, False, True, False, False, False, False]
    assert [p.is_plain for p in plans] == [True] * 3 + [False] * 5


def test_the_official_sdxl_setting():
    """Gate 10 of 25, warm_up 2, sp_interval 5, fi_interval 1 (the official code's SDXL example)."""
    plans = plan_steps(25, 10, SelfAttentionReuse(warm_up=2, sp_interval=5, fi_interval=1))
    # Kept at warm_up (2) and at step 5, reused in between; fi_interval 1 recomputes every step
    # after the gate, so the gate's and later captures are never read: they are plain computes.
    assert letters(plans, "self_attention") == "cckrrkrrrc" + "c" * 15
    assert letters(plans, "cross_attention") == "c" * 9 + "k" + "r" * 15


def test_fi_interval_2_reuses_the_mean_kept_at_the_gate():
    plans = plan_steps(20, 9, SelfAttentionReuse(warm_up=1, sp_interval=3, fi_interval=2))
    # Step 1 (warm_up) kept, 3 and 6 kept (step % 3 == 0), the rest reused; step 8 keeps the mean
    # of the branches, read by step 9 (odd); after it, even steps keep and odd steps reuse.
    assert letters(plans, "self_attention") == "ckrkrrkrk" + "rkrkrkrkrkr"
    assert plans[8].mean_of_branches and plans[8].self_attention is Action.CAPTURE


@pytest.mark.parametrize("warm_up", [0, 1, 2, 7])
def test_intervals_of_one_are_v1_exactly(warm_up):
    assert plan_steps(12, 5, SelfAttentionReuse(warm_up=warm_up, sp_interval=1, fi_interval=1)) == plan_steps(12, 5, None)


def test_steps_counted_from_zero_not_from_warm_up():
    plans = plan_steps(12, 11, SelfAttentionReuse(warm_up=3, sp_interval=4, fi_interval=1))
    # 3 is warm_up, but step 4 (a multiple of 4) keeps again before anything reads step 3's
    # output, so step 3 is only a compute; 8 keeps, 5-7 and 9 reuse.
    assert letters(plans, "self_attention") == "cccckrrrkrcc"


def test_a_warm_up_past_the_gate_leaves_self_attention_to_compute_before_it():
    plans = plan_steps(10, 3, SelfAttentionReuse(warm_up=5, sp_interval=2, fi_interval=2))
    assert letters(plans, "self_attention")[:3] == "cck"  # only the gate's mean capture, read by step 3
    assert letters(plans, "self_attention")[3:] == "rkrkrkr"


def test_every_reuse_follows_a_capture():
    for n, gate in ((25, 10), (20, 9), (7, 1), (30, 29)):
        for reuse in (SelfAttentionReuse(2, 5, 1), SelfAttentionReuse(0, 3, 2), SelfAttentionReuse(4, 2, 3)):
            kept = False
            for plan in plan_steps(n, gate, reuse):
                if plan.self_attention is Action.REUSE:
                    assert kept, (n, gate, reuse)
                kept = kept or plan.self_attention is Action.CAPTURE


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(warm_up=-1), "warm_up must be 0 or more"),
        (dict(sp_interval=0), "sp_interval must be 1 or more"),
        (dict(fi_interval=0), "fi_interval must be 1 or more"),
    ],
)
def test_settings_out_of_range_are_refused_with_the_input_named(settings, message):
    with pytest.raises(ValueError, match=message):
        SelfAttentionReuse(**settings)


def test_an_evaluation_follows_the_official_plan_when_what_it_reuses_was_kept():
    plans = plan_steps(20, 9, SelfAttentionReuse(warm_up=1, sp_interval=3, fi_interval=2))
    for step, plan in enumerate(plans):
        assert plan_step(plans, step, Kept(cross_attention=True, self_attention=True)) is plan


def test_a_reuse_of_what_was_never_kept_captures_instead():
    """The run's facts are what it keeps: a capture step the sampler skipped (dpm_fast), or whose
    model call EasyCache skipped, kept nothing, so the next evaluation captures."""
    plans = plan_steps(8, 4, None)
    late = plan_step(plans, 5, Kept())
    assert late == plans[3] and late.cross_attention is Action.CAPTURE and late.both_branches  # the gate's capture
    v2 = plan_steps(20, 9, SelfAttentionReuse(warm_up=1, sp_interval=3, fi_interval=2))
    assert v2[2].self_attention is Action.REUSE
    assert plan_step(v2, 2, Kept(cross_attention=False, self_attention=False)).self_attention is Action.CAPTURE


def test_self_attention_is_freed_from_its_last_reuse_on():
    plans = plan_steps(25, 10, SelfAttentionReuse(warm_up=2, sp_interval=5, fi_interval=1))
    assert [bool(p.free_after) for p in plans] == [False] * 8 + [True] * 17  # last reuse at step 8
    assert not any(p.free_after for p in plan_steps(8, 4, None))
    assert plan_step(plans, 12, Kept()).free_after == plans[12].free_after  # a late capture frees as its step


def test_extra_evaluations_reuse_kept_cross_attention_after_the_gate_and_nothing_else():
    plans = plan_steps(6, 3, SelfAttentionReuse(warm_up=0, sp_interval=1, fi_interval=2))
    kept = Kept(cross_attention=True, self_attention=True)
    assert [extra_evaluation_plan(p, kept) is None for p in plans] == [True, True, True, False, False, False]
    extra = extra_evaluation_plan(plans[4], kept)
    assert extra.cross_attention is Action.REUSE and extra.self_attention is Action.COMPUTE and not extra.kinds(Action.CAPTURE)
    assert extra_evaluation_plan(plans[4], Kept(cross_attention=False)) is None  # nothing kept: it computes
    # After a late capture (the main evaluation captured past the gate with text) the extra one computes
    # too, although the capture has just filled the cache: it follows what the main evaluation did.
    late = plan_step(plans, 4, Kept(cross_attention=False, self_attention=True))
    assert extra_evaluation_plan(late, kept) is None
