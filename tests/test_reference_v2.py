"""TGATE-V2 (self-attention reuse) against an independent computation of the official rule.

The rule is the official `tgate_scheduler` (tgate_utils.py), restated in `self_attention_action`
and `cross_attention_action` below on the run's own 0-based step indices, with gate_step the first
step after the gate:

- before gate_step - 1: cross-attention computed; self-attention computed while step < warm_up,
  computed and cached at step == warm_up, then computed and cached when step % sp_interval == 0
  (absolute step) and otherwise replaced by the cached output;
- at gate_step - 1: both computed, each cached as the mean of its uncond and cond halves;
- from gate_step on: only the uncond branch is evaluated and is the guided result; cross-attention
  returns its cached mean; self-attention is computed and cached when step % fi_interval == 0 and
  otherwise replaced by the cached output (so the first step after the gate may return the mean).

What is cached is the attention module's output (after to_out, before the residual), per layer.

The reference, like test_reference.py's V1 one, drives ComfyUI's model directly
(BaseModel.apply_model) with its own euler loop and its own classifier-free guidance, and realises
the rule with nothing but torch forward hooks on the `attn1` / `attn2` modules: a hook stores the
output on caching steps and swaps in the stored tensor on reuse steps. (The hooked module still
computes on reuse steps; that does not change the numbers, and the count test below checks
separately that the node really skips the work.)

The loop reproduces ComfyUI's arithmetic exactly (on CPU the V1 reference and the V1 node agree
bit for bit): float32 sigmas from `calculate_sigmas`, `noise_scaling` with max_denoise for the
first sigma, `denoised` as returned by apply_model, cfg as `uncond + (cond - uncond) * cfg`, and
euler as `x + (x - denoised) / sigma * (sigma_next - sigma)`.
"""

from __future__ import annotations

import pytest
import torch

from tgate_testkit.recorders import ModelCalls

COMPUTE, CACHE, MEAN, REUSE = "c", "s", "m", "r"  # compute; compute and store; store the mean; reuse

# Settings that exercise every branch of the rule. "official" is the paper's SDXL setting (gate 10
# of 25 steps). "fi2" puts the gate at step 9, an odd step, so that with fi_interval 2 the first
# step after the gate reuses the mean stored at the gate, and later steps alternate store / reuse.
SETTINGS = {
    "official": dict(steps=25, gate_at=0.4, warm_up=2, sp_interval=5, fi_interval=1),
    "fi2": dict(steps=20, gate_at=0.45, warm_up=1, sp_interval=3, fi_interval=2),
}
# The same rule written out by hand, step by step, for the schedules SETTINGS produce.
EXPECTED_SELF_ACTIONS = {
    "official": "ccsrrsrrrm" + "s" * 15,
    "fi2": "csrsrrsrm" + "rs" * 5 + "r",
}
EXPECTED_GATE_STEP = {"official": 10, "fi2": 9}
CFG = 6.0


# -- the rule ----------------------------------------------------------------------------------
def self_attention_action(step, gate_step, warm_up, sp_interval, fi_interval):
    if step < gate_step - 1:  # semantics planning
        if step < warm_up:
            return COMPUTE
        if step == warm_up or step % sp_interval == 0:
            return CACHE
        return REUSE
    if step == gate_step - 1:
        return MEAN
    return CACHE if step % fi_interval == 0 else REUSE  # fidelity improving


def cross_attention_action(step, gate_step):
    if step < gate_step - 1:
        return COMPUTE
    return MEAN if step == gate_step - 1 else REUSE


def self_attention_plan(steps, gate_step, warm_up, sp_interval, fi_interval):
    return "".join(self_attention_action(i, gate_step, warm_up, sp_interval, fi_interval) for i in range(steps))


def schedule(patcher, steps, gate_at):
    """The run's sigmas as ComfyUI's KSampler computes them, and gate_step as test_reference.py does."""
    import comfy.samplers as samplers

    model_sampling = patcher.get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(model_sampling, "normal", steps)
    gate_sigma = model_sampling.percent_to_sigma(gate_at)
    gate_step = max(1, sum(1 for s in sigmas[:-1].tolist() if s >= gate_sigma))
    return sigmas, gate_step


# -- the reference -----------------------------------------------------------------------------
class AttentionHooks:
    """Forward hooks that apply one step's action to every attention module of one kind."""

    def __init__(self, modules):
        self.action = COMPUTE
        self.cache = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            if self.action == CACHE:
                self.cache[name] = output.clone()
            elif self.action == MEAN:
                uncond, cond = output.chunk(2)  # ComfyUI's batch order, as in `both` below
                self.cache[name] = ((uncond.float() + cond.float()) / 2).to(output.dtype)
            elif self.action == REUSE:
                stored = self.cache[name]
                assert stored.shape == output.shape, (name, stored.shape, output.shape)
                return stored  # a forward hook's return value replaces the module's output
            return None

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def attention_modules(patcher, suffix):
    return {n: m for n, m in patcher.model.diffusion_model.named_modules() if n.endswith(suffix)}


def reference_tgate_v2(patcher, positive, negative, *, steps, gate_at, warm_up, sp_interval, fi_interval, seed, pooled):
    import comfy.sample as sample

    base = patcher.model
    device = next(base.diffusion_model.parameters()).device
    sigmas, gate_step = schedule(patcher, steps, gate_at)
    sigmas = sigmas.to(device)
    model_sampling = patcher.get_model_object("model_sampling")

    latent = torch.zeros(1, 4, 16, 16)
    noise = sample.prepare_noise(latent, seed)  # on the CPU generator, as comfy.sample does
    x = model_sampling.noise_scaling(sigmas[0], noise.to(device), latent.to(device), max_denoise=True)
    uncond_ctx, cond_ctx = negative[0][0].to(device), positive[0][0].to(device)

    def pooled_y(cond):
        return base.encode_adm(**cond[0][1]).to(device)

    def both(x, sigma):
        extra = {"y": torch.cat([pooled_y(negative), pooled_y(positive)])} if pooled else {}
        out = base.apply_model(torch.cat([x, x]), sigma.repeat(2), c_crossattn=torch.cat([uncond_ctx, cond_ctx]), **extra)
        return out.chunk(2)  # uncond first, then cond

    def uncond_only(x, sigma):
        extra = {"y": pooled_y(negative)} if pooled else {}
        return base.apply_model(x, sigma, c_crossattn=uncond_ctx, **extra)

    self_hooks = AttentionHooks(attention_modules(patcher, "attn1"))
    cross_hooks = AttentionHooks(attention_modules(patcher, "attn2"))
    try:
        for i in range(steps):
            self_hooks.action = self_attention_action(i, gate_step, warm_up, sp_interval, fi_interval)
            cross_hooks.action = cross_attention_action(i, gate_step)
            sigma = sigmas[i : i + 1]
            if i < gate_step:
                uncond, cond = both(x, sigma)
                denoised = uncond + (cond - uncond) * CFG
            else:
                denoised = uncond_only(x, sigma)
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])  # euler, as ComfyUI
    finally:
        self_hooks.remove()
        cross_hooks.remove()
    return base.process_latent_out(x).cpu(), gate_step


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def family_inputs(comfy, family):
    pooled = family == "sdxl"
    patcher = getattr(comfy, family)(seed=3)
    return patcher, comfy.cond(1, pooled=pooled), comfy.cond(2, pooled=pooled), pooled


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_engine_plans_the_hand_written_schedule(name):
    """The engine's plan (tgate.plan_steps) reuses self-attention exactly where the schedule written
    out by hand says and captures the mean at the step before the gate; the reference's rule
    function writes the same schedule, so the reference runs below realise it too."""
    from tgate import Action, SelfAttentionReuse, plan_steps

    s = SETTINGS[name]
    gate_step = EXPECTED_GATE_STEP[name]
    expected = EXPECTED_SELF_ACTIONS[name]
    rule = dict(warm_up=s["warm_up"], sp_interval=s["sp_interval"], fi_interval=s["fi_interval"])
    plans = plan_steps(s["steps"], gate_step, SelfAttentionReuse(**rule))
    reused = "".join("r" if p.self_attention is Action.REUSE else "-" for p in plans)
    assert reused == "".join("r" if a == REUSE else "-" for a in expected)
    # A capture no later step reads is only a compute in the engine; every reuse reads a capture.
    for step, plan in enumerate(plans):
        if plan.self_attention is Action.REUSE:
            assert any(plans[i].self_attention is Action.CAPTURE for i in range(step)), step
    assert plans[gate_step - 1].mean_of_branches and plans[gate_step - 1].cross_attention is Action.CAPTURE
    assert [p.both_branches for p in plans] == [i < gate_step for i in range(s["steps"])]
    if name == "fi2":  # the self-attention mean stored at the gate is reused right after it
        assert plans[gate_step - 1].self_attention is Action.CAPTURE and plans[gate_step].self_attention is Action.REUSE
    assert self_attention_plan(s["steps"], gate_step, **rule) == expected
    # Each setting exercises warm-up, reuse before the gate, the gate, and computing after it.
    assert {COMPUTE, CACHE, REUSE} <= set(expected[: gate_step - 1]) and CACHE in expected[gate_step:]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("gate_at", [0.4, 0.7])
def test_reference_without_self_attention_reuse_matches_the_v1_node(comfy, family, gate_at):
    """With sp_interval = fi_interval = 1 the rule computes self-attention at every step, so V2 is V1:
    this validates the reference loop and hooks against the V1 node, independently of the V2 node."""
    patcher, positive, negative, pooled = family_inputs(comfy, family)
    expected, gate_step = reference_tgate_v2(
        patcher, positive, negative, steps=12, gate_at=gate_at, warm_up=2, sp_interval=1, fi_interval=1, seed=5, pooled=pooled
    )
    assert 2 < gate_step < 12
    got = comfy.sample(comfy.tgate(patcher, gate_at=gate_at), positive, negative, steps=12, cfg=CFG, seed=5)
    assert rel(got, expected) < 1e-5


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_advanced_node_matches_the_reference_rule(comfy, family, name):
    s = SETTINGS[name]
    rule = dict(warm_up=s["warm_up"], sp_interval=s["sp_interval"], fi_interval=s["fi_interval"])
    patcher, positive, negative, pooled = family_inputs(comfy, family)
    expected, gate_step = reference_tgate_v2(
        patcher, positive, negative, steps=s["steps"], gate_at=s["gate_at"], seed=5, pooled=pooled, **rule
    )
    assert gate_step == EXPECTED_GATE_STEP[name]

    def run(model):
        return comfy.sample(model, positive, negative, steps=s["steps"], cfg=CFG, seed=5)

    # "auto" must mean the uncond branch for SD1.5 and SDXL, as the reference does.
    got = run(comfy.tgate_advanced(patcher, gate_at=s["gate_at"], fidelity_branch="auto", **rule))
    assert rel(got, expected) < 1e-5
    # Self-attention reuse makes a difference the comparison can see: not V1, not plain CFG.
    assert rel(run(comfy.tgate(patcher, gate_at=s["gate_at"])), expected) > 1e-3
    assert rel(run(patcher), expected) > 1e-3


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_self_attention_is_computed_only_on_the_steps_the_rule_says(comfy, family, name):
    """Counts attn1.to_q calls (and attn2.to_q calls, and the model's batch) step by step.

    A computed step projects once per layer (both CFG branches go in one batch before the gate,
    one branch after it); a reuse step projects nothing."""
    s = SETTINGS[name]
    rule = dict(warm_up=s["warm_up"], sp_interval=s["sp_interval"], fi_interval=s["fi_interval"])
    patcher, positive, negative, _ = family_inputs(comfy, family)
    model = comfy.tgate_advanced(patcher, gate_at=s["gate_at"], **rule)
    self_layers, cross_layers = attention_modules(patcher, "attn1"), attention_modules(patcher, "attn2")

    with ModelCalls().watch(patcher) as calls:  # euler: one model call per step
        comfy.sample(model, positive, negative, steps=s["steps"], cfg=CFG, seed=5)

    gate_step = EXPECTED_GATE_STEP[name]
    plan = self_attention_plan(s["steps"], gate_step, **rule)
    steps = range(s["steps"])
    assert calls.column("batch") == [2 if i < gate_step else 1 for i in steps]
    assert calls.column("self_q") == [0 if a == REUSE else len(self_layers) for a in plan]
    assert calls.column("cross_q") == [len(cross_layers) if i < gate_step else 0 for i in steps]
