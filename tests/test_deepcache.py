"""DeepCache with T-GATE against an independent computation of the official combination.

The rule (HaozheLiu-ST/T-GATE `SD_DeepCache.py` / `SDXL_DeepCache.py` with horseee/DeepCache's
`DeepCacheSDHelper`), restated in `refreshes` below on the run's own 0-based steps: with branch b
(`cache_branch_id`) the UNet's `input_blocks[0..b]` and `output_blocks[-(b+1):]` run at every step;
a step refreshes when (step - start) % interval == 0, `start` being 0, then the last step before
the gate, then the gate (the official code disables and re-enables DeepCache at both); on any
other step the output of `output_blocks[-(b+2)]` is the one of the last refresh. T-GATE's own rule
(cross-attention mean at the step before the gate, reused after it, one branch after the gate) is
test_reference_v2.py's, with self-attention computed at every step (the official combination's
sp_interval 1).

The reference drives ComfyUI's model directly with its own euler loop and classifier-free guidance
(test_reference_v2.py's) and realises DeepCache with one torch forward hook: ComfyUI's
`forward_timestep_embed` calls a block's children one by one, so a block's output is its last
child's, and the hook on that child keeps it on refresh steps and swaps the kept tensor in on the
others (every block still computes there; the count tests check that the node's do not).
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from test_reference_v2 import CFG, AttentionHooks, attention_modules, cross_attention_action, rel, schedule

from tgate import Action, plan_steps
from tgate_testkit.logs import RunLog
from tgate_testkit.recorders import SyncCounter

# SD1.5's shape at tiny width: two res blocks per level, so three input and three output blocks per
# level as in SD1.5 and SDXL (DeepCache's (block, layer) numbering), and a middle block.
TINY_SD15_TWO_RES_BLOCKS = dict(
    num_res_blocks=[2, 2],
    transformer_depth=[1, 1, 1, 1],
    transformer_depth_output=[1, 1, 1, 1, 1, 1],
)
STEPS = 25
SETTINGS = {
    "official": dict(gate_at=0.4, interval=3, branch=0),  # gate 10 of 25
    "interval2_branch2": dict(gate_at=0.44, interval=2, branch=2),  # gate 11 of 25
}
EXPECTED_GATE_STEP = {"official": 10, "interval2_branch2": 11}
# The refresh steps the rule gives, written out by hand ("k" refresh, "r" reuse).
EXPECTED_REFRESHES = {
    "official": "krrkrrkrrk" + "krrkrrkrrkrrkrr",
    "interval2_branch2": "krkrkrkrkrk" + "krkrkrkrkrkrkr",
}


def refreshes(steps, gate_step, interval):
    """The official rule, independently of the engine: True where a step refreshes."""
    out = []
    for step in range(steps):
        start = max(s for s in (0, gate_step - 1, gate_step) if s <= step)
        out.append((step - start) % interval == 0)
    return out


@pytest.fixture(scope="module")
def sd15_two(comfy):
    from tgate_testkit.models import ARCHITECTURES, build_model

    return build_model("tiny-sd15", seed=3, unet={**ARCHITECTURES["tiny-sd15"].unet, **TINY_SD15_TWO_RES_BLOCKS})


def kept_block_child(patcher, branch):
    """The last child of output_blocks[-(branch+2)]: its output is the block's."""
    outputs = patcher.model.diffusion_model.output_blocks
    return outputs[len(outputs) - (branch + 2)][-1]


class KeptBlockHook:
    def __init__(self, module):
        self.refresh, self.kept = True, None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.refresh:
            self.kept = output.clone()
            return None
        assert self.kept.shape == output.shape, (self.kept.shape, output.shape)
        return self.kept


def reference_tgate_deepcache(patcher, positive, negative, *, steps, gate_at, interval, branch, seed, pooled=False):
    """(the denoised output of every step, gate_step) of T-GATE with DeepCache, computed with hooks."""
    import comfy.sample as sample

    base = patcher.model
    device = next(base.diffusion_model.parameters()).device
    sigmas, gate_step = schedule(patcher, steps, gate_at)
    sigmas = sigmas.to(device)
    model_sampling = patcher.get_model_object("model_sampling")
    latent = torch.zeros(1, 4, 16, 16)
    noise = sample.prepare_noise(latent, seed)
    x = model_sampling.noise_scaling(sigmas[0], noise.to(device), latent.to(device), max_denoise=True)
    uncond_ctx, cond_ctx = negative[0][0].to(device), positive[0][0].to(device)

    def pooled_y(cond):
        return base.encode_adm(**cond[0][1]).to(device)

    cross = AttentionHooks(attention_modules(patcher, "attn2"))
    deep = KeptBlockHook(kept_block_child(patcher, branch))
    refresh = refreshes(steps, gate_step, interval)
    denoised_steps = []
    try:
        for i in range(steps):
            cross.action = cross_attention_action(i, gate_step)
            deep.refresh = refresh[i]
            sigma = sigmas[i : i + 1]
            if i < gate_step:
                extra = {"y": torch.cat([pooled_y(negative), pooled_y(positive)])} if pooled else {}
                out = base.apply_model(torch.cat([x, x]), sigma.repeat(2), c_crossattn=torch.cat([uncond_ctx, cond_ctx]), **extra)
                uncond, cond = out.chunk(2)
                denoised = uncond + (cond - uncond) * CFG
            else:
                extra = {"y": pooled_y(negative)} if pooled else {}
                denoised = base.apply_model(x, sigma, c_crossattn=uncond_ctx, **extra)
            denoised_steps.append(denoised.cpu())
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    finally:
        cross.remove()
        deep.handle.remove()
    return denoised_steps, gate_step


def node_steps(comfy, model, positive, negative, steps, seed=5):
    """(the denoised output of every step, the final latent) of sampling `model` with euler."""
    denoised = []
    out = comfy.sample(
        model, positive, negative, steps=steps, cfg=CFG, seed=seed, callback=lambda i, x0, x, n: denoised.append(x0.cpu())
    )
    return denoised, out


def deepcache(comfy, patcher, gate_at, interval, branch, **settings):
    """The advanced node at the official combination: self-attention computed at every step."""
    return comfy.tgate_advanced(
        patcher,
        gate_at=gate_at,
        sp_interval=1,
        fi_interval=1,
        deepcache_interval=interval,
        deepcache_branch=branch,
        **settings,
    )


# -- the plan ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_engine_plans_the_rule(name):
    s = SETTINGS[name]
    gate_step = EXPECTED_GATE_STEP[name]
    expected = EXPECTED_REFRESHES[name]
    assert "".join("k" if r else "r" for r in refreshes(STEPS, gate_step, s["interval"])) == expected
    plans = plan_steps(STEPS, gate_step, None, s["interval"])
    # The engine computes (rather than keeps) where nothing reads the capture: the step before the
    # gate, always followed by the gate's refresh. Every other refresh is a capture.
    got = "".join("r" if p.deep_blocks is Action.REUSE else "k" for p in plans)
    assert got == expected
    assert plans[gate_step - 1].deep_blocks is Action.COMPUTE and plans[gate_step].deep_blocks is Action.CAPTURE
    assert not any(p.mean_of_branches and p.deep_blocks is Action.CAPTURE for p in plans)


def test_the_official_setting_refreshes_nine_of_twenty_five_steps():
    plans = plan_steps(25, 10, None, 3)
    assert sum(p.deep_blocks is not Action.REUSE for p in plans) == 9


def test_interval_one_plans_nothing_new():
    for gate in (1, 10, 24, 25):
        assert plan_steps(25, gate, None, 1) == plan_steps(25, gate, None)
        assert all(p.deep_blocks is Action.COMPUTE for p in plan_steps(25, gate, None, 1))


def test_a_run_that_never_gates_plans_deepcache_alone():
    plans = plan_steps(9, 9, None, 3)
    assert "".join("r" if p.deep_blocks is Action.REUSE else "k" for p in plans) == "krrkrrkrr"
    assert all(p.both_branches and p.cross_attention is Action.COMPUTE for p in plans)


def test_control_residuals_of_skipped_blocks_are_dropped():
    from tgate.deep import DeepLayout

    layout = DeepLayout(branch=1, input_blocks=5, skipped=("a", "b"), layer="output_blocks.2")
    control = {"input": [1, 2, 3, 4, 5], "middle": [6], "output": [10, 11, 12, 13, 14]}
    trimmed = layout.trim_control(control)
    # Input block i pops element 4 - i: blocks 2..4 (skipped) pop elements 2..0.
    assert trimmed["input"] == [None, None, None, 4, 5]
    assert trimmed["middle"] == [None]
    # Output block k pops element 4 - k: blocks 0..2 (skipped) pop elements 4..2.
    assert trimmed["output"] == [10, 11, None, None, None]
    assert control["output"] == [10, 11, 12, 13, 14]  # the caller's lists are left alone


# -- the reference -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_node_matches_the_reference_step_by_step(comfy, sd15_two, name):
    s = SETTINGS[name]
    positive, negative = comfy.cond(1), comfy.cond(2)
    expected, gate_step = reference_tgate_deepcache(sd15_two, positive, negative, steps=STEPS, seed=5, **s)
    assert gate_step == EXPECTED_GATE_STEP[name]
    got, _ = node_steps(comfy, deepcache(comfy, sd15_two, **s), positive, negative, STEPS)
    assert len(got) == STEPS
    errors = [rel(g, e) for g, e in zip(got, expected, strict=True)]
    assert max(errors) < 1e-5, errors
    # DeepCache makes a difference the comparison sees: T-GATE alone is clearly another result.
    tgate_alone, _ = node_steps(comfy, comfy.tgate(sd15_two, gate_at=s["gate_at"]), positive, negative, STEPS)
    assert rel(tgate_alone[-1], expected[-1]) > 1e-3


def test_the_sdxl_node_matches_the_reference(comfy):
    sdxl = comfy.sdxl(seed=3)
    positive, negative = comfy.cond(1, pooled=True), comfy.cond(2, pooled=True)
    s = SETTINGS["official"]
    expected, _ = reference_tgate_deepcache(sdxl, positive, negative, steps=STEPS, seed=5, pooled=True, **s)
    got, _ = node_steps(comfy, deepcache(comfy, sdxl, **s), positive, negative, STEPS)
    assert max(rel(g, e) for g, e in zip(got, expected, strict=True)) < 1e-5


# -- what computes -----------------------------------------------------------------------------
def inside(dm, block):
    """A module inside the first child of `block` (a ResBlock's in_layers, a Downsample's conv): hooks
    there fire only when the child computes. ComfyUI never calls a block's own forward, and a hook on
    a child fires even when its patched forward skips the work; a bare conv (input_blocks.0) is never
    patched, so the conv itself."""
    child = dm.get_submodule(f"{block}.0")
    name = next((n for n, _ in child.named_children()), None)
    return f"{block}.0" if name is None else f"{block}.0.{name}"


def firing(patcher, paths):
    """{path: [bool per model call]}: whether a submodule ran in each model call."""
    dm = patcher.model.diffusion_model
    record = {path: [] for path in paths}

    def new_call(m, a):
        for r in record.values():
            r.append(False)

    handles = [dm.register_forward_pre_hook(new_call)]
    for path in paths:

        def fired(m, a, path=path):
            record[path][-1] = True

        handles.append(dm.get_submodule(path).register_forward_pre_hook(fired))
    return record, handles


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_skipped_blocks_run_only_on_refresh_steps_and_the_outer_ones_always(comfy, sd15_two, name):
    s = SETTINGS[name]
    b = s["branch"]
    dm = sd15_two.model.diffusion_model
    n = len(dm.input_blocks)
    paths = {
        "middle": inside(dm, "middle_block"),
        "first_skipped_input": inside(dm, f"input_blocks.{b + 1}"),
        "last_skipped_output": inside(dm, f"output_blocks.{n - b - 2}"),
        "last_input_run": inside(dm, f"input_blocks.{b}"),
        "first_output_run": inside(dm, f"output_blocks.{n - b - 1}"),
        "last_output": inside(dm, f"output_blocks.{n - 1}"),
    }
    record, handles = firing(sd15_two, paths.values())
    try:
        node_steps(comfy, deepcache(comfy, sd15_two, **s), comfy.cond(1), comfy.cond(2), STEPS)
    finally:
        for h in handles:
            h.remove()
    refresh = refreshes(STEPS, EXPECTED_GATE_STEP[name], s["interval"])
    for key in ("middle", "first_skipped_input", "last_skipped_output"):
        assert record[paths[key]] == refresh, key
    for key in ("last_input_run", "first_output_run", "last_output"):
        assert record[paths[key]] == [True] * STEPS, key


def test_deepcache_alone_with_gate_at_one(comfy, sd15_two):
    """gate_at 1.0 turns T-GATE off: both branches at every step, DeepCache still acts."""
    record, handles = firing(sd15_two, ["middle_block.0.in_layers"])
    try:
        with RunLog().on() as log:
            node_steps(comfy, deepcache(comfy, sd15_two, gate_at=1.0, interval=3, branch=0), comfy.cond(1), comfy.cond(2), 9)
    finally:
        for h in handles:
            h.remove()
    assert record["middle_block.0.in_layers"] == [True, False, False] * 3
    ((summary, run),) = log.summaries()
    assert summary.levelno == logging.INFO
    assert run["single_branch_evaluations"] == 0 and run["deep_block_reuses"] == 6
    assert "DeepCache (interval 3, branch 0) skipped the deep blocks in 6 evaluations" in summary.getMessage()


# -- nothing regresses -------------------------------------------------------------------------
@pytest.mark.parametrize("branch", [0, 3])
def test_interval_one_is_bit_identical_to_the_node_without_deepcache(comfy, sd15_two, branch):
    positive, negative = comfy.cond(1), comfy.cond(2)
    without = comfy.sample(comfy.tgate_advanced(sd15_two), positive, negative, steps=12)
    with_off = comfy.tgate_advanced(sd15_two, deepcache_interval=1, deepcache_branch=branch)
    assert torch.equal(comfy.sample(with_off, positive, negative, steps=12), without)


def test_memory_is_one_block_output_per_chunk_and_reported(comfy, sd15_two):
    dm = sd15_two.model.diffusion_model
    with RunLog().on() as log:
        comfy.sample(deepcache(comfy, sd15_two, **SETTINGS["official"]), comfy.cond(1), comfy.cond(2), steps=STEPS)
    ((summary, run),) = log.summaries()
    channels = dm.output_blocks[-2][0].out_channels
    # Before the gate both branches' chunks are kept: 2 x channels x 16 x 16 float32 values.
    assert run["peak_deep_cache_bytes"] == 2 * channels * 16 * 16 * 4
    assert run["peak_cache_bytes"] >= run["peak_deep_cache_bytes"]
    assert run["cache_bytes"] > 0  # cross-attention is kept to the end; the deep output is freed after its last reuse
    assert run["deep_block_reuses"] == STEPS - 9
    assert f"(peak {run['peak_deep_cache_bytes'] / 2**20:.1f} MiB kept)" in summary.getMessage()


def test_a_cancelled_run_frees_everything_and_the_next_run_is_unchanged(comfy, sd15_two):
    import comfy.model_management as mm

    positive, negative = comfy.cond(1), comfy.cond(2)
    model = deepcache(comfy, sd15_two, **SETTINGS["official"])
    fresh = comfy.sample(model, positive, negative, steps=STEPS)
    kept = []
    handle = kept_block_child(sd15_two, 0).register_forward_hook(lambda m, a, o: kept.append(weakref.ref(o)))

    def cancel(step, x0, x, total):
        if step == 4:  # a reuse step, with a refresh kept
            raise mm.InterruptProcessingException()

    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.sample(model, positive, negative, steps=STEPS, callback=cancel)
    finally:
        handle.remove()
    gc.collect()
    assert kept and all(ref() is None for ref in kept), "a kept block output outlived its run"
    assert torch.equal(comfy.sample(model, positive, negative, steps=STEPS), fresh)


def test_no_host_device_sync_added(comfy, sd15_two):
    positive, negative = comfy.cond(1), comfy.cond(2)
    counts = []
    for model in (comfy.tgate(sd15_two), deepcache(comfy, sd15_two, **SETTINGS["official"])):
        counter = SyncCounter()
        with counter.around_attention(sd15_two, ("attn1", "attn2", "middle_block.0", "input_blocks.1.0", "output_blocks.4.1")):
            comfy.sample(model, positive, negative, steps=STEPS)
        counts.append((counter.total, counter.in_attention))
    assert counts[1][1] == 0
    assert counts[1][0] <= counts[0][0]


def test_self_attention_reuse_on_top_follows_v2_on_the_steps_a_block_runs(comfy, sd15_two):
    """V2's rule on top of DeepCache: on a step V2 reuses self-attention, the layers of the blocks
    that run project nothing; the layers of skipped blocks do not run at all."""
    from tgate_testkit.recorders import ModelCalls

    positive, negative = comfy.cond(1), comfy.cond(2)
    model = comfy.tgate_advanced(sd15_two, warm_up=2, sp_interval=5, fi_interval=2, deepcache_interval=3)
    with ModelCalls().watch(sd15_two) as calls:
        out = comfy.sample(model, positive, negative, steps=STEPS)
    assert torch.isfinite(out).all()
    last = f"output_blocks.{len(sd15_two.model.diffusion_model.output_blocks) - 1}."
    outer = sum(1 for n in attention_modules(sd15_two, "attn1") if n.startswith(last))
    everything = len(attention_modules(sd15_two, "attn1"))
    # Step 11 (after the gate at 10): a DeepCache reuse step on which fi_interval 2 reuses: nothing projects.
    # Step 12: a reuse step on which V2 computes: only the outer block's layers project.
    # Step 13: a refresh on which V2 reuses: only the layers without a kept output (skipped at 12) project.
    self_q = calls.column("self_q")
    assert outer > 0 and self_q[11] == 0 and self_q[12] == outer and self_q[13] == everything - outer
    assert rel(out, comfy.sample(deepcache(comfy, sd15_two, **SETTINGS["official"]), positive, negative, steps=STEPS)) > 1e-4


def test_compiled_model_gives_the_eager_result_and_compiles_nothing_on_the_next_run(comfy, sd15_two):
    """ComfyUI's own compile wrapper (TorchCompileModel) after the node. ComfyUI's UNet breaks into
    several graphs under dynamo (on this torch, at its attention's `open`), so the bound is per
    graph of the plain model: each of the official combination's 5 kinds of model call (refresh and
    reuse before the gate, the gate's capture, refresh and reuse after it) compiles each graph at
    most once, and the second run compiles nothing."""
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    positive, negative = comfy.cond(1), comfy.cond(2)

    def compiled(model):
        torch._dynamo.reset()
        counters.clear()
        model = model.clone()
        set_torch_compile_wrapper(model, backend="aot_eager")
        return model

    comfy.sample(compiled(sd15_two), positive, negative, steps=2)
    plain_graphs = counters["stats"]["unique_graphs"]
    eager = comfy.sample(deepcache(comfy, sd15_two, **SETTINGS["official"]), positive, negative, steps=STEPS)
    model = compiled(deepcache(comfy, sd15_two, **SETTINGS["official"]))
    first = comfy.sample(model, positive, negative, steps=STEPS)
    graphs = counters["stats"]["unique_graphs"]
    second = comfy.sample(model, positive, negative, steps=STEPS)
    assert rel(first, eager) < 1e-3
    assert 0 < graphs <= 5 * plain_graphs, (graphs, plain_graphs)
    assert counters["stats"]["unique_graphs"] == graphs, "the second run recompiled"
    torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)


def test_controlnet_residuals_of_skipped_blocks_are_dropped_quietly(comfy, sd15_two, caplog):
    """A ControlNet keeps acting on the blocks that run; on reuse steps the residuals meant for the
    skipped blocks are dropped before the UNet sees them (ComfyUI would otherwise try to add them to
    the empty tensor and log a warning per block)."""
    import comfy.cldm.cldm as cldm
    import comfy.controlnet as controlnet
    import comfy.model_management as mm

    from tgate_testkit.models import ARCHITECTURES, randomize

    unet = {**ARCHITECTURES["tiny-sd15"].unet, **TINY_SD15_TWO_RES_BLOCKS}
    dropped = ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention")
    control_model = cldm.ControlNet(hint_channels=3, **{k: v for k, v in unet.items() if k not in dropped}, device="cpu")
    randomize(control_model, 11)
    control = controlnet.ControlNet(control_model, load_device=mm.get_torch_device(), manual_cast_dtype=None)
    positive, negative = comfy.cond(1), comfy.cond(2)
    image = torch.rand(1, 128, 128, 3)
    pos_c, neg_c = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, image, 1.0, 0.0, 1.0)
    model = deepcache(comfy, sd15_two, **SETTINGS["official"])
    base = comfy.sample(model, positive, negative, steps=12)
    record, handles = firing(sd15_two, [inside(sd15_two.model.diffusion_model, "middle_block")])
    try:
        with caplog.at_level(logging.WARNING):
            out = comfy.sample(model, pos_c, neg_c, steps=12)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(out).all() and rel(out, base) > 1e-4  # the control acted
    assert not [r for r in caplog.records if "control could not be applied" in r.getMessage()]
    assert record[inside(sd15_two.model.diffusion_model, "middle_block")] == refreshes(12, 5, 3)


def test_area_conds_are_kept_per_chunk_and_skip_in_every_call(comfy, sd15_two):
    """Several positive conds, one of them on an area (a chunk of another size, in its own model call):
    every model call of a reuse step skips the deep blocks, with the kept output of its own chunks."""
    from tgate_testkit.recorders import ModelCalls

    positive, negative = comfy.cond(1), comfy.cond(2)
    area = comfy.cond(3)
    area[0][1].update(area=(8, 8, 4, 4), strength=0.8)
    several = positive + comfy.cond(5) + area
    dm = sd15_two.model.diffusion_model
    middle = inside(dm, "middle_block")
    record, handles = firing(sd15_two, [middle])
    try:
        with ModelCalls().watch(sd15_two) as calls:
            out = comfy.sample(deepcache(comfy, sd15_two, **SETTINGS["official"]), several, negative, steps=12)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(out).all()
    steps = sorted(set(calls.sigmas()), reverse=True)
    step_of_call = [steps.index(sigma) for sigma in calls.sigmas()]
    assert len(step_of_call) > 12  # the area chunk goes in a model call of its own
    assert record[middle] == [refreshes(12, 5, 3)[step] for step in step_of_call]


# -- families and bad input ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["tiny-sd2", "tiny-sdxl-refiner"])
def test_sd2_and_the_sdxl_refiner_skip_their_deep_blocks(comfy, arch):
    from tgate_testkit.models import ARCHITECTURES, build_model, random_cond

    patcher = build_model(arch, seed=2)
    positive, negative = random_cond(arch, 1), random_cond(arch, 2)
    record, handles = firing(patcher, ["middle_block.0.in_layers"])
    try:
        out = comfy.sample(deepcache(comfy, patcher, **SETTINGS["official"]), positive, negative, steps=STEPS)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(out).all()
    assert record["middle_block.0.in_layers"] == refreshes(STEPS, 10, 3)
    assert ARCHITECTURES[arch].model_config in ("SD20", "SDXLRefiner")


def test_other_families_are_refused_naming_deepcache_and_the_family(comfy):
    svd = comfy.family_model("svd")
    with pytest.raises(ValueError) as error:
        comfy.tgate_advanced(svd, deepcache_interval=3)
    message = str(error.value)
    assert "DeepCache" in message and "Stable Video Diffusion" in message and "deepcache_interval" in message
    comfy.tgate_advanced(svd, deepcache_interval=1)  # off: served as before


def test_bad_values_name_the_input(comfy, sd15_two):
    with pytest.raises(ValueError, match="deepcache_branch 5 is past this UNet's blocks.*from 0.*to 4"):
        comfy.tgate_advanced(sd15_two, deepcache_interval=3, deepcache_branch=5)
    with pytest.raises(ValueError, match="deepcache_interval must be 1 or more"):
        comfy.tgate_advanced(sd15_two, deepcache_interval=0)
    with pytest.raises(ValueError, match="deepcache_branch must be 0 or more"):
        comfy.tgate_advanced(sd15_two, deepcache_interval=3, deepcache_branch=-1)
