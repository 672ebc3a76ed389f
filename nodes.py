"""The T-GATE nodes: patch a clone of a ComfyUI MODEL with the engine in `tgate/`."""

from __future__ import annotations

import logging

import comfy.patcher_extension
from comfy_api.latest import ComfyExtension, io

from .inputs import ValidatedCombo
from .probe_node import TGateProbe
from .tgate import (
    CACHE_DEVICES,
    CONFIG_KEY,
    CROSS,
    FAMILIES,
    KINDS,
    CallSlot,
    DeepCache,
    DeepCacheError,
    FidelityBranch,
    GatePatch,
    SelfAttentionReuse,
    TGateConfig,
    apply_model_with_gate,
    attention_layers,
    calc_cond_batch_with_gate,
    deep_block_child,
    deep_layout,
    family_of,
    gated_attention,
    gated_text_module,
    guided_by_stand_in,
    sample_with_gate,
    supported_families,
    text_roles,
)

log = logging.getLogger("tgate")

WRAPPERS = {
    comfy.patcher_extension.WrappersMP.OUTER_SAMPLE: sample_with_gate,
    comfy.patcher_extension.WrappersMP.CALC_COND_BATCH: calc_cond_batch_with_gate,
    comfy.patcher_extension.WrappersMP.APPLY_MODEL: apply_model_with_gate,
}


def apply_tgate(model, config: TGateConfig):
    """A clone of `model` with T-GATE; `model` itself is left unchanged.

    Each attention module T-GATE drives gets an object patch on its `forward` (parameter names stay
    the same, so LoRA and lowvram weight patching are unaffected), and the run is driven by three
    chainable wrappers (see tgate/run.py). Applying T-GATE again replaces the first application.
    """
    family = family_of(model.model.model_config)  # refuses, with the reason, what it cannot serve
    reuse = config.self_attention
    if family.self_attention is None and reuse is not None and (reuse.sp_interval, reuse.fi_interval) != (1, 1):
        raise ValueError(
            f"T-GATE cannot reuse self-attention in this {family.name} model (sp_interval {reuse.sp_interval}, "
            f"fi_interval {reuse.fi_interval}): its joint attention mixes text and image, so no image-only attention "
            "output exists to reuse. Set sp_interval and fi_interval to 1, or use the T-GATE node."
        )
    kinds = KINDS if reuse is not None and family.self_attention is not None else (CROSS,)
    diffusion_model = model.get_model_object("diffusion_model")
    layers = attention_layers(family, diffusion_model, kinds)
    roles = text_roles(family, diffusion_model) if family.text_stream is not None else {}
    deep = None
    if config.deep_cache is not None:
        if not family.deep_cache:
            raise DeepCacheError(
                f"DeepCache is not built for {family.name} models (it skips UNet blocks, and is served for "
                f"SD1.x, SD2.x and SDXL): set deepcache_interval to 1 (DeepCache off) for this model."
            )
        deep = deep_layout(diffusion_model, config.deep_cache.branch)
    fidelity_branch = family.auto_branch if config.fidelity_branch is FidelityBranch.AUTO else config.fidelity_branch
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    previous: GatePatch | None = options.get(CONFIG_KEY)
    if previous is not None:
        log.warning(
            "T-GATE is applied twice in a chain: the later node's settings (%s) replace the earlier one's (%s)",
            config.describe(),
            previous.config.describe(),
        )
        restored = set(previous.layer_kinds) - set(layers)  # e.g. advanced, then simple: attn1 back to normal
        restored |= set(previous.deep.skipped if previous.deep else ()) - set(deep.skipped if deep else ())
        for layer in restored:
            key = f"diffusion_model.{layer}.forward"
            patched.add_object_patch(key, patched.get_model_object(key).tgate_original)
    slot = CallSlot()
    for layer, kind in layers.items():
        key = f"diffusion_model.{layer}.forward"
        if layer in roles:
            module = diffusion_model.get_submodule(layer)
            forward = gated_text_module(layer, roles[layer], patched.get_model_object(key), slot, family.text_stream, module)
        else:
            forward = gated_attention(layer, kind, patched.get_model_object(key), slot, family.site(kind).tuple_output)
        patched.add_object_patch(key, forward)
    for path in deep.skipped if deep else ():
        key = f"diffusion_model.{path}.forward"
        patched.add_object_patch(key, deep_block_child(path, deep, patched.get_model_object(key), slot))
    for wrapper_type, wrapper in WRAPPERS.items():
        patched.remove_wrappers_with_key(wrapper_type, CONFIG_KEY)
        patched.add_wrapper_with_key(wrapper_type, CONFIG_KEY, wrapper)
    # First of the post-CFG functions, so that those added before or after T-GATE in the chain see
    # the guided result it gives (see guided_by_stand_in).
    post_cfg = [f for f in patched.model_options.get("sampler_post_cfg_function", []) if f is not guided_by_stand_in]
    patched.model_options["sampler_post_cfg_function"] = [guided_by_stand_in, *post_cfg]
    options[CONFIG_KEY] = GatePatch(config, family.name, fidelity_branch, layers, slot, deep, roles, family.text_stream)
    if config.fidelity_branch is FidelityBranch.AUTO:
        log.info("T-GATE: %s model; fidelity_branch auto keeps the %s branch", family.name, fidelity_branch.value)
    return patched


def _auto_choices() -> str:
    return "; ".join(f"{f.name}: {f.auto_branch.value}" for f in FAMILIES)


def common_inputs() -> list:
    """The inputs both nodes share, with the same names and defaults."""
    return [
        io.Model.Input("model", tooltip=f"The model to speed up ({supported_families()}). It is cloned, never changed."),
        io.Float.Input(
            "gate_at",
            default=0.4,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip=(
                "Fraction of the denoising process spent planning semantics with text (ComfyUI's percent "
                "convention, as ControlNet start/end). Cross-attention is cached at the last step before it. "
                "0.4 gates after 10 of 25 steps, the paper's SD/SDXL setting; lower is faster but follows the "
                "prompt less; 1.0 never gates (T-GATE off); 0.0 gates after the first step."
            ),
        ),
        ValidatedCombo(
            "fidelity_branch",
            options=[b.value for b in FidelityBranch],
            default=FidelityBranch.AUTO.value,
            tooltip=(
                "Which classifier-free guidance branch runs after the gate. auto: the model family's choice "
                f"({_auto_choices()}): the negative's branch as in the paper, or the positive's where only the "
                "positive carries the input image. uncond: the negative prompt's branch. cond: the positive branch, "
                "for workflows whose positive carries ControlNet or area conds that must persist."
            ),
        ),
        ValidatedCombo(
            "cache_device",
            options=list(CACHE_DEVICES),
            default=CACHE_DEVICES[0],
            tooltip=(
                "Where the cached attention outputs live until the run ends. model_device is fastest; cpu saves "
                "GPU memory (SDXL 1024x1024: about 0.2 GB per image for cross-attention, twice that and more "
                "with the advanced node's self-attention) at the cost of a copy per layer and step."
            ),
        ),
    ]


DESCRIPTION = (
    "Training-free speed-up (T-GATE, Liu et al.) for {families}. Cross-attention settles after the first steps: "
    "at the gate its output is cached and reused, text stops entering the network, and classifier-free guidance "
    "runs one branch instead of two. In the joint-attention models (Flux, Chroma, Qwen-Image, SD3, AuraFlow, Mochi, "
    "Lumina 2, HiDream), whose attention mixes text and image tokens, the text stream's keys and values are frozen at "
    "the gate instead. Steps before the gate are unchanged. "
    "Refuses, with the reason, the families it cannot serve exactly (HunyuanVideo, OmniGen 2, ...); gains little on "
    "few-step distilled models."
)


class TGate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TGate",
            display_name="T-GATE",
            category="model_patches/unet",
            description=DESCRIPTION.format(families=supported_families()),
            inputs=common_inputs(),
            outputs=[io.Model.Output(tooltip="The model with T-GATE; sample it with any sampler.")],
        )

    @classmethod
    def execute(cls, model, gate_at: float, fidelity_branch: str, cache_device: str) -> io.NodeOutput:
        config = TGateConfig(gate_at=gate_at, fidelity_branch=fidelity_branch, cache_device=cache_device)
        return io.NodeOutput(apply_tgate(model, config))


# TGATE-V2's schedule inputs: name (as in the paper and the official code), minimum, tooltip.
SCHEDULE_INPUTS = (
    (
        "warm_up",
        0,
        "Steps at the start computed in full before self-attention is first cached (at step warm_up). "
        "Official: 2 for SD, SDXL and PixArt; 0 for LCM.",
    ),
    (
        "sp_interval",
        1,
        "Semantics-planning interval: before the gate, self-attention is recomputed (and cached) at steps divisible "
        "by it and reused in between. Official: 5 for SD/SDXL, 3 for PixArt. 1 never reuses.",
    ),
    (
        "fi_interval",
        1,
        "Fidelity-improving interval: after the gate, self-attention is recomputed at steps divisible by it and "
        "reused in between. Official: 1 (recompute every step). Higher is faster but blurs fine detail.",
    ),
)

# DeepCache's inputs: name, default (off), minimum, tooltip.
DEEPCACHE_INPUTS = (
    (
        "deepcache_interval",
        1,
        1,
        "DeepCache (official cache_interval): the UNet's deep blocks run every this many steps, and in between their "
        "output from the last such step is reused, so a step runs only the outer blocks. Restarted at the last step "
        "before the gate and at the gate. 1: DeepCache off (the result is unchanged). Official with T-GATE: 3. "
        "SD1.x, SD2.x and SDXL only.",
    ),
    (
        "deepcache_branch",
        0,
        0,
        "DeepCache's cut (official cache_branch_id): input_blocks[0..branch] and the last branch+1 output blocks run "
        "every step, the blocks between them only every deepcache_interval steps. 0 (official) is fastest; higher "
        "keeps more detail. SD1.5 goes up to 10, SDXL up to 7.",
    ),
)


class TGateAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        official = SelfAttentionReuse()
        return io.Schema(
            node_id="TGateAdvanced",
            display_name="T-GATE (advanced)",
            category="model_patches/unet",
            description=DESCRIPTION.format(families=supported_families())
            + " The advanced node is TGATE-V2: it also reuses self-attention on the official schedule (warm_up, "
            "sp_interval, fi_interval as in the paper and the official code), for more speed at some memory; "
            "sp_interval 1 and fi_interval 1 give the simple node's result. deepcache_interval above 1 adds DeepCache "
            "(SD1.x, SD2.x, SDXL): the deep UNet blocks are reused between refresh steps; official with T-GATE: "
            "interval 3, branch 0, sp_interval 1 (about 3.6x on SDXL).",
            inputs=[
                *common_inputs(),
                *(
                    io.Int.Input(name, default=getattr(official, name), min=low, max=1000, tooltip=tooltip)
                    for name, low, tooltip in SCHEDULE_INPUTS
                ),
                *(
                    io.Int.Input(name, default=default, min=low, max=1000, tooltip=tooltip, optional=True)
                    for name, default, low, tooltip in DEEPCACHE_INPUTS
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with TGATE-V2; sample it with any sampler.")],
        )

    @classmethod
    def execute(
        cls,
        model,
        gate_at: float,
        fidelity_branch: str,
        cache_device: str,
        warm_up: int,
        sp_interval: int,
        fi_interval: int,
        deepcache_interval: int = 1,
        deepcache_branch: int = 0,
    ) -> io.NodeOutput:
        reuse = SelfAttentionReuse(warm_up=warm_up, sp_interval=sp_interval, fi_interval=fi_interval)
        # Checked even when off, so a bad value is reported where it was typed.
        deep = DeepCache(interval=deepcache_interval, branch=deepcache_branch)
        config = TGateConfig(
            gate_at=gate_at,
            fidelity_branch=fidelity_branch,
            cache_device=cache_device,
            self_attention=reuse,
            deep_cache=deep if deep.interval > 1 else None,
        )
        return io.NodeOutput(apply_tgate(model, config))


class TGateExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TGate, TGateAdvanced, TGateProbe]
