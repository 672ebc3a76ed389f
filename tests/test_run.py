"""GateRun and the three wrappers, driving a real torch denoiser the way ComfyUI batches conds."""

import uuid

import pytest
import torch

from engine_modules import OptionlessDenoiser, TinyDenoiser
from tgate import (
    CONFIG_KEY,
    CROSS,
    SELF,
    CallSlot,
    Evaluation,
    FidelityBranch,
    GatePatch,
    GateRun,
    GateSchedule,
    SelfAttentionReuse,
    TGateConfig,
    apply_model_with_gate,
    calc_cond_batch_with_gate,
    gated_attention,
    plan_steps,
    reduce_chunks,
    sample_with_gate,
)
from tgate_testkit.logs import RunLog

SIGMAS = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]


def make_cond(seed, tokens=3):
    g = torch.Generator().manual_seed(seed)
    return [{"uuid": uuid.uuid4(), "context": torch.randn(1, tokens, 6, generator=g)}]


LAYERS = {"blocks.0.attn2": CROSS, "blocks.1.attn2": CROSS}
V2_LAYERS = {**LAYERS, "blocks.0.attn1": SELF, "blocks.1.attn1": SELF}


SLOT = CallSlot()  # the slot of the tests that name none: one node application's, shared as ComfyUI shares it


def patched_denoiser(layers=LAYERS, slot=None):
    """TinyDenoiser with the T-GATE forward on `layers` (cross-attention only, as the simple node does);
    with a slot of its own, OptionlessDenoiser, whose attention gets no transformer_options."""
    model = TinyDenoiser() if slot is None else OptionlessDenoiser()
    slot = slot or SLOT
    for name, module in model.named_modules():
        if name in layers:
            module.forward = gated_attention(name, layers[name], module.forward, slot)
    return model


def gate_patch(config=None, slot=None):
    """What the node puts on a model; TinyDenoiser is text-to-image, so `auto` keeps uncond."""
    config = config or TGateConfig(gate_at=0.5)
    branch = FidelityBranch.UNCOND if config.fidelity_branch is FidelityBranch.AUTO else config.fidelity_branch
    return GatePatch(config, "tiny", branch, V2_LAYERS if config.self_attention else LAYERS, slot or SLOT)


def calc_cond_batch(model, conds, x_in, timestep, model_options, seen=None):
    """What ComfyUI's _calc_cond_batch does with the chunks, in brief: uncond first, one batch."""
    chunks = sorted(((i, c) for i, cond in enumerate(conds) if cond for c in cond), key=lambda t: -t[0])
    options = dict(model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = [i for i, _ in chunks]
    options["uuids"] = [c["uuid"] for _, c in chunks]
    x = torch.cat([x_in] * len(chunks))
    if seen is not None:
        seen.append(x.shape[0])
    context = torch.cat([c["context"] for _, c in chunks])

    def apply_model(x, t, c_concat, c_crossattn, control, transformer_options):  # BaseModel._apply_model's order
        return model(x, c_crossattn, transformer_options)

    outs = apply_model_with_gate(apply_model, x, timestep, None, context, None, options).chunk(len(chunks))
    results = [torch.zeros_like(x_in) for _ in conds]
    for (i, _), out in zip(chunks, outs, strict=True):
        results[i] = results[i] + out
    return results


def run_options(config=None, gate_sigma=3.5, sigmas=SIGMAS, slot=None):
    """A run in progress, as OUTER_SAMPLE starts it, and the model options its evaluations get."""
    patch = gate_patch(config, slot)
    run = patch.slot.run = GateRun(patch, GateSchedule.from_sigmas(sigmas, gate_sigma), patch.config.self_attention)
    return run, {"transformer_options": {CONFIG_KEY: patch}}


def test_the_run_matches_an_independent_computation_of_the_rule():
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    pos, neg = make_cond(1), make_cond(2)
    run, options = run_options()  # steps 0, 1 plan; 1 captures; 2, 3, 4 keep uncond alone
    seen, to_q = [], []
    for block in model.blocks:
        block.attn2.to_q.register_forward_pre_hook(lambda m, a: to_q.append(1))

    def executor(*args):
        return calc_cond_batch(*args, seen=seen)

    outputs = [calc_cond_batch_with_gate(executor, model, [pos, neg], x, torch.tensor([s]), options) for s in SIGMAS[:-1]]

    # Reference: plain modules, outputs at the capture step recorded by hooks and averaged by hand.
    reference = TinyDenoiser()
    recorded = {}
    hooks = [
        b.attn2.register_forward_hook(lambda m, a, o, i=i: recorded.__setitem__(i, o)) for i, b in enumerate(reference.blocks)
    ]
    full = calc_cond_batch(reference, [pos, neg], x, None, {})
    for h in hooks:
        h.remove()
    means = {i: (o[0:1] + o[1:2]) / 2 for i, o in recorded.items()}
    for i, b in enumerate(reference.blocks):
        b.attn2.register_forward_hook(lambda m, a, o, i=i: means[i])
    single = calc_cond_batch(reference, [None, neg], x, None, {})[1]

    for step in (0, 1):
        torch.testing.assert_close(outputs[step], full)
    for step in (2, 3, 4):
        assert outputs[step][0] is outputs[step][1]
        torch.testing.assert_close(outputs[step][1], single)
    assert seen == [2, 2, 1, 1, 1]
    assert len(to_q) == 2 * 2  # two full evaluations, two layers; none after the gate
    assert run.counts.single_branch_evaluations == 3 and run.store.layers(CROSS) == 2


def test_cond_branch_and_cfg1_keep_the_positive():
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    pos, neg = make_cond(1), make_cond(2)
    for conds, config in (
        ([pos, neg], TGateConfig(gate_at=0.5, fidelity_branch=FidelityBranch.COND)),
        ([pos, None], TGateConfig()),
    ):
        run, options = run_options(config)
        seen = []

        def executor(*args, seen=seen):
            return calc_cond_batch(*args, seen=seen)

        outs = [calc_cond_batch_with_gate(executor, model, conds, x, torch.tensor([s]), options) for s in SIGMAS[:-1]]
        assert seen[-1] == 1 and run.main.fidelity == 0
        assert outs[-1][0] is outs[-1][1]


@pytest.mark.parametrize("n_lists", [1, 3])
def test_extra_model_calls_pass_through_untouched(n_lists):
    run, options = run_options()
    received = []

    def executor(model, conds, x_in, timestep, model_options):
        received.append((conds, model_options))
        return ["out"] * len(conds)

    conds = [make_cond(i) for i in range(n_lists)]
    for sigma in SIGMAS[:-1]:
        calc_cond_batch_with_gate(executor, None, conds, None, torch.tensor([sigma]), options)
    assert all(c is conds and o is options for c, o in received)
    assert len(run.store) == 0


@pytest.mark.parametrize("branch", [FidelityBranch.UNCOND, FidelityBranch.COND])
def test_an_extra_evaluation_after_the_gate_runs_the_list_the_main_evaluation_ran(branch):
    """PAG passes the main evaluation's cond list, SAG its uncond list: after the gate either runs the
    fidelity branch's list, which the main evaluation ran alone, so an add-on's term (main output
    minus its own) compares outputs of the same inputs: with no perturbation, it is zero."""
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    pos, neg = make_cond(1), make_cond(2)
    run, options = run_options(TGateConfig(gate_at=0.5, fidelity_branch=branch))  # steps 0, 1 plan; 2, 3, 4 gated
    names, ran = {id(pos): "pos", id(neg): "neg"}, []

    def executor(model, conds, x_in, timestep, model_options):
        ran.append([names[id(c)] for c in conds if c])
        return calc_cond_batch(model, conds, x_in, timestep, model_options)

    terms = []
    for sigma in SIGMAS[:-1]:
        t = torch.tensor([sigma])
        main = calc_cond_batch_with_gate(executor, model, [pos, neg], x, t, options)
        for position, extra in enumerate((pos, neg)):
            (out,) = calc_cond_batch_with_gate(executor, model, [extra], x, t, options)
            terms.append((main[position] - out).abs().max().item())
    fidelity = "neg" if branch is FidelityBranch.UNCOND else "pos"
    before, after = [["pos", "neg"], ["pos"], ["neg"]] * 2, [[fidelity]] * 3 * 3
    assert ran == before + after
    assert terms[2 * 2 :] == [0.0] * (3 * 2)  # after the gate, bit for bit


def test_a_sampler_that_skips_the_capture_step_captures_at_the_first_step_past_the_gate():
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    run, options = run_options()
    seen = []

    def executor(*args):
        return calc_cond_batch(*args, seen=seen)

    for sigma in (5.0, 2.0, 1.0):  # step 1, the capture step, is never evaluated
        calc_cond_batch_with_gate(executor, model, [make_cond(1), make_cond(2)], x, torch.tensor([sigma]), options)
    assert seen == [2, 2, 1] and run.counts.late_capture and run.store.layers(CROSS) == 2


def test_when_no_layer_could_be_cached_guidance_stays_whole():
    model, x = TinyDenoiser(), torch.randn(1, 4, 8)  # no T-GATE forward: nothing is ever stored
    run, options = run_options()
    seen = []

    def executor(*args):
        return calc_cond_batch(*args, seen=seen)

    for sigma in SIGMAS[:-1]:
        calc_cond_batch_with_gate(executor, model, [make_cond(1), make_cond(2)], x, torch.tensor([sigma]), options)
    assert seen == [2] * 5 and run.counts.uncached_evaluations == 3


class Sampling:
    """The parts of a ComfyUI guider and its executor that OUTER_SAMPLE wrappers use."""

    class ModelSampling:
        @staticmethod
        def percent_to_sigma(percent):
            return 0.0 if percent >= 1.0 else 5.0 * (1.0 - percent)

    def __init__(self, config, body):
        self.class_obj = self
        self.model_options = {"transformer_options": {CONFIG_KEY: gate_patch(config, CallSlot())}}
        self.model_patcher = self
        self.body = body

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.ModelSampling()

    def __call__(self, noise, latent, sampler, sigmas, *rest):
        return self.body(self.model_options)


def test_each_run_gets_a_fresh_run_and_frees_it_even_when_cancelled():
    runs = []

    def body(options):
        run = options["transformer_options"][CONFIG_KEY].slot.run
        reduction = next(p for p in run.plans if p.mean_of_branches).reduction([0], 0)  # the gate's capture
        run.store.store("blocks.0.attn2", reduce_chunks(torch.ones(1, 2, 2), reduction), reduction, ["p"])
        run.store.finish_capture()
        assert run.store.nbytes > 0
        runs.append(run)
        raise KeyboardInterrupt  # ComfyUI's cancel is an exception raised mid-run

    sampling = Sampling(TGateConfig(), body)
    original = sampling.model_options
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            sample_with_gate(sampling, None, None, None, torch.tensor(SIGMAS))
        assert sampling.model_options is original and original["transformer_options"][CONFIG_KEY].slot.run is None
    assert runs[0] is not runs[1]
    assert all(len(r.store) == 0 and r.store.nbytes == 0 for r in runs)


def test_gate_at_one_leaves_the_run_alone():
    seen = []
    sampling = Sampling(TGateConfig(gate_at=1.0), lambda options: seen.append(options) or "done")
    assert sample_with_gate(sampling, None, None, None, torch.tensor(SIGMAS)) == "done"
    assert seen[0]["transformer_options"][CONFIG_KEY].slot.run is None


@pytest.mark.parametrize("bad", [dict(gate_at=-0.1), dict(gate_at=1.5), dict(cache_device="disk"), dict(fidelity_branch="both")])
def test_config_refuses_out_of_range_values_with_the_fix(bad):
    with pytest.raises(ValueError, match="must be"):
        TGateConfig(**bad)


def test_the_summary_names_the_branch_that_really_ran():
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    run, options = run_options()  # prefers uncond, but cfg 1.0 has none
    for sigma in SIGMAS[:-1]:
        calc_cond_batch_with_gate(calc_cond_batch, model, [make_cond(1), None], x, torch.tensor([sigma]), options)
    assert "ran the cond branch alone" in run.summary()


def test_a_model_call_without_its_chunk_layout_runs_unchanged():
    run, _ = run_options()
    seen = []

    def apply_model(x, t, c_concat, c_crossattn, control, transformer_options):
        seen.append(transformer_options)
        return x

    run.current = Evaluation(plan_steps(5, 2, None)[4], [], 1, 2)  # an evaluation after the gate
    options = {CONFIG_KEY: run.patch}  # no "uuids": a ComfyUI that changed
    apply_model_with_gate(apply_model, torch.zeros(1), None, None, None, None, options)
    assert seen == [options]


def test_a_capture_the_model_skipped_is_taken_again_at_the_next_evaluation():
    """EasyCache may skip the model call of the capture step: nothing reaches the attention
    modules, so the gate is not yet captured and the next evaluation captures instead."""
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    run, options = run_options()  # step 1 captures
    seen = []

    def skipping_executor(model, conds, x_in, timestep, model_options):
        if float(timestep) == 4.0:  # the capture step: a cached result, no model call
            seen.append("skipped")
            return [torch.zeros_like(x_in) for _ in conds]
        return calc_cond_batch(model, conds, x_in, timestep, model_options, seen=seen)

    for sigma in SIGMAS[:-1]:
        calc_cond_batch_with_gate(skipping_executor, model, [make_cond(1), make_cond(2)], x, torch.tensor([sigma]), options)
    assert seen == [2, "skipped", 2, 1, 1]
    assert run.counts.late_capture and run.store.layers(CROSS) == 2 and run.counts.uncached_evaluations == 0


def test_v2_reuses_self_attention_and_frees_it_once_no_later_step_reads_it():
    sigmas = [12.0 - i for i in range(12)] + [0.0]
    config = TGateConfig(gate_at=0.5, self_attention=SelfAttentionReuse(warm_up=2, sp_interval=5, fi_interval=1))
    run, options = run_options(config, gate_sigma=6.5, sigmas=sigmas)  # gate after step 6: 5 is the gate's capture
    model, x = patched_denoiser(V2_LAYERS), torch.randn(1, 4, 8)
    self_q = []
    for block in model.blocks:
        block.attn1.to_q.register_forward_pre_hook(lambda m, a: self_q.append(a[0].shape[0]))
    held, conds = [], [make_cond(1), make_cond(2)]  # the same conds (uuids) all run long, as in ComfyUI
    for sigma in sigmas[:-1]:
        calc_cond_batch_with_gate(calc_cond_batch, model, conds, x, torch.tensor([sigma]), options)
        held.append(run.store.holds(SELF))
    # Steps 0, 1 compute, 2 keeps, 3 and 4 reuse, 5 (the gate's capture) and after compute.
    assert self_q == [2, 2] * 4 + [1, 1] * 6  # two layers; two branches until the gate
    assert held == [False, False, True, True, False] + [False] * 7
    assert run.counts.self_attention_reuses == 2 and run.counts.peak_cache_bytes > run.store.nbytes > 0


def test_modules_called_without_transformer_options_get_their_table_through_the_slot():
    sigmas = [12.0 - i for i in range(12)] + [0.0]
    config = TGateConfig(gate_at=0.5, self_attention=SelfAttentionReuse(warm_up=1, sp_interval=2, fi_interval=2))
    x, outputs = torch.randn(1, 4, 8), {}
    for route, slot in (("options", None), ("slot", CallSlot())):  # a model that passes transformer_options, one that does not
        run, options = run_options(config, gate_sigma=6.5, sigmas=sigmas, slot=slot)
        model = patched_denoiser(V2_LAYERS, slot)
        q = []
        for block in model.blocks:
            block.attn1.to_q.register_forward_pre_hook(lambda m, a, q=q: q.append("self"))
            block.attn2.to_q.register_forward_pre_hook(lambda m, a, q=q: q.append("cross"))
        conds = [make_cond(1), make_cond(2)]
        outputs[route] = [
            calc_cond_batch_with_gate(calc_cond_batch, model, conds, x, torch.tensor([s]), options)[1] for s in sigmas[:-1]
        ]
        assert q.count("cross") == 6 * 2 and q.count("self") < 12 * 2, route  # T-GATE acted on both kinds
        assert slot is None or slot.call is None  # the slot is emptied after every call
    for a, b in zip(outputs["options"], outputs["slot"], strict=True):
        assert torch.equal(a, b)


def test_steps_after_the_gate_reuse_one_table_and_build_nothing():
    """Only a capture changes what a run keeps: each model call after the gate gets the same table."""
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    run, options = run_options()
    tables = []
    model_call = run.model_call

    def recording_model_call(*args):
        call = model_call(*args)
        tables.append(call.reuse)
        return call

    run.model_call = recording_model_call
    conds = [make_cond(1), make_cond(2)]
    for sigma in SIGMAS[:-1]:
        calc_cond_batch_with_gate(calc_cond_batch, model, conds, x, torch.tensor([sigma]), options)
    after_gate = tables[1:]  # the capture call, then the three calls after the gate
    assert len(after_gate) == 3 and all(t is after_gate[0] for t in after_gate) and after_gate[0]


class InterruptProcessingException(Exception):
    """Named as ComfyUI's cancel (comfy.model_management), which the engine knows by name alone."""


@pytest.mark.parametrize(
    "error, ended",
    [
        (KeyboardInterrupt(), "was cancelled"),
        (InterruptProcessingException(), "was cancelled"),
        (RuntimeError("out of memory"), "failed (RuntimeError)"),
        (ValueError("bad shape"), "failed (ValueError)"),
    ],
)
def test_a_stopped_run_says_whether_it_was_cancelled_or_failed_and_with_what(error, ended):
    model, x = patched_denoiser(), torch.randn(1, 4, 8)

    def body(options):
        for sigma in SIGMAS[:4]:  # steps 0 to 3: gate_at 0.4 is sigma 3.0 here, after step 3
            calc_cond_batch_with_gate(calc_cond_batch, model, [make_cond(1), make_cond(2)], x, torch.tensor([sigma]), options)
        raise error

    with RunLog().on() as log, pytest.raises(type(error)):
        sample_with_gate(Sampling(TGateConfig(), body), None, None, None, torch.tensor(SIGMAS))
    ((record, run),) = log.summaries()
    assert f"T-GATE: the run {ended} at step 4 of 5, the gate being after step 3" in record.getMessage()
    assert "cancelled or failed" not in record.getMessage()
    assert record.levelname == "WARNING"
    assert run["stop"] == ended.removeprefix("was ") and run["stopped_at_step"] == 3


def test_the_summary_gives_the_evaluations_saved_and_the_seconds_per_step_on_each_side_of_the_gate(monkeypatch):
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    run, options = run_options()  # 5 steps, the gate after step 2
    # The host clock at each evaluation's sigma read: steps 0 and 1 take 1 s, 2 and 3 take 0.5 s; step 0
    # is evaluated twice (a second evaluation of a step is not a new mark); the last step has no end mark.
    marks = iter([10.0, 10.4, 11.0, 12.0, 12.5, 13.0])
    monkeypatch.setattr("tgate.clock.perf_counter", lambda: next(marks))
    for sigma in (5.0, 5.0, 4.0, 3.0, 2.0, 1.0):
        calc_cond_batch_with_gate(calc_cond_batch, model, [make_cond(1), make_cond(2)], x, torch.tensor([sigma]), options)
    stats = run.stats().as_dict()
    assert stats["seconds_per_step_before_gate"] == pytest.approx(1.0)
    assert stats["seconds_per_step_after_gate"] == pytest.approx(0.5)
    assert stats["branch_evaluations"] == 12 and stats["saved_branch_evaluations"] == 3
    assert stats["single_branch_evaluations"] == 3  # the fields the benchmark reads are still there
    summary = run.summary()
    assert summary.startswith("T-GATE: 2 of 5 steps planned with text, then 3 evaluations ran the uncond branch alone")
    assert "; 3 of 12 CFG branch evaluations saved; 1 s per step before the gate and 0.5 s per step after the gate" in summary
    with pytest.raises(StopIteration):
        next(marks)  # one clock read per evaluation, nothing more


def test_cfg_one_saves_no_branch_evaluation_and_a_run_without_timed_steps_says_no_time():
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    run, options = run_options()
    calc_cond_batch_with_gate(calc_cond_batch, model, [make_cond(1), None], x, torch.tensor([5.0]), options)
    assert run.stats().seconds_per_step_before_gate is None and "s per step" not in run.summary()
    for sigma in SIGMAS[1:-1]:
        calc_cond_batch_with_gate(calc_cond_batch, model, [make_cond(1), None], x, torch.tensor([sigma]), options)
    assert run.stats().saved_branch_evaluations == 0 and "; 0 of 5 CFG branch evaluations saved" in run.summary()


def test_listeners_get_each_runs_stats_and_one_that_raises_is_skipped():
    from tgate import RunStats, add_run_listener, remove_run_listener

    got = []

    def broken(stats):
        raise RuntimeError("a listener broke")

    for listener in (broken, got.append):
        add_run_listener(listener)
    try:
        assert sample_with_gate(Sampling(TGateConfig(), lambda options: "done"), None, None, None, torch.tensor(SIGMAS)) == "done"
    finally:
        for listener in (broken, got.append):
            remove_run_listener(listener)
    (stats,) = got
    assert isinstance(stats, RunStats) and stats.num_steps == 5 and stats.gate_step == 3 and stats.stop is None
    assert stats.summary.startswith("T-GATE: 3 of 5 steps planned with text") and stats.as_dict()["num_steps"] == 5


@pytest.mark.parametrize("branch", [FidelityBranch.UNCOND, FidelityBranch.COND])
def test_evaluations_that_run_one_branch_each_never_come_back_empty(branch):
    """A guidance node that evaluates [cond, None] and then [None, uncond] at every step: after the
    gate each call runs the branch it has (never nothing, which ComfyUI would return as zeros)."""
    model, x = patched_denoiser(), torch.randn(1, 4, 8)
    pos, neg = make_cond(1), make_cond(2)
    run, options = run_options(TGateConfig(gate_at=0.5, fidelity_branch=branch))

    def executor(model, conds, x_in, timestep, model_options):
        return calc_cond_batch(model, conds, x_in, timestep, model_options)

    try:
        for sigma in SIGMAS[:-1]:
            t = torch.tensor([sigma])
            cond_out = calc_cond_batch_with_gate(executor, model, [pos, None], x, t, options)[0]
            uncond_out = calc_cond_batch_with_gate(executor, model, [None, neg], x, t, options)[1]
            assert cond_out.abs().sum() > 0 and uncond_out.abs().sum() > 0, sigma
    finally:
        run.close()
    assert run.counts.single_branch_evaluations > 0
