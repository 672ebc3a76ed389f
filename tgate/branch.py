"""Which classifier-free guidance branch runs after the gate.

Once cross-attention is cached, text no longer enters the network, so CFG's two branches would
compute the same thing: one is enough, and its output stands for both. Which one matters where the
positive carries conditioning the negative lacks (an input image): `auto` lets the model family
decide (see families.py).

Guiders with more than two cond lists (PerpNegGuider, DualCFGGuider) get the same rule where it
is exact: lists whose inputs other than the text tokens agree compute the same thing after the
gate, so one of them is evaluated for all (stand_ins).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import torch

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


# What a cond carries that is text, or no input at all: ignored when lists are compared. The text
# tokens enter the model as `c_crossattn` (the key ComfyUI's model_conds give them in every family);
# `cross_attn` and `pooled_output` are the raw encoder outputs model_conds are made from (a pooled
# vector that enters the model, SDXL's `y`, is compared there); `uuid` names the cond and
# `prompt_type` only acts through model_conds.
TEXT_KEYS = frozenset({"cross_attn", "pooled_output", "uuid", "prompt_type"})
TEXT_MODEL_CONDS = frozenset({"c_crossattn"})


def stand_ins(conds: Sequence[Any], fidelity: int) -> tuple[int, ...]:
    """For each list in `conds`, the index of the list evaluated for it after the gate.

    Two lists (classifier-free guidance): the fidelity branch stands for both, the paper's rule.
    More (PerpNegGuider, DualCFGGuider): a list stands for every list whose inputs other than the
    text agree with its own (same conds, areas, masks, strengths, timestep ranges, ControlNets and
    model inputs such as SDXL's pooled vector and size), the fidelity list first. Compares tensors
    on the device: call it once per run and cond layout, not per step.
    """
    if len(conds) <= 2:
        return tuple(fidelity for _ in conds)
    order = [fidelity] + [i for i in range(len(conds)) if i != fidelity]
    chosen: dict[int, int] = {}
    for i in order:
        if not conds[i]:
            chosen[i] = i  # nothing to evaluate: ComfyUI skips it as it does without T-GATE
            continue
        evaluated = [j for j in order if chosen.get(j) == j and conds[j]]
        chosen[i] = next((j for j in evaluated if _same_inputs(conds[i], conds[j])), i)
    return tuple(chosen[i] for i in range(len(conds)))


class StandIns:
    """stand_ins of the cond lists of each evaluation of a run, worked out once per cond layout and
    fidelity branch: it compares tensors on the device, which no step should wait for. The guider's
    lists live as long as the run, so their id() names a layout."""

    def __init__(self) -> None:
        self._found: dict[tuple, tuple[int, ...]] = {}

    def __call__(self, conds: Sequence[Any], fidelity: int) -> tuple[int, ...]:
        key = (fidelity, *(id(c) if c else None for c in conds))
        found = self._found.get(key)
        if found is None:
            found = self._found[key] = stand_ins(conds, fidelity)
        return found


def only_lists(conds: Sequence[Any], kept: Sequence[int]) -> list[Any]:
    """`conds` with every list whose index is not in `kept` replaced by None."""
    return [c if i in kept else None for i, c in enumerate(conds)]


def _same_inputs(a: Sequence[dict], b: Sequence[dict]) -> bool:
    """Whether two cond lists give the model the same inputs but for the text tokens."""
    return len(a) == len(b) and all(_same_cond(x, y) for x, y in zip(a, b, strict=True))


def _same_cond(a: dict, b: dict) -> bool:
    keys = (a.keys() | b.keys()) - TEXT_KEYS
    if any(k not in a or k not in b or not _same_value(a[k], b[k]) for k in keys - {"model_conds"}):
        return False
    model_a, model_b = a.get("model_conds", {}), b.get("model_conds", {})
    inputs = (model_a.keys() | model_b.keys()) - TEXT_MODEL_CONDS
    return all(k in model_a and k in model_b and _same_value(model_a[k], model_b[k]) for k in inputs)


def _same_value(a: Any, b: Any) -> bool:
    """Equal values: tensors element by element, ComfyUI's CONDRegular-style wrappers by their
    type and `cond`, containers item by item, plain values by ==, any other object by identity (a
    ControlNet, a hook group: the same object)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b.to(a.device)))
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (int, float, str, bytes, bool)) or a is None:
        return a == b
    if hasattr(a, "cond"):  # comfy.conds.CONDRegular and its kinds
        return _same_value(a.cond, b.cond)
    return False
