"""T-GATE with other add-ons that reach cross-attention from outside it.

An image prompt in the style of IPAdapter, written here (no third-party code): an attn2 replace
patch (ComfyUI's `set_model_attn2_replace`) that adds, to the text attention, attention over image
tokens projected by its own k/v weights from per-cond image embeds (random for the positive, zeros
for the negative, picked by `cond_or_uncond` as IPAdapter does). A replaced cross-attention layer
is cross-attention: T-GATE captures the replacement's output at the gate as the mean of the
branches and reuses it after, so the image prompt keeps acting at the text's averaged strength.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from tgate import GateSchedule
from tgate_testkit.logs import RunLog
from tgate_testkit.recorders import ModelCalls

STEPS = 12  # gate_at 0.4 gates after 5 of 12 steps with the normal scheduler
GATE_STEP = 5
IMAGE_TOKENS, IMAGE_EMBED = 4, 24
COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond values


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = q.shape
    split = [t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, inner)


class ImagePrompt:
    """An IPAdapter-style attn2 replacement: text attention plus `weight` times attention over the
    image tokens of each chunk's cond (positive: random embeds, negative: zeros)."""

    def __init__(self, seed: int = 7, weight: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.embeds = {
            COND: torch.randn(1, IMAGE_TOKENS, IMAGE_EMBED, generator=g),
            UNCOND: torch.zeros(1, IMAGE_TOKENS, IMAGE_EMBED),
        }
        self.seed, self.weight = seed, weight
        self.projections: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # {inner dim: (k, v) weights}
        self.calls: list[list[int]] = []  # cond_or_uncond of each call

    def __deepcopy__(self, memo):  # ComfyUI deep-copies model options when it clones a model
        return self

    def _projection(self, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
        if inner not in self.projections:
            g = torch.Generator().manual_seed(self.seed * 1000 + inner)
            self.projections[inner] = tuple(torch.randn(inner, IMAGE_EMBED, generator=g) / IMAGE_EMBED**0.5 for _ in "kv")
        return self.projections[inner]

    def __call__(self, q, k, v, extra_options):
        layout = list(extra_options["cond_or_uncond"])
        self.calls.append(layout)
        per_chunk = q.shape[0] // len(layout)
        image = torch.cat([self.embeds[c].expand(per_chunk, -1, -1) for c in layout]).to(q)
        wk, wv = (w.to(q) for w in self._projection(q.shape[-1]))
        heads = extra_options["n_heads"]
        return _attention(q, k, v, heads) + self.weight * _attention(q, image @ wk.T, image @ wv.T, heads)


def replace_keys(model) -> dict[tuple, str]:
    """{(block name, number, transformer index): attn2 module path} of every cross-attention layer."""
    keys = {}
    for name, _ in model.model.diffusion_model.named_modules():
        m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.1\.transformer_blocks\.(\d+)\.attn2", name)
        if m:
            keys[(m[1].split("_")[0], int(m[2]), int(m[3]))] = name
        m = re.fullmatch(r"middle_block\.1\.transformer_blocks\.(\d+)\.attn2", name)
        if m:
            keys[("middle", 0, int(m[1]))] = name
    assert keys and len(keys) == sum(1 for n, _ in model.model.diffusion_model.named_modules() if n.endswith("attn2"))
    return keys


def with_image_prompt(model, prompt: ImagePrompt, keys):
    patched = model.clone()
    for key in keys:
        patched.set_model_attn2_replace(prompt, *key)
    return patched


def reference(comfy, patcher, positive, negative, prompt, replaced, gate_at, seed, cfg, keep_replaced=True):
    """T-GATE from the paper with its own euler loop and torch hooks (as tests/test_reference.py),
    the image prompt given to the model as ComfyUI's replace patches. Each cross-attention layer's
    output is its `attn2.to_out` output (ComfyUI runs `to_out` after a replacement): at the last
    step before the gate it is kept as the mean of the two branches, after the gate the hook
    returns it and only the uncond branch runs. keep_replaced=False: the replaced layers are not
    kept but run their replacement on the uncond branch after the gate (the behaviour before
    T-GATE served replacements)."""
    import comfy.sample as sample
    import comfy.samplers as samplers

    base = patcher.model
    model_sampling = patcher.get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(model_sampling, "normal", STEPS)
    gate = max(1, sum(1 for s in sigmas[:-1].tolist() if s >= model_sampling.percent_to_sigma(gate_at)))
    assert gate == GATE_STEP
    latent = torch.zeros(1, 4, 16, 16)
    x = model_sampling.noise_scaling(sigmas[0], sample.prepare_noise(latent, seed), latent, max_denoise=True)
    outs = {n: m.to_out for n, m in base.diffusion_model.named_modules() if n.endswith("attn2")}
    if not keep_replaced:
        outs = {n: m for n, m in outs.items() if n not in replaced.values()}
    patches = {"patches_replace": {"attn2": {key: prompt for key in replaced}}}
    cond_ctx, uncond_ctx = positive[0][0], negative[0][0]
    cached = {}
    for i in range(STEPS):
        sigma = sigmas[i : i + 1]
        if i < gate:
            handles = []
            if i == gate - 1:
                for name, module in outs.items():
                    handles.append(module.register_forward_hook(lambda m, a, o, name=name: cached.__setitem__(name, o.chunk(2))))
            options = {**patches, "cond_or_uncond": [UNCOND, COND]}
            out = base.apply_model(
                torch.cat([x, x]), sigma.repeat(2), c_crossattn=torch.cat([uncond_ctx, cond_ctx]), transformer_options=options
            )
            for h in handles:
                h.remove()
            uncond, cond = out.chunk(2)
            denoised = uncond + (cond - uncond) * cfg
        else:
            handles = [
                m.register_forward_hook(lambda m, a, o, name=name: (cached[name][0] + cached[name][1]) / 2)
                for name, m in outs.items()
            ]
            options = {**patches, "cond_or_uncond": [UNCOND]}
            denoised = base.apply_model(x, sigma, c_crossattn=uncond_ctx, transformer_options=options)
            for h in handles:
                h.remove()
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])  # euler
    return base.process_latent_out(x)


@pytest.mark.parametrize("where", ["one_layer", "all_layers"])
def test_an_image_prompt_is_captured_at_the_gate_and_reused(comfy, where):
    patcher = comfy.sd15(seed=3)
    keys = replace_keys(patcher)
    replaced = dict([next(iter(keys.items()))]) if where == "one_layer" else keys
    positive, negative = comfy.cond(1), comfy.cond(2)
    settings = {"steps": STEPS, "cfg": 6.0, "seed": 5}

    prompt = ImagePrompt()
    expected = reference(comfy, patcher, positive, negative, prompt, replaced, 0.4, seed=5, cfg=6.0)
    before_gate = reference(comfy, patcher, positive, negative, prompt, replaced, 0.4, seed=5, cfg=6.0, keep_replaced=False)

    for order in ("image_prompt_first", "tgate_first"):
        prompt = ImagePrompt()
        if order == "image_prompt_first":
            model = comfy.tgate(with_image_prompt(patcher, prompt, replaced))
        else:
            model = with_image_prompt(comfy.tgate(patcher), prompt, replaced)
        probe = ModelCalls()
        with probe.watch(patcher):
            got = comfy.sample(model, positive, negative, **settings)
        # T-GATE acts: two branches until the gate, then one; after it no replaced layer runs its
        # replacement and the other layers' patched attn2 return their kept output, projecting
        # nothing (attn2.to_q still runs where a layer is replaced: ComfyUI's block projects the
        # query before calling the replacement, and never calls that layer's attn2).
        assert probe.batch_sizes == [2] * GATE_STEP + [1] * (STEPS - GATE_STEP), order
        assert [sorted(c) for c in prompt.calls] == [[COND, UNCOND]] * (GATE_STEP * len(replaced)), order
        assert probe.column("cross_q")[:GATE_STEP] == [len(keys)] * GATE_STEP, order
        assert probe.column("cross_q")[GATE_STEP:] == [len(replaced)] * (STEPS - GATE_STEP), order
        assert probe.column("cross_calls")[GATE_STEP:] == [len(keys) - len(replaced)] * (STEPS - GATE_STEP), order
        # The replaced layers' output after the gate is the capture-step mean (through to_out,
        # which is linear: equal up to float rounding).
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    # The image prompt still acts after the gate, at the mean's strength: not as the negative's
    # (zero) image, which is what running the replacement on the uncond branch alone gave...
    assert (got - before_gate).abs().max() > 100 * 1e-3
    # ... and it acts at all.
    plain = comfy.sample(comfy.tgate(patcher), positive, negative, **settings)
    assert (got - plain).abs().max() > 100 * 1e-3


def test_a_gated_run_with_attention_patches_warns_once_at_its_start(comfy):
    patcher = comfy.sd15(seed=3)
    positive, negative = comfy.cond(1), comfy.cond(2)
    key = next(iter(replace_keys(patcher)))
    replaced = with_image_prompt(comfy.tgate(patcher), ImagePrompt(), [key])
    patched = comfy.tgate(patcher).clone()
    patched.set_model_attn2_patch(lambda n, context, value, extra_options: (n, context, value))
    for model, what in ((replaced, "attn2 replace"), (patched, "attn2_patch")):
        with RunLog().on() as log:
            comfy.sample(model, positive, negative, steps=STEPS)
        warnings = [r.getMessage() for r in log.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and what in warnings[0] and "captured at the gate" in warnings[0], warnings
    with RunLog().on() as log:  # none without such patches, nor when the run does not gate
        comfy.sample(comfy.tgate(patcher), positive, negative, steps=STEPS)
        comfy.sample(comfy.tgate(patcher, gate_at=1.0).clone(), positive, negative, steps=STEPS)
        comfy.sample(with_image_prompt(comfy.tgate(patcher, gate_at=1.0), ImagePrompt(), [key]), positive, negative, steps=STEPS)
    assert not [r for r in log.records if r.levelno >= logging.WARNING]


# -- guiders with three cond lists (PerpNegGuider, DualCFGGuider) ------------------------------------
GUIDERS = ("perp_neg", "dual_cfg", "dual_cfg_nested")


def three_list_guider(comfy, kind, model, pooled=False):
    """The guider node `kind` on `model` with three different prompts, as a user wires it."""
    from comfy_extras.nodes_custom_sampler import DualCFGGuider
    from comfy_extras.nodes_perpneg import PerpNegGuider

    first, second, third = (comfy.cond(seed, pooled=pooled) for seed in (1, 2, 9))
    if kind == "perp_neg":
        return PerpNegGuider.execute(model, first, second, third, 6.0, 1.0).result[0]
    style = "nested" if kind == "dual_cfg_nested" else "regular"
    return DualCFGGuider().get_guider(model, first, second, third, 6.0, 4.0, style)[0]


def guided(guider, patcher, steps=STEPS, seed=0):
    import comfy.samplers as samplers

    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    sigmas = samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", steps)
    return guider.sample(noise, torch.zeros(1, 4, 16, 16), samplers.sampler_object("euler"), sigmas, seed=seed)


def list_mean_reference(comfy, kind, patcher, pooled=False, gate_step=GATE_STEP):
    """T-GATE for a guider of several cond lists, with torch hooks alone on the unpatched model: every
    list evaluated at every step (the guider's own batches), each attn2 output at the last step before
    the gate kept as the mean of all its chunks (one per list) and returned after the gate."""
    modules = {n: m for n, m in patcher.model.diffusion_model.named_modules() if n.endswith("attn2")}
    state = {"step": -1, "batches": []}
    kept = {}

    def count_step(module, args):
        state["step"] += 1  # euler: one model call per step, the three lists batched together
        state["batches"].append(args[0].shape[0])

    def hook(name):
        def apply(module, args, output):
            if state["step"] == gate_step - 1:
                kept[name] = output.float().mean(0, keepdim=True).to(output.dtype)
            elif state["step"] >= gate_step:
                return kept[name].expand_as(output)
            return None

        return apply

    def limit(args):
        # After the gate every list gets the same attention, so every difference the guider takes
        # is zero where the lists' other inputs agree: the guided result is the model's output, the
        # limit of PerpNeg's formula (which divides zero by zero there).
        same = torch.equal(args["cond_denoised"], args["uncond_denoised"])
        return args["cond_denoised"] if state["step"] >= gate_step and same else args["denoised"]

    if kind == "perp_neg":
        patcher = patcher.clone()
        patcher.set_model_sampler_post_cfg_function(limit)
    handles = [patcher.model.diffusion_model.register_forward_pre_hook(count_step)]
    handles += [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        out = guided(three_list_guider(comfy, kind, patcher, pooled), patcher)
    finally:
        for h in handles:
            h.remove()
    assert state["batches"] == [3] * STEPS  # the assumption `count_step` rests on
    return out


@pytest.mark.parametrize("kind", GUIDERS)
def test_a_three_list_guider_evaluates_one_list_after_the_gate(comfy, kind):
    patcher = comfy.sd15(seed=3)
    expected = list_mean_reference(comfy, kind, patcher)
    with RunLog().on() as log:
        probe = ModelCalls()
        with probe.watch(patcher):
            got = guided(three_list_guider(comfy, kind, comfy.tgate(patcher)), patcher)
    # The three lists differ only in their text: after the gate one evaluation serves all three.
    assert probe.batch_sizes == [3] * GATE_STEP + [1] * (STEPS - GATE_STEP)
    assert probe.column("cross_q")[GATE_STEP:] == [0] * (STEPS - GATE_STEP)  # attn2 computes nothing
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # ... which is not the guider's own result (the cache acts).
    assert (got - guided(three_list_guider(comfy, kind, patcher), patcher)).abs().max() > 1e-2
    (run,) = log.runs
    assert run["single_branch_evaluations"] == STEPS - GATE_STEP
    assert run["saved_branch_evaluations"] == 2 * (STEPS - GATE_STEP)
    assert not log.messages(logging.WARNING)


def test_a_three_list_guider_whose_lists_differ_runs_them_all_on_the_cache_and_warns(comfy):
    # SDXL's pooled text vector enters the model outside cross-attention: PerpNeg's three prompts
    # give three different model inputs, so no list can stand for another.
    patcher = comfy.sdxl(seed=3)
    expected = list_mean_reference(comfy, "perp_neg", patcher, pooled=True)
    with RunLog().on() as log:
        probe = ModelCalls()
        with probe.watch(patcher):
            got = guided(three_list_guider(comfy, "perp_neg", comfy.tgate(patcher), pooled=True), patcher)
    assert probe.batch_sizes == [3] * STEPS
    assert probe.column("cross_q")[GATE_STEP:] == [0] * (STEPS - GATE_STEP)  # still no attn2 work
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    (warning,) = log.messages(logging.WARNING)
    assert "Guider_PerpNeg" in warning and "differ" in warning, warning


# -- conditioning that changes after the gate ----------------------------------------------------------
def timed(cond, start, end):
    from nodes import ConditioningSetTimestepRange

    return ConditioningSetTimestepRange().set_range(cond, start, end)[0]


def combined(*conds):
    from nodes import ConditioningCombine

    out = conds[0]
    for c in conds[1:]:
        out = ConditioningCombine().combine(out, c)[0]
    return out


def in_area(cond):
    from nodes import ConditioningSetArea

    return ConditioningSetArea().append(cond, 64, 128, 64, 0, 1.0)[0]  # the right half of a 128 px image


def gate_at_steps(patcher, steps, gate_at):
    """After how many steps of a `steps`-step normal schedule T-GATE gates at `gate_at`."""
    import comfy.samplers as samplers

    model_sampling = patcher.get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(model_sampling, "normal", steps).tolist()
    return GateSchedule.from_sigmas(sigmas, float(model_sampling.percent_to_sigma(gate_at))).gate_step


def gate_at_for(patcher, steps, gate_step):
    """A gate_at at which T-GATE gates after `gate_step` steps of a `steps`-step normal schedule."""
    found = next((p / 100 for p in range(1, 100) if gate_at_steps(patcher, steps, p / 100) == gate_step), None)
    assert found is not None, f"no gate_at gates after {gate_step} steps"
    return found


@pytest.mark.parametrize("change", ["prompt_switch", "late_area"])
def test_conditioning_that_changes_after_the_gate_moves_the_gate(comfy, change):
    patcher = comfy.sd15(seed=3)
    a, b, negative = comfy.cond(1), comfy.cond(4), comfy.cond(2)
    if change == "prompt_switch":  # ConditioningSetTimestepRange: prompt a, then prompt b from 50 %
        positive = combined(timed(a, 0.0, 0.5), timed(b, 0.5, 1.0))
        without_change = timed(a, 0.0, 0.5)
    else:  # an area prompt that starts at 50 %
        positive = combined(a, timed(in_area(b), 0.5, 1.0))
        without_change = a
    with RunLog().on() as log:
        got = comfy.sample(comfy.tgate(patcher, gate_at=0.4), positive, negative, steps=STEPS)
    (warning,) = log.messages(logging.WARNING)
    moved_to = int(re.search(r"capture moves to step (\d+)", warning).group(1))  # 1-based: gate after it
    assert moved_to > GATE_STEP and "positive's cond 2 (start_percent 0.5, end_percent 1)" in warning, warning
    assert log.runs[0]["gate_step"] == moved_to
    # The result is T-GATE's with the gate there, bit for bit (at that gate nothing moves) ...
    with RunLog().on() as log:
        expected = comfy.sample(
            comfy.tgate(patcher, gate_at=gate_at_for(patcher, STEPS, moved_to)), positive, negative, steps=STEPS
        )
    assert not log.messages(logging.WARNING)
    assert torch.equal(got, expected)
    # ... in which the late prompt acts.
    assert (got - comfy.sample(comfy.tgate(patcher, gate_at=0.4), without_change, negative, steps=STEPS)).abs().max() > 1e-2


def test_conditioning_that_changes_at_the_last_step_turns_gating_off_for_the_run(comfy):
    import comfy.samplers as samplers

    patcher = comfy.sd15(seed=3)
    model_sampling = patcher.get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(model_sampling, "normal", STEPS).tolist()
    # A percent whose sigma falls between the last two steps' sigmas: the cond starts at the last step.
    start = next(p / 1000 for p in range(500, 1000) if sigmas[-2] < float(model_sampling.percent_to_sigma(p / 1000)) < sigmas[-3])
    positive = combined(comfy.cond(1), timed(comfy.cond(4), start, 1.0))
    negative = comfy.cond(2)
    with RunLog().on() as log:
        got = comfy.sample(comfy.tgate(patcher), positive, negative, steps=STEPS)
    (warning,) = log.messages(logging.WARNING)
    assert "no step is left to gate" in warning and "positive's cond 2 (start_percent" in warning, warning
    assert not log.runs  # the run went on without T-GATE
    assert torch.equal(got, comfy.sample(patcher, positive, negative, steps=STEPS))


# -- Deep Shrink: a patch that changes layers' shapes during the run ------------------------------------
def deep_shrink(model, end_percent=0.35):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    return PatchModelAddDownscale.execute(model, 3, 2.0, 0.0, end_percent, True, "bicubic", "bicubic").result[0]


# The node's default (at 10 steps the capture step before gate_at 0.4 is still downscaled, the first
# step after it is not), and a change a step past the gate.
DEEP_SHRINK_CASES = [(0.35, 10), (0.5, STEPS)]


@pytest.mark.parametrize(("end_percent", "steps"), DEEP_SHRINK_CASES)
def test_deep_shrink_moves_the_capture_past_its_end(comfy, end_percent, steps):
    patcher = comfy.sd15(seed=3)
    positive, negative = comfy.cond(1), comfy.cond(2)
    settings = dict(steps=steps, size=32)
    for order in ("tgate_first", "deep_shrink_first"):
        if order == "tgate_first":
            model = deep_shrink(comfy.tgate(patcher, gate_at=0.4), end_percent)
        else:
            model = comfy.tgate(deep_shrink(patcher, end_percent), gate_at=0.4)
        with RunLog().on() as log:
            probe = ModelCalls()
            with probe.watch(patcher):
                got = comfy.sample(model, positive, negative, **settings)
        (warning,) = log.messages(logging.WARNING)
        assert "Deep Shrink" in warning and "capture moves to step" in warning, warning
        gate = log.runs[0]["gate_step"]
        assert gate > gate_at_steps(patcher, steps, 0.4) and log.runs[0]["recaptures"] == 0
        # Two branches up to the capture, one after it, and no cross-attention computes after it.
        assert probe.batch_sizes == [2] * gate + [1] * (steps - gate), order
        assert probe.column("cross_q")[gate:] == [0] * (steps - gate), order
        # The result is T-GATE's with the gate there, bit for bit (at that gate nothing moves).
        with RunLog().on() as log:
            expected = comfy.sample(
                deep_shrink(comfy.tgate(patcher, gate_at=gate_at_for(patcher, steps, gate)), end_percent),
                positive,
                negative,
                **settings,
            )
        assert not log.messages(logging.WARNING)
        assert torch.equal(got, expected), order


def unannounced(model):
    """`model` with its Deep Shrink patch hidden from T-GATE's look ahead: the patch also reads a key
    the look-ahead does not give (as a pack's own resizing patch might), so T-GATE meets the new
    shape only when a step runs."""
    patched = model.clone()
    patches = patched.model_options["transformer_options"]["patches"]
    (downscale,) = patches.pop("input_block_patch_after_skip")

    def resize(h, transformer_options):
        transformer_options["cond_or_uncond"]  # noqa: B018 (raises where it is missing)
        return downscale(h, transformer_options)

    patched.set_model_input_block_patch_after_skip(resize)
    return patched


@pytest.mark.parametrize(("end_percent", "steps"), DEEP_SHRINK_CASES)
def test_a_shape_change_met_at_a_step_recaptures_there(comfy, end_percent, steps):
    patcher = comfy.sd15(seed=3)
    positive, negative = comfy.cond(1), comfy.cond(2)
    settings = dict(steps=steps, size=32)
    model = unannounced(deep_shrink(comfy.tgate(patcher, gate_at=0.4), end_percent))
    with RunLog().on() as log:
        probe = ModelCalls()
        with probe.watch(patcher):
            got = comfy.sample(model, positive, negative, **settings)
    (warning,) = log.messages(logging.WARNING)  # once per run
    assert "no longer fits" in warning and "Deep Shrink" in warning, warning
    changed = int(re.search(r"at step (\d+) of", warning).group(1)) - 1  # the first step of the new shape
    gate = log.runs[0]["gate_step"]
    assert changed >= gate and log.runs[0]["recaptures"] == 1
    # Steps past the gate before the change reuse the capture of their own shape; the evaluation
    # that finds kept outputs of another shape runs again on both branches and captures; no
    # cross-attention layer computes on one branch.
    assert probe.batch_sizes == [2] * gate + [1] * (changed - gate) + [1, 2] + [1] * (steps - changed - 1)
    assert probe.column("cross_q")[changed + 2 :] == [0] * (steps - changed - 1)
    assert probe.column("cross_q")[gate:changed] == [0] * (changed - gate)
    if changed == gate:
        # The result is T-GATE's with the capture at that step, bit for bit.
        at_change = gate_at_for(patcher, steps, changed + 1)
        expected = comfy.sample(
            unannounced(deep_shrink(comfy.tgate(patcher, gate_at=at_change), end_percent)), positive, negative, **settings
        )
        assert torch.equal(got, expected)


# -- sliding context windows through sampler_calc_cond_batch_function (AnimateDiff-Evolved style) -----------
class SlidingWindows:
    """Context windows as AnimateDiff-Evolved runs them, written here: a sampler_calc_cond_batch_function
    that calls ComfyUI's calc_cond_batch once per window of frames (the latent's batch entries) with the
    same conds, so the same cond uuids, and names the window in its own transformer_options
    (`ad_params["sub_idxs"]`) unless `named` is False; each frame's output is its window's."""

    def __init__(self, windows, named=True):
        self.windows, self.named = windows, named

    def __call__(self, args):
        import comfy.samplers as samplers

        x, timestep, conds, options = args["input"], args["sigma"], args["conds"], args["model_options"]
        out = [torch.zeros_like(x) if c else None for c in conds]
        for frames in self.windows:
            window_options = options
            if self.named:
                ad_params = {"sub_idxs": list(frames), "context_length": len(frames)}
                window_options = {**options, "transformer_options": {**options["transformer_options"], "ad_params": ad_params}}
            window = samplers.calc_cond_batch(args["model"], conds, x[list(frames)], timestep[list(frames)], window_options)
            for i, part in enumerate(window):
                if out[i] is not None:
                    out[i][list(frames)] = part
        return out


def with_windows(model, windows):
    patched = model.clone()
    patched.set_model_sampler_calc_cond_batch_function(windows)
    return patched


WINDOWS = ((0, 1), (2, 3))  # frames apart: on an image model no window sees another's frames


def test_sliding_windows_named_in_ad_params_get_their_own_cache(comfy):
    patcher = comfy.sd15(seed=3)
    positive, negative = comfy.cond(1), comfy.cond(2)
    settings = dict(steps=STEPS, batch=4)
    unwindowed = comfy.sample(comfy.tgate(patcher), positive, negative, **settings)
    for order in ("tgate_first", "windows_first"):
        if order == "tgate_first":
            model = with_windows(comfy.tgate(patcher), SlidingWindows(WINDOWS))
        else:
            model = comfy.tgate(with_windows(patcher, SlidingWindows(WINDOWS)))
        with RunLog().on() as log:
            probe = ModelCalls()
            with probe.watch(patcher):
                got = comfy.sample(model, positive, negative, **settings)
        # Each window gated: two branches of two frames until the gate, then one.
        assert probe.batch_sizes == [4] * (2 * GATE_STEP) + [2] * (2 * (STEPS - GATE_STEP)), order
        assert not log.messages(logging.WARNING), order
        # Windows of frames that cannot see each other give T-GATE's unwindowed result: each window
        # reuses its own frames' attention, not the last window's. Up to float32 rounding at the output's
        # scale: a batch of 2 frames instead of 4 sums in another order on some CPUs (an Intel Xeon VM:
        # 1e-3 on values up to 542), while another window's attention would move it by far more.
        scale = float(unwindowed.abs().max())
        torch.testing.assert_close(got, unwindowed, rtol=1e-5, atol=1e-5 * scale, msg=order)


def test_sliding_windows_that_cannot_be_told_apart_turn_gating_off_with_a_warning(comfy):
    patcher = comfy.sd15(seed=3)
    positive, negative = comfy.cond(1), comfy.cond(2)
    settings = dict(steps=STEPS, batch=4)
    windows = SlidingWindows(WINDOWS, named=False)
    with RunLog().on() as log:
        probe = ModelCalls()
        with probe.watch(patcher):
            got = comfy.sample(with_windows(comfy.tgate(patcher), windows), positive, negative, **settings)
    warnings = log.messages(logging.WARNING)
    assert "captured twice" in warnings[0] and "AnimateDiff-Evolved" in warnings[0], warnings
    assert "gating was turned off part way" in warnings[-1], warnings  # the run's summary
    assert probe.batch_sizes == [4] * (2 * STEPS)  # both branches at every step
    assert torch.equal(got, comfy.sample(with_windows(patcher, windows), positive, negative, **settings))


# -- the composition suite: every add-on users combine T-GATE with, on SD1.5 and SDXL -------------------
def _lora(comfy, model, positive, negative):
    """Weight patches as LoRA loaders add them (ModelPatcher.add_patches), on a cross-attention
    projection and a convolution."""
    patched = model.clone()
    keys = [k for k in patched.model_state_dict() if k.endswith("attn2.to_k.weight") or k.endswith("in_layers.2.weight")]
    g = torch.Generator().manual_seed(13)
    patches = {k: (0.2 * torch.randn(patched.get_model_object(k).shape, generator=g),) for k in keys[:2] + keys[-2:]}
    patched.add_patches(patches, 1.0)
    return patched, positive, negative


def _controlnet(comfy, model, positive, negative):
    """A random-weight ControlNet of the model's own shape, applied with ControlNetApplyAdvanced."""
    import comfy.cldm.cldm as cldm
    import comfy.controlnet as controlnet
    import comfy.model_management as mm

    from tgate_testkit.models import randomize

    dropped = ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention", "dtype", "device")
    unet = {k: v for k, v in model.model.model_config.unet_config.items() if k not in dropped}
    control_model = cldm.ControlNet(hint_channels=3, **unet, device="cpu", dtype=torch.float32)
    randomize(control_model, 11)
    control = controlnet.ControlNet(control_model, load_device=mm.get_torch_device(), manual_cast_dtype=None)
    image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(2))
    positive, negative = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, image, 1.0, 0.0, 1.0)
    return model, positive, negative


def _node(build):
    """An add-on that patches the model alone."""
    return lambda comfy, model, positive, negative: (build(model), positive, negative)


def _addons():
    from comfy_extras.nodes_apg import APG
    from comfy_extras.nodes_cfg import CFGZeroStar
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from comfy_extras.nodes_freelunch import FreeU_V2
    from comfy_extras.nodes_hypertile import HyperTile
    from comfy_extras.nodes_model_advanced import RescaleCFG
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    from comfy_extras.nodes_tomesd import TomePatchModel

    return {
        "FreeU_V2": _node(lambda m: FreeU_V2().patch(m, 1.3, 1.4, 0.9, 0.2)[0]),
        "LoRA": _lora,
        "ControlNet": _controlnet,
        "EasyCache": _node(lambda m: EasyCacheNode.execute(m, 0.2, 0.15, 0.95, False).result[0]),
        "LazyCache": _node(lambda m: LazyCacheNode.execute(m, 0.2, 0.15, 0.95, False).result[0]),
        "RescaleCFG": _node(lambda m: RescaleCFG().patch(m, 0.7)[0]),
        "CFGZeroStar": _node(lambda m: CFGZeroStar.execute(m).result[0]),
        "APG": _node(lambda m: APG.execute(m, 1.0, 5.0, 0.5).result[0]),
        "PAG": _node(lambda m: PerturbedAttentionGuidance.execute(m, 3.0).result[0]),
        "SAG": _node(lambda m: SelfAttentionGuidance.execute(m, 0.5, 2.0).result[0]),
        "HyperTile": _node(lambda m: HyperTile.execute(m, 32, 2, 1, False)[0]),
        "ToMe": _node(lambda m: TomePatchModel.execute(m, 0.5).result[0]),
    }


ADDONS = (
    "FreeU_V2",
    "LoRA",
    "ControlNet",
    "EasyCache",
    "LazyCache",
    "RescaleCFG",
    "CFGZeroStar",
    "APG",
    "PAG",
    "SAG",
    "HyperTile",
    "ToMe",
)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("addon", ADDONS)
def test_each_addon_composes(comfy, addon, family):
    patcher = comfy.sd15(seed=3) if family == "sd15" else comfy.sdxl(seed=3)
    pooled = family == "sdxl"
    positive, negative = comfy.cond(1, pooled=pooled), comfy.cond(2, pooled=pooled)
    apply = _addons()[addon]
    settings = dict(steps=STEPS, size=32)

    def sample(model):
        model, pos, neg = apply(comfy, model, positive, negative)
        return comfy.sample(model, pos, neg, **settings)

    plain = comfy.sample(patcher, positive, negative, **settings)
    addon_alone = sample(patcher)
    tgate_alone = comfy.sample(comfy.tgate(patcher), positive, negative, **settings)
    with RunLog().on() as log:
        probe = ModelCalls()
        with probe.watch(patcher):
            both = sample(comfy.tgate(patcher))
    # T-GATE acted: after the gate every model call runs one branch and no cross-attention, once a
    # capture kept something (EasyCache may skip the capture step's model call: the next one captures).
    (run,) = log.runs
    assert run["single_branch_evaluations"] > 0
    gate_sigma = probe.sample_sigmas[run["gate_step"]].item() * (1 + 1e-4)
    after = [i for i, sigma in enumerate(probe.sigmas()) if sigma <= gate_sigma]
    captures = next(k for k, i in enumerate(after) if probe.batch_sizes[i] == 1)
    gated = after[captures:]
    assert gated and all(probe.batch_sizes[i] == 1 for i in gated), probe.batch_sizes
    assert all(probe.column("cross_q")[i] == 0 for i in gated)
    assert captures == 0 or addon in SKIPS_MODEL_CALLS, probe.batch_sizes
    # The add-on's effect persists under T-GATE, at about its own size ...
    if torch.equal(addon_alone, plain):
        # ... or, where it does nothing to this model (ToMe merges tokens at full resolution only,
        # where SDXL has no attention), it does nothing under T-GATE either.
        assert torch.equal(both, tgate_alone)
    else:
        effect = (both - tgate_alone).norm() / (addon_alone - plain).norm()
        low, high = EFFECT_BOUNDS.get(addon, (0.7, 1.3))
        assert low < effect < high, f"{addon}: effect ratio {effect:.3f}"
    # With the gate past the last step, T-GATE changes nothing.
    assert torch.equal(sample(comfy.tgate(patcher, gate_at=1.0)), addon_alone)


# Where the ratio ||both - T-GATE alone|| / ||add-on alone - plain|| is not about 1, and why.
EFFECT_BOUNDS = {
    # They decide which steps to skip from how much the model's output changes, which T-GATE changes
    # after the gate: both act, but the skips, so the effect's size, differ (measured: SD1.5 within
    # 0.7-1.3, SDXL about 0.1).
    "EasyCache": (0.05, 2.0),
    "LazyCache": (0.05, 2.0),
}
# Add-ons that skip model calls, the capture step's included: the first evaluation past the gate
# whose model call runs captures.
SKIPS_MODEL_CALLS = {"EasyCache", "LazyCache"}


# -- extra evaluations after the gate compare like with like -----------------------------------------
class ExtraEvaluations:
    """A CALC_COND_BATCH wrapper, outermost (on the model before T-GATE): each extra evaluation (one
    cond list: PAG's perturbed call, SAG's blurred call) also runs its reference, the same evaluation
    (input, sigma, the add-on's options) of the cond list the main evaluation ran after the gate, the
    fidelity branch's: it differs from the main evaluation by the add-on's perturbation alone."""

    def __init__(self, fidelity: int):
        self.fidelity = fidelity  # the fidelity branch's index in the main evaluation's conds
        self.main = None  # (conds, input, outputs) of the last main evaluation
        self.extra: list[dict] = []

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        out = executor(model, conds, x_in, timestep, model_options)
        if len(conds) == 2:
            self.main = (conds, x_in.clone(), [o.clone() for o in out])
        elif len(conds) == 1 and self.main is not None:
            main_conds, main_x, main_out = self.main
            (reference,) = executor(model, [main_conds[self.fidelity]], x_in, timestep, model_options)
            sigma = float(timestep.reshape(-1)[0])
            self.extra.append(
                dict(sigma=sigma, main_x=main_x, main_out=main_out, x=x_in.clone(), out=out[0].clone(), reference=reference)
            )
        return out


# What each add-on subtracts its extra evaluation from (comfy_extras/nodes_pag.py, nodes_sag.py): its
# guidance term is that minus the extra evaluation, times its scale. PAG: the positive's prediction;
# SAG: the blurred uncond prediction, which it evaluates noised as `degraded + x - uncond_pred`.
COMPARED_WITH = {
    "PAG": lambda e: e["main_out"][COND],
    "SAG": lambda e: e["x"] - e["main_x"] + e["main_out"][UNCOND],
}
# The fidelity branch whose cond list is not the one the add-on's extra evaluation is given: PAG passes
# the positive's list, SAG the negative's.
FIDELITY_NOT_ITS_LIST = {"PAG": "uncond", "SAG": "cond"}
EXTRA_STEPS = 10  # gate_at 0.4 gates after 4 of 10 normal steps


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("addon", ["PAG", "SAG"])
def test_an_extra_evaluation_after_the_gate_runs_the_fidelity_branchs_cond_list(comfy, addon, family):
    """After the gate the main evaluation runs the fidelity branch's cond list alone; an add-on's
    extra evaluation of the other list runs the fidelity branch's list too, so the add-on's guidance
    term carries its perturbation alone and no difference of the lists' inputs other than the text
    (SDXL's pooled vector `y`; on SD1.5 the lists differ in their text only, which the cache replaces)."""
    import comfy.patcher_extension as patcher_extension

    patcher = comfy.sd15(seed=3) if family == "sd15" else comfy.sdxl(seed=3)
    pooled = family == "sdxl"
    positive, negative = comfy.cond(1, pooled=pooled), comfy.cond(2, pooled=pooled)
    apply = _addons()[addon]
    branch = FIDELITY_NOT_ITS_LIST[addon]
    settings = dict(steps=EXTRA_STEPS, size=32)
    recorder = ExtraEvaluations(fidelity=UNCOND if branch == "uncond" else COND)
    recorded = patcher.clone()
    recorded.add_wrapper_with_key(patcher_extension.WrappersMP.CALC_COND_BATCH, "test_extra_evaluations", recorder)
    model, pos, neg = apply(comfy, comfy.tgate(recorded, fidelity_branch=branch), positive, negative)
    with RunLog().on() as log:
        probe = ModelCalls()
        with probe.watch(patcher):
            comfy.sample(model, pos, neg, **settings)
    (run,) = log.runs
    gate = run["gate_step"]
    assert gate == gate_at_steps(patcher, EXTRA_STEPS, 0.4) == 4 and run["single_branch_evaluations"] == EXTRA_STEPS - gate
    gate_sigma = probe.sample_sigmas[gate].item() * (1 + 1e-4)
    after = [e for e in recorder.extra if e["sigma"] <= gate_sigma]
    assert len(after) == EXTRA_STEPS - gate  # one extra evaluation per step after the gate
    # The share of the add-on's guidance term (what it compares with, minus its extra evaluation) that
    # is not its perturbation's, at each step after the gate.
    terms = [COMPARED_WITH[addon](e) - e["out"] for e in after]
    mismatches = [float((e["out"] - e["reference"]).norm() / term.norm()) for e, term in zip(after, terms, strict=True)]
    assert all(term.norm() > 0 for term in terms)  # the add-on acts at every step (no share of nothing)
    assert max(mismatches) < 1e-6, f"{addon} on {family}: mismatch share per step after the gate {mismatches}"
    # With the gate past the last step, T-GATE changes nothing.
    alone = comfy.sample(apply(comfy, patcher, positive, negative)[0], positive, negative, **settings)
    off, pos, neg = apply(comfy, comfy.tgate(patcher, gate_at=1.0, fidelity_branch=branch), positive, negative)
    assert torch.equal(comfy.sample(off, pos, neg, **settings), alone)
