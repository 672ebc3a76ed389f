"""T-GATE under torch.compile, on a real torch model driven through the engine's wrappers.

The compiled model must give the eager result, compile one graph per stage (plan, capture,
replay) and nothing at all on the next run with the same shapes: every decision is taken in the
wrappers, outside the compiled region, which sees only plain tables of tensors.
"""

import pytest
import torch
from test_run import SIGMAS, calc_cond_batch, make_cond, patched_denoiser, run_options

torch._dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

from tgate import calc_cond_batch_with_gate  # noqa: E402

BACKENDS = ["aot_eager", "inductor"]


def sample(model, x, conds):
    """One T-GATE run (a fresh GateRun, as OUTER_SAMPLE builds) of euler steps over SIGMAS."""
    run, options = run_options()
    outputs = []
    for sigma, next_sigma in zip(SIGMAS[:-1], SIGMAS[1:], strict=True):
        out = calc_cond_batch_with_gate(calc_cond_batch, model, conds, x, torch.tensor([sigma]), options)
        denoised = out[1] + (out[0] - out[1]) * 5.0
        x = x + (x - denoised) / sigma * (next_sigma - sigma)
        outputs.append(x)
    return torch.stack(outputs), run


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_equals_eager_with_one_graph_per_stage_and_no_recompile(backend):
    torch._dynamo.reset()
    counters.clear()
    eager_model = patched_denoiser()
    compiled = torch.compile(patched_denoiser(), backend=backend, fullgraph=True)  # fullgraph: no graph break allowed
    x = torch.randn(1, 4, 8)
    conds = [make_cond(1), make_cond(2)]
    with torch.no_grad():
        expected, _ = sample(eager_model, x, conds)
        got, run = sample(compiled, x, conds)
        assert run.single_branch_evaluations == 3  # the compiled run did gate
        graphs_first_run = counters["stats"]["unique_graphs"]
        again, _ = sample(compiled, x, [make_cond(1), make_cond(2)])  # new run, new cond objects
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, rel
    assert torch.equal(got, again)
    assert graphs_first_run <= 3, f"{graphs_first_run} graphs for plan, capture and replay"
    assert counters["stats"]["unique_graphs"] == graphs_first_run, "the second run recompiled"
