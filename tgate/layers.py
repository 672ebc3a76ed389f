"""Finding the cross-attention layers T-GATE can cache, and refusing models that have none."""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Model families (ComfyUI `model_config` class names, base classes included) whose text enters
# through joint attention over concatenated text and image tokens: there is no text-only
# cross-attention output to cache.
JOINT_ATTENTION_FAMILIES = frozenset(
    {
        "SD3",
        "Flux",
        "Chroma",
        "AuraFlow",
        "QwenImage",
        "HunyuanVideo",
        "GenmoMochi",
        "HiDream",
        "Lumina2",
        "Omnigen2",
    }
)
FUSED_ATTENTION_FAMILIES = frozenset({"Stable_Cascade_C"})  # self and cross K/V concatenated


class NoCrossAttentionError(ValueError):
    """The model has no separate cross-attention layers for T-GATE to cache."""


def cross_attention_layers(diffusion_model: torch.nn.Module, layer_type: type) -> list[str]:
    """Names (relative to `diffusion_model`) of the `attn2` cross-attention modules of a UNet.

    `attn2` is where SD1.x, SD2.x and SDXL (base and refiner) attend to the text. Only modules of
    exactly `layer_type` qualify: other families reuse the name with other signatures.
    """
    return [
        name
        for name, module in diffusion_model.named_modules()
        if name.rsplit(".", 1)[-1] == "attn2" and isinstance(module, layer_type)
    ]


def family_names(model_config: object) -> list[str]:
    return [cls.__name__ for cls in type(model_config).__mro__]


def require_cross_attention(layers: Iterable[str], model_config: object) -> list[str]:
    """Return `layers` as a list, or raise a NoCrossAttentionError naming the family and why."""
    layers = list(layers)
    if layers:
        return layers
    names = family_names(model_config)
    family = names[0]
    if JOINT_ATTENTION_FAMILIES.intersection(names):
        why = f"{family} mixes text and image tokens in joint attention, so there is no text-only cross-attention output to cache"
    elif FUSED_ATTENTION_FAMILIES.intersection(names):
        why = f"{family} fuses self- and cross-attention keys and values, which cannot be separated"
    else:
        why = f"this version of the pack finds no SD-style `attn2` cross-attention layers in {family}"
    raise NoCrossAttentionError(
        f"T-GATE cannot patch this {family} model: T-GATE needs separate cross-attention layers "
        f"(SD1.x, SD2.x, SDXL base and refiner UNets), and {why}. Remove the T-GATE node for this "
        "model, or use it with an SD1.x/SD2.x/SDXL checkpoint."
    )
