"""Which classifier-free guidance branch runs after the gate.

Once cross-attention is cached, text no longer enters the network, so CFG's two branches would
compute the same thing: one is enough, and its output stands for both.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

COND, UNCOND = 0, 1  # positions in ComfyUI's `conds` list and values of `cond_or_uncond`
BRANCH_NAMES = ("cond", "uncond")  # by position


class FidelityBranch(str, enum.Enum):
    UNCOND = "uncond"  # the paper's and the official code's choice: the negative prompt's branch
    COND = "cond"  # the positive branch, for workflows whose positive carries ControlNet or areas


def kept_branch(conds: Sequence[Any], preference: FidelityBranch) -> int:
    """The index of the branch to keep: the preferred one, or the only one that exists."""
    if preference is FidelityBranch.UNCOND and conds[UNCOND]:
        return UNCOND
    return COND


def only_branch(conds: Sequence[Any], keep: int) -> list[Any]:
    """`conds` with every list but `keep` replaced by None, which ComfyUI skips."""
    return [c if i == keep else None for i, c in enumerate(conds)]
