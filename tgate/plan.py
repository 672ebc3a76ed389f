"""What each step of a run does with each kind of reuse (cross-attention, self-attention, DeepCache's
deep blocks) and which CFG branches run.

The one owner of that decision. `plan_steps` is the official `tgate_scheduler` (what every step
does when every step is evaluated and every capture keeps something); `plan_step` is what one
evaluation does, from that and the facts the run has seen (what it keeps). The run carries the
answer out and never rewrites it. Pure functions of plain values, tested without a model. Steps
are the run's own indices (0-based; see schedule.py for how sigmas map to them), `gate_step` the
first step after the gate.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .config import SelfAttentionReuse
from .families import DEEP, REUSE_KINDS, SELF
from .store import ChunkReduction


class Action(enum.Enum):
    COMPUTE = "compute"  # the module runs as usual
    CAPTURE = "capture"  # the module runs and its output is kept for later steps
    REUSE = "reuse"  # the module returns the kept output and computes nothing


@dataclass(frozen=True)
class StepPlan:
    # One field per kind of reuse, named as the kinds in families.py.
    cross_attention: Action
    self_attention: Action
    both_branches: bool  # False: classifier-free guidance runs the fidelity branch alone
    mean_of_branches: bool = False  # captures keep the mean of the two branches (the last step before the gate)
    # DeepCache: CAPTURE is a refresh (every block runs, the deep blocks' output is kept), REUSE
    # skips the deep blocks. Never CAPTURE with mean_of_branches (the gate always refreshes).
    deep_blocks: Action = Action.COMPUTE
    # Kinds whose kept outputs no later step reads: freed after the evaluation. Not part of what a
    # model call sees, so not of equality: plans that differ only here run (and compile) alike.
    free_after: frozenset[str] = field(default=frozenset(), compare=False)

    def action(self, kind: str) -> Action:
        return getattr(self, kind)

    def kinds(self, action: Action) -> frozenset[str]:
        return frozenset(k for k in REUSE_KINDS if self.action(k) is action)

    @property
    def is_plain(self) -> bool:
        """The model runs unchanged: nothing kept, nothing reused, both branches."""
        return self.both_branches and not self.kinds(Action.CAPTURE) and not self.kinds(Action.REUSE)

    def reduction(self, branches: Sequence[int], fidelity: int, lists: int = 2, own: bool = False) -> ChunkReduction | None:
        """How a capture reduces one model call whose chunks belong to `branches` (ComfyUI's
        cond_or_uncond), the run's fidelity branch being `fidelity`, in an evaluation of `lists`
        cond lists; None when nothing is kept. `own`: the gate keeps the fidelity branch's own
        outputs instead of the mean of the branches (a joint-attention family's text stream)."""
        if not self.kinds(Action.CAPTURE):
            return None
        if not self.mean_of_branches:
            return ChunkReduction(len(branches), tuple(range(len(branches))), (), False)
        stored = tuple(i for i, b in enumerate(branches) if b == fidelity)
        if own:
            return ChunkReduction(len(branches), stored, (), False)
        mixed_in = tuple(i for i, b in enumerate(branches) if b != fidelity)
        return ChunkReduction(len(branches), stored, mixed_in, True, chunk_mean=lists > 2)


@dataclass(frozen=True)
class Kept:
    """What a run keeps when an evaluation starts, per kind: the run-time facts its plan depends on.

    A capture can keep nothing: the sampler never evaluated its step (dpm_fast and dpm_adaptive pick
    their own sigmas), EasyCache skipped the model call, or other packs' attn2 patches replace every
    layer."""

    cross_attention: bool = False
    self_attention: bool = False
    deep_blocks: bool = False


def plan_step(plans: Sequence[StepPlan], step: int, kept: Kept) -> StepPlan:
    """What an evaluation at `step` does: `plans[step]` (see plan_steps), unless what it reuses was
    never kept:
    - cross-attention to reuse but none kept: the gate's capture, late (and, until a capture keeps
      something, evaluations past the gate keep both branches);
    - self-attention to reuse but none kept: captured now;
    - deep blocks to reuse but none kept: refreshed now (a late gate capture computes them, and the
      run drops what they kept, since its reduction is the mean of the branches).
    """
    plan = plans[step]
    if plan.cross_attention is Action.REUSE and not kept.cross_attention:
        plan = replace(next(p for p in plans if p.mean_of_branches), free_after=plan.free_after)
    if plan.self_attention is Action.REUSE and not kept.self_attention:
        plan = replace(plan, self_attention=Action.CAPTURE)
    if plan.deep_blocks is Action.REUSE and not kept.deep_blocks:
        plan = replace(plan, deep_blocks=Action.CAPTURE)
    return plan


def extra_evaluation_plan(plan: StepPlan, kept: Kept) -> StepPlan | None:
    """What an evaluation other than the main CFG one does (PAG's perturbed call, SAG's blurred call,
    SLG's: one cond list) at a step whose main evaluation was planned `plan`: where that one reuses
    cross-attention, this one gets the same kept output, the mean of the two branches, which is the
    same for either of them; it captures nothing and computes self-attention (what these guidances
    perturb). None: it runs as usual.
    """
    if plan.cross_attention is Action.REUSE and kept.cross_attention:
        return StepPlan(Action.REUSE, Action.COMPUTE, both_branches=True)
    return None


def plan_steps(num_steps: int, gate_step: int, reuse: SelfAttentionReuse | None, deep_interval: int = 1) -> tuple[StepPlan, ...]:
    """The plan of every step of a run; `reuse` None leaves self-attention alone (T-GATE V1);
    `deep_interval` is DeepCache's cache_interval (1: every block runs at every step, see
    deep_block_actions). A run that never gates (gate_step == num_steps, DeepCache alone) plans
    cross- and self-attention computed and both branches at every step.

    The official rule, step by step (HaozheLiu-ST/T-GATE, tgate_utils.py `tgate_scheduler`):
    - before the last planning step: cross-attention computed; self-attention computed while
      step < warm_up, kept at step == warm_up, then kept when step % sp_interval == 0 (the absolute
      step) and reused otherwise;
    - the last planning step (gate_step - 1): both kept, as the mean of the two branches;
    - after it: cross-attention reused, one branch; self-attention kept when step % fi_interval == 0
      and reused otherwise.
    A self-attention capture that no later step reads is only a compute, so sp_interval =
    fi_interval = 1 costs what V1 costs and gives V1's output exactly. Self-attention outputs are
    freed from the last step that reuses them on (official SDXL: at the gate).
    """
    if gate_step < num_steps:
        plans = [_official_step(step, gate_step, reuse) for step in range(num_steps)]
    else:
        plans = [StepPlan(Action.COMPUTE, Action.COMPUTE, both_branches=True) for _ in range(num_steps)]
    deep = deep_block_actions(num_steps, gate_step, deep_interval)
    plans = [replace(p, deep_blocks=d) for p, d in zip(plans, deep, strict=True)]
    for kind in (SELF, DEEP):
        _compute_unread_captures(plans, kind)
    for kind in (SELF, DEEP):
        last_reuse = max((i for i, p in enumerate(plans) if p.action(kind) is Action.REUSE), default=num_steps)
        plans[last_reuse:] = [replace(p, free_after=p.free_after | {kind}) for p in plans[last_reuse:]]
    return tuple(plans)


def deep_block_actions(num_steps: int, gate_step: int, interval: int) -> list[Action]:
    """DeepCache's schedule in the official T-GATE combination (HaozheLiu-ST/T-GATE SD_DeepCache.py,
    SDXL_DeepCache.py, with horseee/DeepCache's DeepCacheSDHelper): a step refreshes (CAPTURE) when
    (step - start) % interval == 0 and reuses otherwise, `start` being 0, then the last step before
    the gate, then the gate (the official code disables and re-enables DeepCache at both, as the
    batch changes there from two branches to one), so both of those refresh. Captures no later step
    reads are made computes by plan_steps: interval 1 computes every step.
    """
    starts = [0] + ([gate_step - 1, gate_step] if gate_step < num_steps else [])
    actions = []
    for step in range(num_steps):
        start = max(s for s in starts if s <= step)
        actions.append(Action.CAPTURE if (step - start) % interval == 0 else Action.REUSE)
    return actions


def _compute_unread_captures(plans: list[StepPlan], kind: str) -> None:
    """A capture of `kind` that no later step reads before the next capture is only a compute."""
    read_later = False
    for step in reversed(range(len(plans))):
        action = plans[step].action(kind)
        if action is Action.REUSE:
            read_later = True
        elif action is Action.CAPTURE:
            if not read_later:
                plans[step] = replace(plans[step], **{kind: Action.COMPUTE})
            read_later = False


def _official_step(step: int, gate_step: int, reuse: SelfAttentionReuse | None) -> StepPlan:
    if step < gate_step - 1:
        if reuse is None or step < reuse.warm_up:
            self_attention = Action.COMPUTE
        elif step == reuse.warm_up or step % reuse.sp_interval == 0:
            self_attention = Action.CAPTURE
        else:
            self_attention = Action.REUSE
        return StepPlan(Action.COMPUTE, self_attention, both_branches=True)
    if step == gate_step - 1:
        self_attention = Action.COMPUTE if reuse is None else Action.CAPTURE
        return StepPlan(Action.CAPTURE, self_attention, both_branches=True, mean_of_branches=True)
    if reuse is None:
        self_attention = Action.COMPUTE
    else:
        self_attention = Action.CAPTURE if step % reuse.fi_interval == 0 else Action.REUSE
    return StepPlan(Action.REUSE, self_attention, both_branches=False)
