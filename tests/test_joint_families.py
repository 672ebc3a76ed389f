"""T-GATE on the joint-attention families (Flux, Chroma, SD3, AuraFlow, Mochi, Qwen-Image, Lumina 2,
HiDream): tiny random-weight models of ComfyUI's own classes, sampled by ComfyUI's sampler through
the nodes, against an independent reference written here from the rule the joint study chose
(docs/joint/table.md).

The reference drives ComfyUI's model directly (BaseModel.apply_model, inputs from the model's own
extra_conds) with its own euler loop and classifier-free guidance, each branch in its own call,
and freezes the text with nothing but torch forward hooks on the modules that make the text keys
and values (listed here, from the model code, not from the pack): at the last step before the gate
it keeps the fidelity branch's text rows of their outputs; after it, one branch runs and the hooks
put the kept rows back. Everything else of the text stream it computes as usual; the pack skips
what of it no image row reads, and the image rows must come out the same.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tgate_testkit.models import ARCHITECTURES, build_model, random_cond

STEPS = 10
CFG = 4.0


@dataclass(frozen=True)
class Case:
    arch: str
    # Modules whose outputs hold the text keys and values: (path suffix, joined) where joined means
    # the module runs over [text; image] rows, text first, and only its text rows are frozen.
    frozen: tuple[tuple[str, bool], ...]
    text_only: tuple[str, ...]  # every module computing text rows only (path suffixes)
    joined: tuple[str, ...]  # every module computing [text; image] rows
    text_extra: int = 0  # rows the model puts before the text in its text stream (AuraFlow's registers)
    # Of a joined module's text rows, the columns the image reads, in multiples of its input width (0:
    # all): Flux's linear1 gives q, k, v (3 x hidden), then the MLP input, which only feeds linear2.
    joined_columns: int = 0
    size: int = 64  # the image's pixels across

    def text_rows(self, cond) -> int:
        """The rows of `cond`'s text in the joined rows: its tokens, or of a padded text whose model
        packs the unpadded tokens alone (Lumina 2), those its mask marks."""
        context, options = cond[0]
        mask = options.get("attention_mask") if self.packs_unpadded else None
        return (int(mask[0].sum()) if mask is not None else context.shape[1]) + self.text_extra

    packs_unpadded: bool = False  # joined rows hold the text's unpadded tokens alone (Lumina 2)
    text_last: bool = False  # joined rows are [image; text] (HiDream's single blocks), else [text; image]


AURA_LAYERS = (("double_layers", 0), ("single_layers", 0), ("single_layers", 1))
FLUX_FROZEN = ((".txt_attn.qkv", False), (".linear1", True))
FLUX_TEXT = (".txt_attn.qkv", ".txt_attn.proj", ".txt_mlp")
LUMINA_FEED_FORWARD = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
CASES = {
    "flux": Case("tiny-flux", FLUX_FROZEN, FLUX_TEXT, (".linear1", ".linear2"), joined_columns=3),
    "chroma": Case("tiny-chroma", FLUX_FROZEN, FLUX_TEXT, (".linear1", ".linear2"), joined_columns=3),
    "sd3": Case(
        "tiny-sd3",
        ((".context_block.attn.qkv", False),),
        (".context_block.attn.qkv", ".context_block.attn.proj", ".context_block.mlp"),
        (),
    ),
    "auraflow": Case(
        "tiny-auraflow",
        tuple((f"{layers}.{n}.attn.w1{p}", layers == "single_layers") for layers, n in AURA_LAYERS for p in "kv"),
        tuple(f"double_layers.0.{m}" for m in ("attn.w1q", "attn.w1k", "attn.w1v", "attn.w1o", "mlpC")),
        tuple(f"single_layers.{n}.{m}" for n in (0, 1) for m in ("attn.w1q", "attn.w1k", "attn.w1v", "attn.w1o", "mlp")),
        text_extra=8,
        size=128,
    ),
    "mochi": Case(
        "tiny-mochi",
        ((".attn.qkv_y", False),),
        ("blocks.0.attn.qkv_y", "blocks.1.attn.qkv_y", "blocks.0.attn.proj_y", "blocks.0.mlp_y"),
        (),
    ),
    "lumina2": Case(
        "tiny-lumina2",
        tuple((f"layers.{n}.attention.qkv", True) for n in (0, 1)),
        ("cap_embedder", *(f"context_refiner.0.{m}" for m in ("attention.qkv", "attention.out", *LUMINA_FEED_FORWARD))),
        tuple(f"layers.{n}.{m}" for n in (0, 1) for m in ("attention.qkv", "attention.out", "feed_forward")),
        packs_unpadded=True,
    ),
    "hidream": Case(
        "tiny-hidream",
        (
            *((f"double_stream_blocks.0.block.attn1.to_{p}_t", False) for p in "kv"),
            *((f"single_stream_blocks.{n}.block.attn1.to_{p}", True) for n in (0, 1) for p in "kv"),
        ),
        (
            *(f"caption_projection.{n}.linear" for n in range(4)),
            *(f"double_stream_blocks.0.block.attn1.to_{p}_t" for p in "qkv"),
            "double_stream_blocks.0.block.attn1.to_out_t",
            *(f"double_stream_blocks.0.block.ff_t.w{n}" for n in (1, 2, 3)),
        ),
        tuple(
            f"single_stream_blocks.{n}.block.{m}"
            for n in (0, 1)
            for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "ff_i")
        ),
        text_extra=16,  # the text stream's last Llama layer and the block's own, 8 tokens each, after T5's
        text_last=True,
    ),
    "qwen-image": Case(
        "tiny-qwen-image",
        ((".attn.add_k_proj", False), (".attn.add_v_proj", False)),
        (".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj", ".attn.to_add_out", ".txt_mlp"),
        (),
    ),
}
_MODELS: dict = {}


@pytest.fixture(params=sorted(CASES))
def case(request, comfy):
    case = CASES[request.param]
    if case.arch not in _MODELS:
        _MODELS[case.arch] = build_model(case.arch, seed=4)
    return case, _MODELS[case.arch]


def conds(case: Case, tokens: tuple[int, int] | None = None):
    """The positive and negative conditioning; `tokens`: their text lengths, where they differ."""
    positive, negative = random_cond(case.arch, 1), random_cond(case.arch, 2)
    if tokens is not None:

        def cut(cond, n):
            options = dict(cond[0][1])
            if options.get("attention_mask") is not None:
                options["attention_mask"] = options["attention_mask"][:, :n]
            return [[cond[0][0][:, :n], options]]

        positive, negative = cut(positive, tokens[0]), cut(negative, tokens[1])
    return positive, negative


def latent(case: Case, size: int | None = None) -> torch.Tensor:
    return ARCHITECTURES[case.arch].empty_latent(1, size or case.size)


def reference(
    patcher,
    case: Case,
    positive,
    negative,
    gate_at: float,
    fidelity: str = "cond",
    seed: int = 0,
    size=None,
    cfg=CFG,
    transformer_options=None,
):
    """T-GATE's joint rule, computed independently (see the module docstring)."""
    import comfy.model_management as mm
    import comfy.sample as sample
    import comfy.samplers as samplers

    # The model is driven directly, as built: a patcher sampled before (a LoRA's clone) may have left
    # its weight patches on the shared modules, which unloading takes off.
    mm.unload_all_models()
    base = patcher.model
    model_sampling = patcher.get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(model_sampling, "normal", STEPS)
    gate_sigma = model_sampling.percent_to_sigma(gate_at)
    gate = max(1, sum(1 for s in sigmas[:-1].tolist() if s >= gate_sigma))
    size = size or case.size
    empty = latent(case, size)
    x = model_sampling.noise_scaling(sigmas[0], sample.prepare_noise(empty, seed), empty, max_denoise=True)

    def inputs(cond):
        params = dict(cond[0][1], cross_attn=cond[0][0], device=x.device, noise=x, width=size, height=size)
        out = {k: v.cond for k, v in base.extra_conds(**params).items()}
        return {**out, "transformer_options": transformer_options} if transformer_options else out

    branch = {"cond": inputs(positive), "uncond": inputs(negative)}
    text_rows = {"cond": case.text_rows(positive), "uncond": case.text_rows(negative)}
    modules = {}
    for name, module in base.diffusion_model.named_modules():
        joined = next((j for suffix, j in case.frozen if name.endswith(suffix)), None)
        if joined is not None:
            modules[name] = (module, joined)
    assert modules
    kept: dict[str, torch.Tensor] = {}
    rows = text_rows[fidelity]

    def text_of(out):
        return out[:, out.shape[1] - rows :] if case.text_last else out[:, :rows]

    def keep(name, joined):
        return lambda m, a, out: kept.__setitem__(name, (text_of(out) if joined else out).clone())

    def put_back(name, joined):
        if not joined:
            return lambda m, a, out: kept[name]
        if case.text_last:
            return lambda m, a, out: torch.cat((out[:, : out.shape[1] - rows], kept[name]), 1)
        return lambda m, a, out: torch.cat((kept[name], out[:, rows:]), 1)

    for i in range(STEPS):
        sigma = sigmas[i : i + 1]
        if i < gate:
            outs = {}
            for b in ("uncond", "cond"):
                hooks = []
                if i == gate - 1 and b == fidelity:
                    hooks = [m.register_forward_hook(keep(n, j)) for n, (m, j) in modules.items()]
                outs[b] = base.apply_model(x, sigma, **branch[b])
                for h in hooks:
                    h.remove()
            denoised = outs["uncond"] + (outs["cond"] - outs["uncond"]) * cfg
        else:
            hooks = [m.register_forward_hook(put_back(n, j)) for n, (m, j) in modules.items()]
            denoised = base.apply_model(x, sigma, **branch[fidelity])
            for h in hooks:
                h.remove()
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])  # euler
    return base.process_latent_out(x), gate


def sample(comfy, patched, case, positive, negative, size=None, cfg=CFG, **settings):
    return comfy.sample(patched, positive, negative, latent=latent(case, size), steps=STEPS, cfg=cfg, **settings)


def test_the_family_is_served_by_its_text_stream(comfy, case):
    case, model = case
    engine = comfy.engine
    family = engine.family_of(model.model.model_config)
    roles = engine.text_roles(family, model.model.diffusion_model)
    names = list(roles)
    assert family.text_stream is not None and family.cross_attention is None
    every = case.text_only + case.joined
    assert {s for s in every if any(n.endswith(s) for n in names)} == set(every)  # every text module has a role
    assert all(n.endswith(every) for n in names)


def test_gate_one_is_bit_identical_for_both_nodes(comfy, case):
    case, model = case
    positive, negative = conds(case)
    base = sample(comfy, model, case, positive, negative)
    for patched in (comfy.tgate(model, gate_at=1.0), comfy.tgate_advanced(model, gate_at=1.0, sp_interval=1, fi_interval=1)):
        assert torch.equal(sample(comfy, patched, case, positive, negative), base)


@pytest.mark.parametrize("fidelity", ["cond", "uncond"])
def test_the_node_matches_the_reference_rule(comfy, case, fidelity):
    case, model = case
    positive, negative = conds(case)
    expected, gate = reference(model, case, positive, negative, 0.4, fidelity)
    assert 0 < gate < STEPS
    got = sample(comfy, comfy.tgate(model, gate_at=0.4, fidelity_branch=fidelity), case, positive, negative)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The rule makes a difference the comparison can see: plain CFG, and the text left live after the gate.
    plain = sample(comfy, model, case, positive, negative)
    assert (plain - expected).abs().max() > 1e-2


def test_at_cfg_one_the_distilled_case_freezes_the_text_alone(comfy, case):
    """Flux dev and schnell sample at CFG 1 (ComfyUI then evaluates the positive alone): the gate
    saves the text rows only, and the result is the reference's frozen text."""
    case, model = case
    positive, negative = conds(case)
    expected, _ = reference(model, case, positive, negative, 0.4, "cond", cfg=1.0)
    got = sample(comfy, comfy.tgate(model, gate_at=0.4, fidelity_branch="auto"), case, positive, negative, cfg=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (sample(comfy, model, case, positive, negative, cfg=1.0) - expected).abs().max() > 1e-3


def test_text_lengths_that_differ_run_apart_and_keep_the_fidelity_branchs_rows(comfy, case):
    """Unpadded text (Chroma, Qwen-Image): a negative shorter than the positive runs in its own model
    call; the capture keeps the positive's rows from its call, and the negative's call keeps nothing."""
    case, model = case
    positive, negative = conds(case, tokens=(8, 5))
    expected, _ = reference(model, case, positive, negative, 0.4, "cond")
    got = sample(comfy, comfy.tgate(model, gate_at=0.4, fidelity_branch="cond"), case, positive, negative)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _flops_per_call(comfy, patched, model, case, positive, negative):
    """For each model call, {text-stream module path: FLOPs it ran}, counted by torch's FLOP counter
    around each module's call."""
    calls: list[dict] = []
    diffusion_model = model.model.diffusion_model
    suffixes = case.text_only + case.joined
    counting: list[FlopCounterMode] = []

    def pre(module, args):
        counting.append(FlopCounterMode(display=False))
        counting[-1].__enter__()

    def post(name):
        def hook(module, args, out):
            counter = counting.pop()
            counter.__exit__(None, None, None)
            calls[-1][name] = counter.get_total_flops()

        return hook

    handles = [diffusion_model.register_forward_pre_hook(lambda m, a: calls.append({}))]
    for name, module in diffusion_model.named_modules():
        if name.endswith(suffixes):
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post(name))]
    try:
        sample(comfy, patched, case, positive, negative)
    finally:
        for h in handles:
            h.remove()
    return calls


def test_after_the_gate_one_branch_and_no_text_rows_computed(comfy, case):
    case, model = case
    positive, negative = conds(case)
    calls = _flops_per_call(comfy, comfy.tgate(model, gate_at=0.4, fidelity_branch="auto"), model, case, positive, negative)
    plain = _flops_per_call(comfy, model, model, case, positive, negative)
    assert len(plain) == len(calls) == STEPS  # the branches batched in one call per step
    gate = next(i for i, call in enumerate(calls) if call != plain[i])
    assert 0 < gate < STEPS
    text, image = case.text_rows(positive), latent(case).shape[-1] ** 2 // 4
    for after in calls[gate:]:
        assert after.keys() == plain[0].keys() and len(after) > 0
        for name, flops in after.items():
            if name.endswith(case.joined):  # one branch's image rows alone
                assert flops == plain[0][name] // 2 * image // (text + image), name
            else:
                assert flops == 0, name


@pytest.mark.parametrize("family", ["flux", "qwen-image"])
def test_reference_images_on_the_positive_stay_computed_image_rows(comfy, family):
    """Flux Kontext and Qwen-Image-Edit append a reference image's tokens to the image rows
    (ReferenceLatent sets them on the positive only): they are image rows, computed every step, and
    the positive, which `auto` keeps, has them after the gate."""
    case = CASES[family]
    if case.arch not in _MODELS:
        _MODELS[case.arch] = build_model(case.arch, seed=4)
    model = _MODELS[case.arch]
    positive, negative = conds(case)
    reference_image = torch.randn(latent(case).shape, generator=torch.Generator().manual_seed(9))
    positive = [[positive[0][0], {**positive[0][1], "reference_latents": [reference_image]}]]
    expected, _ = reference(model, case, positive, negative, 0.4, "cond")
    got = sample(comfy, comfy.tgate(model, gate_at=0.4, fidelity_branch="auto"), case, positive, negative)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    without, _ = reference(model, case, conds(case)[0], negative, 0.4, "cond")
    assert (without - expected).abs().max() > 1e-3  # the reference image makes a difference the check sees


def test_what_is_kept_is_the_fidelity_branchs_read_rows_alone(comfy, case):
    """The cache holds, for the one branch that runs after the gate, each frozen module's text rows, of
    a joined module only the columns the image reads: its size, counted from the model's modules."""
    from tgate_testkit.logs import RunLog

    case, model = case
    positive, negative = conds(case)
    rows = case.text_rows(positive)
    expected = 0
    for name, module in model.model.diffusion_model.named_modules():
        joined = next((j for suffix, j in case.frozen if name.endswith(suffix)), None)
        if joined is not None:
            columns = case.joined_columns * module.in_features if joined and case.joined_columns else module.out_features
            expected += rows * columns * 4  # fp32
    with RunLog().on() as log:
        sample(comfy, comfy.tgate(model, gate_at=0.4, fidelity_branch="auto"), case, positive, negative)
    assert expected > 0 and log.runs[0]["cache_bytes"] == expected


def test_a_kept_text_row_is_never_changed_in_place(comfy, case):
    """Flux adds into its text rows in place (`txt += ...`, Chroma `addcmul_`): what T-GATE keeps at
    the gate must be what it returns at the last step."""
    case, model = case
    patched = comfy.tgate(model, gate_at=0.4, fidelity_branch="auto")
    slot = patched.model_options["transformer_options"]["tgate"].slot
    snapshots = {}

    def callback(step, x0, x, total):
        entries = {k: {c: e.view().clone() for c, e in v.items()} for k, v in slot.run.store._entries.items()}
        snapshots.setdefault("first", entries if entries else None)
        if entries:
            snapshots["last"] = {k: {c: e.view() for c, e in v.items()} for k, v in slot.run.store._entries.items()}
            snapshots.setdefault("kept", entries)

    positive, negative = conds(case)
    sample(comfy, patched, case, positive, negative, callback=callback)
    kept, last = snapshots["kept"], snapshots["last"]
    assert kept and kept.keys() == last.keys()
    for layer in kept:
        for chunk, tensor in kept[layer].items():
            assert torch.equal(tensor, last[layer][chunk]), layer


def test_a_second_size_with_the_same_model_captures_anew(comfy, case):
    """A hires pass samples the same patched model at another size: its run keeps its own text rows."""
    case, model = case
    patched = comfy.tgate(model, gate_at=0.4, fidelity_branch="auto")
    positive, negative = conds(case)
    sample(comfy, patched, case, positive, negative)
    got = sample(comfy, patched, case, positive, negative, size=96)
    expected, _ = reference(model, case, positive, negative, 0.4, "cond", size=96)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_cancelled_run_leaves_nothing_behind(comfy, case):
    import comfy.model_management as mm

    case, model = case
    patched = comfy.tgate(model, gate_at=0.4, fidelity_branch="auto")
    slot = patched.model_options["transformer_options"]["tgate"].slot
    kept = []

    def cancel(step, x0, x, total):
        kept.extend(weakref.ref(e.block) for v in slot.run.store._entries.values() for e in v.values())
        if step == STEPS - 2:
            raise mm.InterruptProcessingException()

    positive, negative = conds(case)
    with pytest.raises(mm.InterruptProcessingException):
        sample(comfy, patched, case, positive, negative, callback=cancel)
    gc.collect()
    assert kept and all(ref() is None for ref in kept), "a kept text row outlived its cancelled run"


def test_self_attention_reuse_is_refused_with_the_fix(comfy, case):
    case, model = case
    with pytest.raises(ValueError, match="sp_interval and fi_interval to 1"):
        comfy.tgate_advanced(model, gate_at=0.4, sp_interval=3, fi_interval=1)


def _lumina2():
    case = CASES["lumina2"]
    if case.arch not in _MODELS:
        _MODELS[case.arch] = build_model(case.arch, seed=4)
    return case, _MODELS[case.arch]


def _padded(cond, masks: list[list[int]]):
    """`cond` with its caption padded as `masks` mark it, one mask per image (1: a caption token, 0:
    padding), as an encoder that pads gives it: Lumina 2's model then gets the mask and packs each
    image's unpadded tokens alone before its image rows."""
    context, options = cond[0]
    mask = torch.tensor(masks, dtype=torch.long)
    return [[context.expand(mask.shape[0], -1, -1).clone(), {**options, "attention_mask": mask}]]


def test_lumina2_a_padded_caption_keeps_its_unpadded_rows_alone(comfy):
    """A padded caption with its mask (ComfyUI's Gemma encoder does not pad, another encoder may): the
    joined rows start with the unpadded tokens alone, and the gate keeps those rows, per the mask."""
    case, model = _lumina2()
    positive, negative = conds(case)
    positive, negative = _padded(positive, [[1] * 6 + [0] * 2]), _padded(negative, [[1] * 5 + [0] * 3])
    assert case.text_rows(positive) == 6
    expected, _ = reference(model, case, positive, negative, 0.4, "cond")
    got = sample(comfy, comfy.tgate(model, gate_at=0.4, fidelity_branch="auto"), case, positive, negative)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    unpadded, _ = reference(model, case, conds(case)[0], negative, 0.4, "cond")
    assert (unpadded - expected).abs().max() > 1e-3  # the padding makes a difference the check sees


def test_lumina2_text_rows_per_call_follow_the_models_own_rule(comfy):
    """How many caption rows lead each image's joined rows, as NextDiT.patchify_and_embed counts them:
    the mask's row sums where the call has a mask (a padded caption), else `num_tokens`. Images whose
    sums differ have no one count: their joined modules then compute in full and keep nothing (and the
    run warns). ComfyUI 0.3.64's own Lumina 2 cannot yet attend with a batch of masks (its attention
    does not broadcast a (batch, tokens) mask over heads), so this is checked on the rule alone."""
    engine = comfy.engine
    lumina = engine.family_of(_lumina2()[1].model.model_config).text_stream
    rows = engine.call_text_rows
    assert rows(lumina, {"num_tokens": 7}) == 7
    assert rows(lumina, {"num_tokens": 11, "attention_mask": torch.tensor([[1] * 6 + [0] * 2] * 2)}) == 6
    assert rows(lumina, {"num_tokens": 14, "attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2])}) is None
    assert rows(lumina, {}) is None
    flux = engine.family_of(build_model("tiny-flux").model.model_config).text_stream
    assert rows(flux, {"num_tokens": 7}) is None  # Flux's count comes from its text modules' rows
