"""Which classifier-free guidance branch runs after the gate.

Once cross-attention is cached, text no longer enters the network, so CFG's two branches would
compute the same thing: one is enough, and its output stands for both. Which one matters where the
positive carries conditioning the negative lacks (an input image): `auto` lets the model family
decide (see families.py).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

COND, UNCOND = 0, 1  # positions in ComfyUI's `conds` list and values of `cond_or_uncond`
BRANCH_NAMES = ("cond", "uncond")  # by position


class FidelityBranch(str, enum.Enum):
    AUTO = "auto"  # the family's choice: uncond for text-to-image, cond where only the positive has the image
    UNCOND = "uncond"  # the paper's and the official code's choice: the negative prompt's branch
    COND = "cond"  # the positive branch, for workflows whose positive carries ControlNet or areas


def fidelity_index(conds: Sequence[Any], fidelity_branch: FidelityBranch) -> int:
    """The index in `conds` of the branch run after the gate: `fidelity_branch` (uncond or cond), or
    the only one this evaluation has (CFG 1.0 passes no uncond; some guidance nodes evaluate the
    branches in separate calls, `[cond, None]` then `[None, uncond]`). Decided per evaluation: a
    branch the evaluation lacks would run nothing."""
    preferred = UNCOND if fidelity_branch is FidelityBranch.UNCOND else COND
    return preferred if conds[preferred] else 1 - preferred


def only_branch(conds: Sequence[Any], index: int) -> list[Any]:
    """`conds` with every list but `conds[index]` replaced by None, which ComfyUI skips."""
    return [c if i == index else None for i, c in enumerate(conds)]
