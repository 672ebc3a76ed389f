"""One model evaluation (one CALC_COND_BATCH call) while a run carries it out: its plan, which cond
lists run, and what its model calls need to know. Made afresh for every evaluation; the run keeps
the last main evaluation's, which the extra evaluations (PAG, SAG, SLG) that follow it at the same
sigma read. Plain values: a model call gets only plain tables made from it (forward.ModelCall).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .branch import only_lists
from .plan import StepPlan
from .store import ChunkReduction


@dataclass
class Evaluation:
    plan: StepPlan
    conds: Sequence[Any]  # the cond lists it was given (a main evaluation's: the guider's)
    fidelity: int  # the index of the fidelity branch in the main evaluation's conds
    lists: int  # how many cond lists the main evaluation has (PerpNeg and DualCFG guiders: three)
    # For each of `conds`, the index of the list run for it: after the gate one list stands for
    # others (branch.stand_ins). None: every list runs as given.
    evaluated_for: tuple[int, ...] | None = None
    # An extra evaluation's: for each list it runs, the position that list has in the main
    # evaluation (PAG passes the main call's cond list, SAG its uncond list; after the gate both run
    # the fidelity branch's). Chunks are kept by (uuid, branch), so its chunks are looked up under
    # their main-evaluation branch.
    branches: tuple[int, ...] = ()
    extra: bool = False
    # Whether one list was evaluated for all of a guider's three or more (run.guided_by_stand_in reads
    # it); set once the evaluation has run.
    one_for_all: bool = False
    misfits: list[str] = field(default_factory=list)  # layers whose kept output did not fit

    @property
    def run_conds(self) -> Sequence[Any]:
        """The cond lists handed to ComfyUI: `conds` themselves, or where one list stands for others,
        those not evaluated for any list set to None."""
        return self.conds if self.evaluated_for is None else only_lists(self.conds, self.evaluated_for)

    def chunk_branches(self, cond_or_uncond: Sequence[int]) -> list[int]:
        """The branch each chunk of a model call is kept under, from ComfyUI's `cond_or_uncond`."""
        if not self.extra:
            return list(cond_or_uncond)
        return [self.branches[b] if b < len(self.branches) else b for b in cond_or_uncond]

    def reduction(self, cond_or_uncond: Sequence[int], own: bool = False) -> ChunkReduction | None:
        """How a capture reduces one model call of this evaluation (StepPlan.reduction)."""
        return self.plan.reduction(cond_or_uncond, self.fidelity, self.lists, own)

    def extra_evaluation(self, plan: StepPlan, conds: Sequence[Any]) -> Evaluation:
        """An evaluation other than this main one (PAG's, SAG's, SLG's), of `conds`, planned `plan`
        (plan.extra_evaluation_plan). Each of its lists that this evaluation had runs as the list
        this one ran for it (evaluated_for): after the gate, the fidelity branch's. The add-on's
        guidance term is the difference of this evaluation's output and its own, so both are made
        with the same inputs other than the text (SDXL's pooled vector; SVD's and unCLIP's image
        inputs, which their fidelity branch keeps), and the term carries the add-on's perturbation
        alone. Lists this evaluation did not have run as given."""
        lists, branches = [], []
        for i, c in enumerate(conds):
            position = next((j for j, main in enumerate(self.conds) if c and main is c), None)
            if position is None:
                lists.append(c)
                branches.append(i)
                continue
            evaluated = position if self.evaluated_for is None else self.evaluated_for[position]
            lists.append(self.conds[evaluated])
            branches.append(evaluated)
        return Evaluation(plan, lists, self.fidelity, self.lists, branches=tuple(branches), extra=True)
