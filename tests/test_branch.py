"""Which CFG branch runs after the gate."""

from tgate import COND, UNCOND, FidelityBranch, fidelity_index, only_lists

POSITIVE, NEGATIVE = ["p"], ["n"]


def test_uncond_is_kept_when_it_exists():
    assert fidelity_index([POSITIVE, NEGATIVE], FidelityBranch.UNCOND) == UNCOND
    assert fidelity_index([POSITIVE, NEGATIVE], FidelityBranch.COND) == COND


def test_cond_is_kept_when_there_is_no_uncond():
    # cfg 1.0: ComfyUI passes None; an empty negative list runs nothing either.
    assert fidelity_index([POSITIVE, None], FidelityBranch.UNCOND) == COND
    assert fidelity_index([POSITIVE, []], FidelityBranch.UNCOND) == COND


def test_only_lists_blanks_the_others():
    assert only_lists([POSITIVE, NEGATIVE], (UNCOND,)) == [None, NEGATIVE]
    assert only_lists([POSITIVE, NEGATIVE], (COND,)) == [POSITIVE, None]


def test_the_branch_an_evaluation_has_is_kept_when_it_lacks_the_preferred_one():
    # Guidance nodes that evaluate the branches in separate calls: [cond, None], then [None, uncond].
    assert fidelity_index([None, NEGATIVE], FidelityBranch.COND) == UNCOND
    assert fidelity_index([POSITIVE, None], FidelityBranch.UNCOND) == COND
