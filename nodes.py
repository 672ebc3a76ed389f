"""The T-GATE node: patches a clone of a ComfyUI MODEL with the engine in `tgate/`."""

from __future__ import annotations

import comfy.patcher_extension
from comfy.ldm.modules.attention import CrossAttention
from comfy_api.latest import ComfyExtension, io

from .tgate import (
    CACHE_DEVICES,
    CONFIG_KEY,
    FidelityBranch,
    TGateConfig,
    apply_model_with_gate,
    cached_cross_attention,
    calc_cond_batch_with_gate,
    cross_attention_layers,
    require_cross_attention,
    sample_with_gate,
)

WRAPPER_KEY = "tgate"
WRAPPERS = {
    comfy.patcher_extension.WrappersMP.OUTER_SAMPLE: sample_with_gate,
    comfy.patcher_extension.WrappersMP.CALC_COND_BATCH: calc_cond_batch_with_gate,
    comfy.patcher_extension.WrappersMP.APPLY_MODEL: apply_model_with_gate,
}


def apply_tgate(model, config: TGateConfig):
    """A clone of `model` with T-GATE; `model` itself is left unchanged.

    Each cross-attention module gets an object patch on its `forward` (parameter names stay the
    same, so LoRA and lowvram weight patching are unaffected), and the run is driven by three
    chainable wrappers (see tgate/run.py). Applying the node twice replaces the first application.
    """
    layers = require_cross_attention(
        cross_attention_layers(model.get_model_object("diffusion_model"), CrossAttention), model.model.model_config
    )
    patched = model.clone()
    for layer in layers:
        key = f"diffusion_model.{layer}.forward"
        patched.add_object_patch(key, cached_cross_attention(layer, patched.get_model_object(key)))
    for wrapper_type, wrapper in WRAPPERS.items():
        patched.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        patched.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
    patched.model_options.setdefault("transformer_options", {})[CONFIG_KEY] = config
    return patched


class TGate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TGate",
            display_name="T-GATE",
            category="model_patches/unet",
            description=(
                "Training-free speed-up for SD1.x, SD2.x and SDXL (T-GATE, Liu et al.). Cross-attention "
                "settles after the first steps: at the gate its output is cached and reused, text stops "
                "entering the network, and classifier-free guidance runs one branch instead of two. "
                "Steps before the gate are unchanged. Does not apply to joint-attention models "
                "(Flux, SD3, ...) and gains little on few-step distilled models."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x, SD2.x or SDXL model to speed up. It is cloned, never changed."),
                io.Float.Input(
                    "gate_at",
                    default=0.4,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip=(
                        "Fraction of the denoising process spent planning semantics with text (ComfyUI's "
                        "percent convention, as ControlNet start/end). Cross-attention is cached at the last "
                        "step before it. 0.4 gates after 10 of 25 steps, the paper's SD/SDXL setting; lower is "
                        "faster but follows the prompt less; 1.0 never gates; 0.0 gates after the first step."
                    ),
                ),
                io.Combo.Input(
                    "fidelity_branch",
                    options=[b.value for b in FidelityBranch],
                    default=FidelityBranch.UNCOND.value,
                    tooltip=(
                        "Which classifier-free guidance branch runs after the gate. uncond: the negative "
                        "prompt's branch, as in the paper and the official code. cond: the positive branch, for "
                        "workflows whose positive carries ControlNet or area conds that must persist."
                    ),
                ),
                io.Combo.Input(
                    "cache_device",
                    options=list(CACHE_DEVICES),
                    default=CACHE_DEVICES[0],
                    tooltip=(
                        "Where the cached cross-attention outputs live until the run ends. model_device is "
                        "fastest; cpu saves GPU memory (SDXL 1024x1024: about 0.2 GB per image) at the cost of "
                        "a copy per layer and step."
                    ),
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with T-GATE; sample it with any sampler.")],
        )

    @classmethod
    def validate_inputs(cls, fidelity_branch=None, cache_device=None) -> bool | str:
        # ComfyUI checks FLOAT ranges itself but (as of 0.3.64) not the options of V3 combos, so
        # a prompt sent to the API with a wrong choice is refused here, before it is queued.
        try:
            TGateConfig(fidelity_branch=fidelity_branch or FidelityBranch.UNCOND, cache_device=cache_device or CACHE_DEVICES[0])
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, gate_at: float, fidelity_branch: str, cache_device: str) -> io.NodeOutput:
        config = TGateConfig(gate_at=gate_at, fidelity_branch=fidelity_branch, cache_device=cache_device)
        return io.NodeOutput(apply_tgate(model, config))


class TGateExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TGate]
