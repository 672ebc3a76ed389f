"""GateSchedule: where the gate closes and which step, so which stage, each evaluation belongs to."""

import math

import pytest

from tgate import Action, GateSchedule, active_conds, plan_steps

PLAN, CAPTURE, FIDELITY = Action.COMPUTE, Action.CAPTURE, Action.REUSE  # the stages, as cross-attention sees them


def stage_of(schedule, sigma):
    """What cross-attention does in the evaluation at `sigma`: the stage of its step."""
    return plan_steps(schedule.num_steps, schedule.gate_step, None)[schedule.step_of(sigma)].cross_attention


def karras(n, sigma_min=0.03, sigma_max=14.6, rho=7.0):
    ramp = [i / (n - 1) for i in range(n)]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in ramp] + [0.0]


def test_gate_closes_after_the_leading_steps_at_or_above_the_gate_sigma():
    sigmas = [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 0.0]
    assert GateSchedule.from_sigmas(sigmas, 5.0).gate_step == 3
    assert GateSchedule.from_sigmas(sigmas, 6.0).gate_step == 3  # a step exactly at the gate still plans
    assert GateSchedule.from_sigmas(sigmas, 6.0001).gate_step == 3  # within the tolerance
    assert GateSchedule.from_sigmas(sigmas, 6.1).gate_step == 2


def test_gate_never_closes_before_the_first_step_and_not_at_all_at_sigma_zero():
    sigmas = karras(10)
    assert GateSchedule.from_sigmas(sigmas, 1e9).gate_step == 1  # gate_at 0.0
    never = GateSchedule.from_sigmas(sigmas, 0.0)  # gate_at 1.0
    assert never.gate_step == never.num_steps == 10 and not never.gates
    assert all(p.both_branches for p in plan_steps(never.num_steps, never.gate_step, None))


def test_stages_follow_the_steps():
    sigmas = karras(8)
    schedule = GateSchedule.from_sigmas(sigmas, sigmas[3] * 0.99)
    assert schedule.gate_step == 4
    stages = [stage_of(schedule, s) for s in sigmas[:-1]]
    assert stages == [PLAN] * 3 + [CAPTURE] + [FIDELITY] * 4


def test_evaluations_between_steps_belong_to_the_earlier_step():
    sigmas = [10.0, 8.0, 6.0, 4.0, 2.0, 0.0]
    schedule = GateSchedule.from_sigmas(sigmas, 7.0)  # steps 0, 1 plan; 1 captures
    midpoint = math.sqrt(8.0 * 6.0)  # dpm_2's intermediate evaluation of step 1
    assert schedule.step_of(midpoint) == 1 and stage_of(schedule, midpoint) is CAPTURE
    assert schedule.step_of(6.0) == 2 and stage_of(schedule, 6.0) is FIDELITY  # heun's second evaluation
    assert schedule.step_of(8.0 * (1 + 1e-6)) == 1  # read back a little high from the device
    assert schedule.step_of(50.0) == 0  # above the schedule
    assert schedule.step_of(0.001) == 4  # uni_pc's rewritten last sigma


def test_a_schedule_without_steps_never_gates():
    schedule = GateSchedule.from_sigmas([5.0], 1.0)
    assert schedule.num_steps == 0 and not schedule.gates


@pytest.mark.parametrize("n", [4, 25, 50])
def test_gate_step_is_monotonic_in_the_gate_sigma(n):
    sigmas = karras(n)
    steps = [GateSchedule.from_sigmas(sigmas, g).gate_step for g in sorted(sigmas[:-1], reverse=True)]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == n


def test_the_gate_moves_past_the_last_change_in_the_active_conds():
    sigmas = [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 0.0]
    schedule = GateSchedule.from_sigmas(sigmas, 7.0)
    assert schedule.gate_step == 2

    def settled(*ranges):
        return schedule.settled([active_conds(ranges, sigma) for sigma in schedule.sigmas]).gate_step

    always = (None, None)
    # A cond that ends at sigma 9 (active at step 0 alone) changes before the capture (step 1): the
    # gate stays ...
    assert settled(always, (None, 9.0)) == 2
    # ... one active at the capture (steps 0 and 1) but not after it moves it past its end.
    assert settled(always, (None, 7.0)) == 3
    # A prompt that starts at sigma 5 (step 3 on): the capture moves to step 3, the gate after it.
    assert settled(always, (5.0, None)) == 4
    # An area active from step 2 to step 3 only: the last change is at step 4.
    assert settled((6.0, 3.0), always) == 5
    # A cond that starts at the last step: no step is left to gate.
    assert settled(always, (1.5, None)) == schedule.num_steps
    # Facts of any kind: a layer shape that a patch changes until step 2.
    assert schedule.settled([(8, 8), (8, 8), (16, 16), (16, 16), (16, 16), (16, 16)]).gate_step == 3
