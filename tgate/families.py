"""The model families T-GATE serves, as data: where their attention lives, which branch `auto` keeps,
their official settings, and the families refused with the reason.

A family is matched by the name of the model's ComfyUI `model_config` class or of one of its base
classes, most specific first, so a checkpoint class ComfyUI adds later that derives from SDXL is
served as SDXL. Adding a family is one entry here, a tiny model builder and its tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .branch import FidelityBranch
from .config import SelfAttentionReuse

CROSS = "cross_attention"  # attention over the text (or other conditioning) tokens: cached at the gate
SELF = "self_attention"  # attention over the latent's own tokens: reused on TGATE-V2's schedule
KINDS = (CROSS, SELF)


@dataclass(frozen=True)
class AttentionSite:
    """Where one kind of attention lives in a family's diffusion model."""

    path: str  # regular expression the module's path under `diffusion_model` must match in full
    classes: tuple[str, ...]  # "module.QualName" of the classes the module may be (or derive from)
    # 0 where the module returns its output tensor; n where it returns an n-tuple, the output first
    # and None after it (ACE-Step's self-attention returns (output, None)).
    tuple_output: int = 0

    def matches(self, name: str, module: torch.nn.Module) -> bool:
        if not re.fullmatch(self.path, name):
            return False
        return any(f"{c.__module__}.{c.__qualname__}" in self.classes for c in type(module).__mro__)


@dataclass(frozen=True)
class Family:
    name: str  # as users know it
    model_configs: tuple[str, ...]  # ComfyUI `model_config` class names
    cross_attention: AttentionSite
    self_attention: AttentionSite
    # How the per-call table reaches the attention forward: "transformer_options" where the module
    # is called with ComfyUI's `transformer_options` keyword, which the table travels in; "slot"
    # where it is not, and the table waits in a CallSlot (forward.py) the patched forwards hold.
    call_table: str
    auto_branch: FidelityBranch  # what `fidelity_branch = auto` keeps after the gate
    auto_reason: str  # why, from what the family's conditioning nodes put in the negative
    official: tuple[float, SelfAttentionReuse]  # the official code's gate (fraction of steps) and V2 schedule

    def site(self, kind: str) -> AttentionSite:
        return self.cross_attention if kind == CROSS else self.self_attention


_UNET_ATTENTION = ("comfy.ldm.modules.attention.CrossAttention",)
# SD-family UNets: `attn2` attends to the text, `attn1` to the image tokens. In SVD the temporal
# `time_stack` blocks have the same two modules and the same call, so the same patterns serve them.
_UNET_CROSS = AttentionSite(r".*\.transformer_blocks\.\d+\.attn2|.*\.time_stack\.\d+\.attn2", _UNET_ATTENTION)
_UNET_SELF = AttentionSite(r".*\.transformer_blocks\.\d+\.attn1|.*\.time_stack\.\d+\.attn1", _UNET_ATTENTION)
_SD_OFFICIAL = (0.4, SelfAttentionReuse(warm_up=2, sp_interval=5, fi_interval=1))  # SD/SDXL: gate 10 of 25

FAMILIES = (
    Family(
        name="SD1.x/SD2.x/SDXL",
        model_configs=(
            "SD15",
            "SD20",
            "SDXL",
            "SDXLRefiner",
            "SSD1B",
            "Segmind_Vega",
            "KOALA_700M",
            "KOALA_1B",
            "SD_X4Upscaler",
            "SD15_instructpix2pix",
            "SDXL_instructpix2pix",
            "LotusD",
        ),
        cross_attention=_UNET_CROSS,
        self_attention=_UNET_SELF,
        call_table="transformer_options",
        auto_branch=FidelityBranch.UNCOND,
        auto_reason=(
            "text-to-image: the negative carries the same image inputs as the positive (pix2pix and upscaler "
            "conditioning nodes set their image on both), so the paper's uncond branch loses nothing"
        ),
        official=_SD_OFFICIAL,
    ),
    Family(
        name="SD2.1 unCLIP",
        model_configs=("SD21UnclipL", "SD21UnclipH"),
        cross_attention=_UNET_CROSS,
        self_attention=_UNET_SELF,
        call_table="transformer_options",
        auto_branch=FidelityBranch.COND,
        auto_reason="unCLIPConditioning adds the image embedding to the positive only",
        official=_SD_OFFICIAL,
    ),
    Family(
        name="Stable Video Diffusion/SV3D/Stable Zero123",
        model_configs=("SVD_img2vid", "SV3D_u", "SV3D_p", "Stable_Zero123"),
        cross_attention=_UNET_CROSS,
        self_attention=_UNET_SELF,
        call_table="transformer_options",
        auto_branch=FidelityBranch.COND,
        auto_reason=(
            "their conditioning nodes give the negative a zeroed CLIP-vision embedding and a zeroed "
            "concat_latent_image: only the positive carries the input image (the official SVD code keeps it too)"
        ),
        official=_SD_OFFICIAL,
    ),
    Family(
        name="ACE-Step",
        model_configs=("ACEStep",),
        # Both are ace.Attention, called with keywords only (hidden_states=..., transformer_options=...).
        cross_attention=AttentionSite(r"transformer_blocks\.\d+\.cross_attn", ("comfy.ldm.ace.attention.Attention",)),
        # Linear self-attention; returns (output, None), since the block passes no encoder states to it.
        self_attention=AttentionSite(r"transformer_blocks\.\d+\.attn", ("comfy.ldm.ace.attention.Attention",), tuple_output=2),
        call_table="transformer_options",
        auto_branch=FidelityBranch.UNCOND,
        auto_reason=(
            "all of its conditioning enters through cross-attention: the model joins the speaker embedding "
            "(zeros in both branches, set by ComfyUI), the tags' text embedding and the encoded lyrics "
            "(TextEncodeAceStepAudio's conditioning_lyrics, scaled by lyrics_strength) into one cross-attention "
            "context, so once it is cached the negative branch lacks nothing the positive has"
        ),
        official=(0.4, SelfAttentionReuse(warm_up=2, sp_interval=5, fi_interval=1)),  # no official audio setting: SD's
    ),
)

# Families (model_config class names, base classes included) that cannot be served exactly, why,
# and what to use instead.
_JOINT = (
    "mixes text and image tokens in joint attention, so there is no text-only cross-attention output to cache",
    "sample it without T-GATE (ComfyUI's EasyCache works on most of these)",
)
REFUSED: Mapping[str, tuple[str, str]] = {
    **dict.fromkeys(
        ("SD3", "Flux", "Chroma", "AuraFlow", "QwenImage", "HunyuanVideo", "GenmoMochi", "HiDream", "Lumina2", "Omnigen2"),
        _JOINT,
    ),
    "Stable_Cascade_C": (
        "fuses self- and cross-attention keys and values, which cannot be separated",
        "sample it without T-GATE",
    ),
}


class UnsupportedModelError(ValueError):
    """The model has no cross-attention T-GATE can cache exactly."""


def supported_families() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_of(model_config: object) -> Family:
    """The family serving `model_config`, or an UnsupportedModelError naming it, why and what to do."""
    names = [cls.__name__ for cls in type(model_config).__mro__]
    for name in names:
        for family in FAMILIES:
            if name in family.model_configs:
                return family
        if name in REFUSED:
            why, instead = REFUSED[name]
            raise UnsupportedModelError(
                f"T-GATE cannot patch this {names[0]} model: T-GATE needs separate cross-attention layers, "
                f"and {names[0]} {why}. Remove the T-GATE node for this model and {instead}. "
                f"T-GATE serves {supported_families()}."
            )
    raise UnsupportedModelError(
        f"T-GATE does not know the {names[0]} model family, so it cannot tell where its cross-attention is or "
        f"whether one branch keeps all of its conditioning. Remove the T-GATE node for this model. "
        f"T-GATE serves {supported_families()}."
    )


def attention_layers(family: Family, diffusion_model: torch.nn.Module, kinds: Iterable[str]) -> dict[str, str]:
    """{module path under `diffusion_model`: kind} of the family's attention modules of `kinds`.

    Raises an UnsupportedModelError when the model has no cross-attention module where the family
    keeps it (a checkpoint of another shape, or a model ComfyUI built differently).
    """
    kinds = tuple(kinds)
    layers = {}
    for name, module in diffusion_model.named_modules():
        for kind in kinds:
            if family.site(kind).matches(name, module):
                layers[name] = kind
    if CROSS not in layers.values():
        raise UnsupportedModelError(
            f"T-GATE found no cross-attention layers in this {family.name} model (looked for modules matching "
            f"{family.cross_attention.path!r}); it cannot speed it up. Remove the T-GATE node for this model."
        )
    return layers
