"""T-GATE under torch.compile, on a real torch model driven through the engine's wrappers.

The compiled model must give the eager result, compile at most one graph per distinct step plan
(plan, capture, replay for V1; a few more with V2's self-attention reuse) and nothing at all on the
next run with the same shapes: every decision is taken in the wrappers, outside the compiled
region, which sees only plain tables of tensors.
"""

import pytest
import torch
from test_run import LAYERS, SIGMAS, V2_LAYERS, calc_cond_batch, make_cond, patched_denoiser, run_options

torch._dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

from tgate import CallSlot, SelfAttentionReuse, TGateConfig, calc_cond_batch_with_gate  # noqa: E402

BACKENDS = ["aot_eager", "inductor"]
LONG_SIGMAS = [12.0 - i for i in range(12)] + [0.0]  # 12 steps
V2_SETTINGS = {
    "official": SelfAttentionReuse(warm_up=2, sp_interval=5, fi_interval=1),
    "fi_interval_2": SelfAttentionReuse(warm_up=1, sp_interval=2, fi_interval=2),
}


def sample(model, x, conds, config=None, sigmas=SIGMAS, gate_sigma=3.5, slot=None):
    """One T-GATE run (a fresh GateRun, as OUTER_SAMPLE builds) of euler steps over `sigmas`."""
    run, options = run_options(config, gate_sigma=gate_sigma, sigmas=sigmas, slot=slot)
    outputs = []
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:], strict=True):
        out = calc_cond_batch_with_gate(calc_cond_batch, model, conds, x, torch.tensor([sigma]), options)
        denoised = out[1] + (out[0] - out[1]) * 5.0
        x = x + (x - denoised) / sigma * (next_sigma - sigma)
        outputs.append(x)
    return torch.stack(outputs), run


def compiled_against_eager(backend, layers, slot=None, **settings):
    torch._dynamo.reset()
    counters.clear()
    eager_slot = None if slot is None else CallSlot()
    settings_eager = {**settings, "slot": eager_slot}
    settings = {**settings, "slot": slot}
    eager_model = patched_denoiser(layers, eager_slot)
    self_q = []  # self-attention q projections of the eager run
    for block in eager_model.blocks:
        block.attn1.to_q.register_forward_pre_hook(lambda m, a: self_q.append(1))
    compiled = torch.compile(patched_denoiser(layers, slot), backend=backend, fullgraph=True)  # fullgraph: no graph break allowed
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        expected, _ = sample(eager_model, x, [make_cond(1), make_cond(2)], **settings_eager)
        got, run = sample(compiled, x, [make_cond(1), make_cond(2)], **settings)
        graphs_first_run = counters["stats"]["unique_graphs"]
        again, _ = sample(compiled, x, [make_cond(1), make_cond(2)], **settings)  # new run, new cond objects
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, rel
    assert torch.equal(got, again)
    assert counters["stats"]["unique_graphs"] == graphs_first_run, "the second run recompiled"
    return run, graphs_first_run, len(self_q) // len(eager_model.blocks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_equals_eager_with_one_graph_per_stage_and_no_recompile(backend):
    run, graphs, _ = compiled_against_eager(backend, LAYERS)
    assert run.counts.single_branch_evaluations == 3  # the compiled run did gate
    assert graphs <= 3, f"{graphs} graphs for plan, capture and replay"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", sorted(V2_SETTINGS))
@pytest.mark.parametrize("model", ["with_transformer_options", "without_transformer_options"])
def test_v2_compiles_at_most_one_graph_per_distinct_step_plan(backend, setting, model):
    config = TGateConfig(gate_at=0.5, self_attention=V2_SETTINGS[setting])
    slot = CallSlot() if model == "without_transformer_options" else None  # see test_run.patched_denoiser
    run, graphs, self_computed = compiled_against_eager(
        backend, V2_LAYERS, slot, config=config, sigmas=LONG_SIGMAS, gate_sigma=6.5
    )
    assert run.schedule.gate_step == 6 and run.counts.single_branch_evaluations == 6
    reused_steps = sum(p.self_attention.value == "reuse" for p in run.plans)
    assert reused_steps > 0 and self_computed == len(run.plans) - reused_steps  # the eager run reused
    distinct = len(set(run.plans))
    assert graphs <= distinct, f"{graphs} graphs for {distinct} distinct step plans"
    if setting == "official":
        assert distinct == 5  # plain, keep self, reuse self, the gate, after the gate
