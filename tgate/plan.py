"""What each step of a run does with each kind of attention: the official `tgate_scheduler`.

One pure function of plain numbers, tested without a model. Steps are the run's own indices
(0-based; see schedule.py for how sigmas map to them), `gate_step` the first step after the gate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from .config import SelfAttentionReuse
from .families import KINDS


class Action(enum.Enum):
    COMPUTE = "compute"  # the module runs as usual
    CAPTURE = "capture"  # the module runs and its output is kept for later steps
    REUSE = "reuse"  # the module returns the kept output and computes nothing


@dataclass(frozen=True)
class StepPlan:
    # One field per attention kind, named as the kinds in families.py.
    cross_attention: Action
    self_attention: Action
    both_branches: bool  # False: classifier-free guidance runs the fidelity branch alone
    mean_of_branches: bool = False  # captures keep the mean of the two branches (the last step before the gate)

    def action(self, kind: str) -> Action:
        return getattr(self, kind)

    def kinds(self, action: Action) -> frozenset[str]:
        return frozenset(k for k in KINDS if self.action(k) is action)

    @property
    def is_plain(self) -> bool:
        """The model runs unchanged: nothing kept, nothing reused, both branches."""
        return self.both_branches and not self.kinds(Action.CAPTURE) and not self.kinds(Action.REUSE)


def plan_steps(num_steps: int, gate_step: int, reuse: SelfAttentionReuse | None) -> tuple[StepPlan, ...]:
    """The plan of every step of a run; `reuse` None leaves self-attention alone (T-GATE V1).

    The official rule, step by step (HaozheLiu-ST/T-GATE, tgate_utils.py `tgate_scheduler`):
    - before the last planning step: cross-attention computed; self-attention computed while
      step < warm_up, kept at step == warm_up, then kept when step % sp_interval == 0 (the absolute
      step) and reused otherwise;
    - the last planning step (gate_step - 1): both kept, as the mean of the two branches;
    - after it: cross-attention reused, one branch; self-attention kept when step % fi_interval == 0
      and reused otherwise.
    A self-attention capture that no later step reads is only a compute, so sp_interval =
    fi_interval = 1 costs what V1 costs and gives V1's output exactly.
    """
    plans = [_official_step(step, gate_step, reuse) for step in range(num_steps)]
    read_later = False
    for step in reversed(range(num_steps)):
        action = plans[step].self_attention
        if action is Action.REUSE:
            read_later = True
        elif action is Action.CAPTURE:
            if not read_later:
                plans[step] = replace(plans[step], self_attention=Action.COMPUTE)
            read_later = False
    return tuple(plans)


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
