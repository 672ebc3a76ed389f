"""The model families T-GATE serves, as data: where their attention lives, which branch `auto` keeps,
their official settings, and the families refused with the reason.

A family is matched by the name of the model's ComfyUI `model_config` class or of one of its base
classes, most specific first, so a checkpoint class ComfyUI adds later that derives from SDXL is
served as SDXL. Adding a family is one entry here, a tiny model builder and its tests.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .branch import FidelityBranch
from .config import SelfAttentionReuse

# The gate's kind: what carries the text into the image, kept at the last step before the gate and
# reused after it. In most families that is cross-attention over the text (or other conditioning)
# tokens; in a joint-attention family it is the text stream's modules (TextStream below).
CROSS = "cross_attention"
SELF = "self_attention"  # attention over the latent's own tokens: reused on TGATE-V2's schedule
KINDS = (CROSS, SELF)  # the kinds of attention the pack patches
# Whole UNet blocks skipped between DeepCache's refresh steps: one more kind of reuse in the plan
# (plan.py), kept in the same store, but not an attention kind (no module of it is patched as one).
DEEP = "deep_blocks"
REUSE_KINDS = (*KINDS, DEEP)  # every kind of output a run can keep and reuse


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


class TextRole(enum.Enum):
    """What one module of a joint-attention family's text stream does once the text is frozen.

    The image rows read the text only as keys and values in the joint attention, so freezing the
    modules that make them (READ, JOINED_READ) freezes everything the image sees of the text; what
    the other text modules compute then feeds only later text rows, which are frozen too (UNREAD,
    JOINED_UNREAD). The joint attention call itself is left alone: it still computes the text
    queries' rows, which nothing reads."""

    READ = "read"  # text rows only, read by the image (text keys/values): kept at the gate, returned after it
    UNREAD = "unread"  # text rows only, read by no image row once READ is frozen: returns zeros after the gate
    JOINED_READ = "joined_read"  # over [text; image] rows: text rows kept and returned, image rows computed
    JOINED_UNREAD = "joined_unread"  # over [text; image] rows: image rows computed, text rows zeros


@dataclass(frozen=True)
class TextStream:
    """Where a joint-attention family computes its text-token rows (COMFYUI_NOTES.md, "Joint-attention
    families"): the sites of each TextRole. An UNREAD module must be linear or a stack of linear
    layers ending with its output projection, whose width its zeros take."""

    sites: Mapping[TextRole, AttentionSite]
    text_first: bool = True  # in joined rows the text rows come first ([text; image]), else last
    # Of a JOINED_READ module's text rows, the columns the image reads, in multiples of the module's
    # input width (0: all). The rest are kept as zeros: Flux's single blocks' `linear1` gives the
    # queries, keys and values (3 x hidden), then the MLP's input, which feeds only the unread `linear2`.
    joined_read_columns: int = 0
    # Where the number of text rows in joined rows comes from, when it is not the length of the text the
    # text-only modules see: the model call's keyword giving it (Lumina 2: `num_tokens`, the caption's
    # unpadded length), and the keyword of the mask whose rows' sums give it per image when the call has
    # one (Lumina 2's `attention_mask`, present only for padded captions). None: the text modules' rows.
    text_rows_keyword: str | None = None
    text_mask_keyword: str | None = None

    def role(self, name: str, module: torch.nn.Module) -> TextRole | None:
        return next((role for role, site in self.sites.items() if site.matches(name, module)), None)


@dataclass(frozen=True)
class Family:
    name: str  # as users know it
    model_configs: tuple[str, ...]  # ComfyUI `model_config` class names
    cross_attention: AttentionSite | None  # None: a joint-attention family (text_stream)
    self_attention: AttentionSite | None  # None: TGATE-V2's self-attention reuse is not served
    auto_branch: FidelityBranch  # what `fidelity_branch = auto` keeps after the gate
    auto_reason: str  # why, from what the family's conditioning nodes put in the negative
    official: tuple[float, SelfAttentionReuse]  # the official code's gate (fraction of steps) and V2 schedule
    # Whether DeepCache can skip its deep blocks: a ComfyUI UNetModel (input_blocks, middle_block,
    # output_blocks) whose block layout and skip connections the tests check (deep.py).
    deep_cache: bool = False
    # Joint attention: the text stream is the gate's kind, and the gate keeps the fidelity branch's
    # own text (not the mean of the branches): the joint study's rule (docs/joint/table.md).
    text_stream: TextStream | None = None

    def site(self, kind: str) -> AttentionSite | None:
        return self.cross_attention if kind == CROSS else self.self_attention


_UNET_ATTENTION = ("comfy.ldm.modules.attention.CrossAttention",)
# SD-family UNets: `attn2` attends to the text, `attn1` to the image tokens. In SVD the temporal
# `time_stack` blocks have the same two modules and the same call, so the same patterns serve them.
_UNET_CROSS = AttentionSite(r".*\.transformer_blocks\.\d+\.attn2|.*\.time_stack\.\d+\.attn2", _UNET_ATTENTION)
_UNET_SELF = AttentionSite(r".*\.transformer_blocks\.\d+\.attn1|.*\.time_stack\.\d+\.attn1", _UNET_ATTENTION)
# SD/SDXL: gate 10 of 25. Also the settings of the families the official code has none for (LTXV,
# Cosmos, ACE-Step...): gate 0.4 and warm_up 2, sp_interval 5, fi_interval 1, until someone
# measures better ones.
_SD_OFFICIAL = (0.4, SelfAttentionReuse(warm_up=2, sp_interval=5, fi_interval=1))

# Wan 2.1/2.2 (comfy/ldm/wan/model.py). Cross- and self-attention modules share a base class
# (WanT2VCrossAttention and WanI2VCrossAttention derive from WanSelfAttention), so the paths tell
# them apart. VACE's `vace_blocks` have the same two modules, fed the same text context, and run
# once per control in a model call (each run is kept apart: store.occurrence_key). Modules that
# attend to other conditioning (S2V's audio injector, HuMo's audio cross-attention, Animate's face
# adapter) match neither pattern; those models are refused for now (REFUSED).
_WAN_BLOCKS = r"(?:blocks|vace_blocks)\.\d+"
_WAN_CROSS = AttentionSite(
    rf"{_WAN_BLOCKS}\.cross_attn",
    ("comfy.ldm.wan.model.WanT2VCrossAttention", "comfy.ldm.wan.model.WanI2VCrossAttention"),
)
_WAN_SELF = AttentionSite(rf"{_WAN_BLOCKS}\.self_attn", ("comfy.ldm.wan.model.WanSelfAttention",))
_CROSS_ATTENTION_FAMILIES = (
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
        auto_branch=FidelityBranch.UNCOND,
        auto_reason=(
            "text-to-image: the negative carries the same image inputs as the positive (pix2pix and upscaler "
            "conditioning nodes set their image on both), so the paper's uncond branch loses nothing"
        ),
        official=_SD_OFFICIAL,
        deep_cache=True,
    ),
    Family(
        name="SD2.1 unCLIP",
        model_configs=("SD21UnclipL", "SD21UnclipH"),
        cross_attention=_UNET_CROSS,
        self_attention=_UNET_SELF,
        auto_branch=FidelityBranch.COND,
        auto_reason="unCLIPConditioning adds the image embedding to the positive only",
        official=_SD_OFFICIAL,
    ),
    Family(
        name="Stable Video Diffusion/SV3D/Stable Zero123",
        model_configs=("SVD_img2vid", "SV3D_u", "SV3D_p", "Stable_Zero123"),
        cross_attention=_UNET_CROSS,
        self_attention=_UNET_SELF,
        auto_branch=FidelityBranch.COND,
        auto_reason=(
            "their conditioning nodes give the negative a zeroed CLIP-vision embedding and a zeroed "
            "concat_latent_image: only the positive carries the input image (the official SVD code keeps it too)"
        ),
        official=_SD_OFFICIAL,
    ),
    Family(
        name="Wan 2.1/2.2",
        # All derive from WAN21_T2V, which also serves Wan 2.2 14B t2v and i2v (in_dim 36, no CLIP
        # vision), Wan 2.2 Fun and Phantom checkpoints.
        model_configs=(
            "WAN21_T2V",
            "WAN21_I2V",
            "WAN22_T2V",
            "WAN21_Vace",
            "WAN21_FunControl2V",
            "WAN21_Camera",
            "WAN22_Camera",
        ),
        cross_attention=_WAN_CROSS,
        self_attention=_WAN_SELF,
        auto_branch=FidelityBranch.COND,
        auto_reason=(
            "WanImageToVideo, WanFirstLastFrameToVideo, WanFunInpaintToVideo, WanFunControlToVideo, "
            "Wan22FunControlToVideo, WanCameraImageToVideo, WanTrackToVideo and WanVaceToVideo give the negative the "
            "positive's concat image and mask, CLIP-vision output, camera, reference latent and VACE controls, and "
            "Wan22ImageToVideoLatent changes only the latent: text enters only through cross-attention, so after the "
            "gate both branches compute the same output (cond and uncond agree bit for bit). The exception is "
            "WanPhantomSubjectToVideo's negative_img_text, whose subject images (time_dim_concat, concatenated to "
            "the latent, outside cross-attention) are zeroed: the positive branch keeps them"
        ),
        official=_SD_OFFICIAL,
    ),
    Family(
        name="LTXV",
        model_configs=("LTXV",),
        # Lightricks' own attention class (comfy.ldm.lightricks.model.CrossAttention), called with
        # `transformer_options`. The block adds attn2's output to its input in place
        # (`x += self.attn2(x, ...)`): the returned tensor is only read, and what T-GATE keeps is a
        # reduction or clone of the output, never a view of `x`.
        cross_attention=AttentionSite(r"transformer_blocks\.\d+\.attn2", ("comfy.ldm.lightricks.model.CrossAttention",)),
        self_attention=AttentionSite(r"transformer_blocks\.\d+\.attn1", ("comfy.ldm.lightricks.model.CrossAttention",)),
        auto_branch=FidelityBranch.UNCOND,
        auto_reason=(
            "text-to-video and image-to-video: LTXVConditioning sets the same frame_rate on both conds, "
            "LTXVImgToVideo and LTXVAddGuide put the image in the latent and its noise mask (shared by both branches) "
            "and the same keyframe_idxs on positive and negative, so only the text differs and it enters through "
            "cross-attention alone"
        ),
        official=_SD_OFFICIAL,
    ),
    Family(
        name="Cosmos Predict2",
        model_configs=("CosmosT2IPredict2", "CosmosI2VPredict2"),
        # Self- and cross-attention are one class (comfy.ldm.cosmos.predict2.Attention): the path tells them apart.
        cross_attention=AttentionSite(r"blocks\.\d+\.cross_attn", ("comfy.ldm.cosmos.predict2.Attention",)),
        self_attention=AttentionSite(r"blocks\.\d+\.self_attn", ("comfy.ldm.cosmos.predict2.Attention",)),
        auto_branch=FidelityBranch.UNCOND,
        auto_reason=(
            "text-to-image and image-to-video: CosmosPredict2ImageToVideoLatent puts the image in the latent and its "
            "noise mask, which both branches share (the model's mask channel and per-frame timesteps come from it); "
            "the conds carry only the text, which enters through cross-attention alone"
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
        auto_branch=FidelityBranch.UNCOND,
        auto_reason=(
            "all of its conditioning enters through cross-attention: the model joins the speaker embedding "
            "(zeros in both branches, set by ComfyUI), the tags' text embedding and the encoded lyrics "
            "(TextEncodeAceStepAudio's conditioning_lyrics, scaled by lyrics_strength) into one cross-attention "
            "context, so once it is cached the negative branch lacks nothing the positive has"
        ),
        official=_SD_OFFICIAL,
    ),
    Family(
        name="PixArt-alpha/PixArt-sigma",
        model_configs=("PixArtAlpha", "PixArtSigma"),
        # Each block calls `self.attn(x, HW=HW)` on the image tokens, then `self.cross_attn(x, y, mask)`
        # on the T5 tokens; the text reaches the blocks folded into one (1, B*L, C) sequence, but the
        # cross-attention output is (B, N, C) like its query.
        cross_attention=AttentionSite(r"blocks\.\d+\.cross_attn", ("comfy.ldm.pixart.blocks.MultiHeadCrossAttention",)),
        self_attention=AttentionSite(r"blocks\.\d+\.attn", ("comfy.ldm.pixart.blocks.AttentionKVCompress",)),
        auto_branch=FidelityBranch.UNCOND,
        auto_reason=(
            "text-to-image: the only PixArt conditioning nodes are text encoders (CLIPTextEncode, "
            "CLIPTextEncodePixArtAlpha), so the negative is a text prompt like the positive; alpha's size and "
            "aspect micro-conditions enter the timestep embedding, not cross-attention, and the negative carries "
            "its own (its node's width and height, or the latent's size). The official PixArt code keeps the negative"
        ),
        official=(0.6, SelfAttentionReuse(warm_up=2, sp_interval=3, fi_interval=1)),  # gate 15 of 25 (normal scheduler)
    ),
)

_LINEAR = ("torch.nn.modules.linear.Linear",)  # ComfyUI's operations.Linear classes derive from it
# Flux's blocks (comfy/ldm/flux/layers.py), which Chroma's (comfy/ldm/chroma/layers.py) copy with its
# own modulation: a double block makes the text keys and values in `txt_attn.qkv` (the text queries
# with them) and updates the text stream with `txt_attn.proj` and `txt_mlp`; a single block runs
# `linear1` and `linear2` over [text; image] rows, text first (`torch.cat((txt, img), 1)`), and the
# final layer drops the text rows. Flux adds into its text rows in place (`txt += ...`, `x += ...`)
# and Chroma with `addcmul_`: on tensors the block made, never on what these modules return, which
# are fresh (JOINED_READ's concatenation) or kept and only read (`txt_attn.qkv`'s view and norm).
_FLUX_STREAM = TextStream(
    {
        TextRole.READ: AttentionSite(r"double_blocks\.\d+\.txt_attn\.qkv", _LINEAR),
        TextRole.UNREAD: AttentionSite(
            r"double_blocks\.\d+\.(?:txt_attn\.proj|txt_mlp)", (*_LINEAR, "torch.nn.modules.container.Sequential")
        ),
        TextRole.JOINED_READ: AttentionSite(r"single_blocks\.\d+\.linear1", _LINEAR),
        TextRole.JOINED_UNREAD: AttentionSite(r"single_blocks\.\d+\.linear2", _LINEAR),
    },
    joined_read_columns=3,
)
_JOINT_RULE = (
    "the joint study's rule (docs/joint/table.md): the text frozen as the positive's at the gate kept the "
    "baseline's accuracy (0.677 against 0.677; the negative's 0.656)"
)


def _joint(name: str, model_configs: tuple[str, ...], text_stream: TextStream, why: str) -> Family:
    """A joint-attention family: the text stream is the gate's kind, no self-attention reuse, and
    `auto` keeps the positive (`why`, and the study's rule)."""
    return Family(
        name=name,
        model_configs=model_configs,
        cross_attention=None,
        self_attention=None,
        auto_branch=FidelityBranch.COND,
        auto_reason=f"{why}; and {_JOINT_RULE}",
        official=_SD_OFFICIAL,
        text_stream=text_stream,
    )


# HiDream I1 (comfy/ldm/hidream/model.py): the text is T5's tokens and, per block, one Llama layer's
# hidden states, each mapped by its own `caption_projection`. A double block takes [the text stream
# (T5 and the last Llama layer's rows); that block's Llama layer] and projects them with
# attn1.to_q_t/to_k_t/to_v_t, maps their rows with attn1.to_out_t and ff_t (the stream keeps the first
# rows only). A single block runs over [image; text stream; its Llama layer], text LAST, with the same
# number of text rows as a double block: attn1.to_q/to_k/to_v, to_out, and ff_i, a mixture of experts
# whose gate routes each row by itself (so the image rows alone route as they do among all rows).
# The SwiGLU feed-forwards return their `w2`'s width, not their last linear's: their linears are listed.
_HIDREAM_STREAM = TextStream(
    {
        TextRole.READ: AttentionSite(r"double_stream_blocks\.\d+\.block\.attn1\.to_[kv]_t", _LINEAR),
        TextRole.UNREAD: AttentionSite(
            r"caption_projection\.\d+\.linear|double_stream_blocks\.\d+\.block\.(?:attn1\.(?:to_q_t|to_out_t)|ff_t\.w[123])",
            _LINEAR,
        ),
        TextRole.JOINED_READ: AttentionSite(r"single_stream_blocks\.\d+\.block\.attn1\.to_[kv]", _LINEAR),
        TextRole.JOINED_UNREAD: AttentionSite(
            r"single_stream_blocks\.\d+\.block\.(?:attn1\.(?:to_q|to_out)|ff_i)",
            (
                *_LINEAR,
                "comfy.ldm.hidream.model.MOEFeedForwardSwiGLU",
                "comfy.ldm.hidream.model.FeedForwardSwiGLU",
            ),
        ),
    },
    text_first=False,
)
JOINT_FAMILIES = (
    # FluxSchnell and FluxInpaint derive from Flux; Kontext is Flux with ReferenceLatent's image tokens
    # appended to the image rows, where they stay computed.
    _joint(
        "Flux",
        ("Flux",),
        _FLUX_STREAM,
        "the positive carries what enters outside the text stream: its pooled CLIP vector and FluxGuidance's "
        "guidance in every block's modulation, and Kontext's reference image (ReferenceLatent)",
    ),
    _joint(
        "Chroma", ("Chroma",), _FLUX_STREAM, "text enters only as tokens (no pooled vector; modulation from the timestep alone)"
    ),
    # SD3/SD3.5 (comfy/ldm/modules/diffusionmodules/mmdit.py): `_block_mixing` runs each joint block's
    # context_block.pre_attention, whose `attn.qkv` makes the text queries, keys and values, joins them
    # before the image's (text first), and maps the text rows with `attn.proj` and `mlp` in
    # post_attention; the last block's context block is `pre_only` (no proj, no mlp).
    _joint(
        "SD3/SD3.5",
        ("SD3",),
        TextStream(
            {
                TextRole.READ: AttentionSite(r"joint_blocks\.\d+\.context_block\.attn\.qkv", _LINEAR),
                TextRole.UNREAD: AttentionSite(
                    r"joint_blocks\.\d+\.context_block\.(?:attn\.proj|mlp)",
                    (*_LINEAR, "comfy.ldm.modules.diffusionmodules.mmdit.Mlp"),
                ),
            }
        ),
        "the positive carries its own pooled CLIP vectors, which enter every block's modulation",
    ),
    # AuraFlow (comfy/ldm/aura/mmdit.py): 8 register tokens precede the text in the text stream. Double
    # layers project it with attn.w1q/w1k/w1v, map its rows with attn.w1o and mlpC; single layers run
    # over [registers and text; image] rows, text first.
    _joint(
        "AuraFlow",
        ("AuraFlow",),
        TextStream(
            {
                TextRole.READ: AttentionSite(r"double_layers\.\d+\.attn\.w1[kv]", _LINEAR),
                TextRole.UNREAD: AttentionSite(
                    r"double_layers\.\d+\.(?:attn\.w1q|attn\.w1o|mlpC)", (*_LINEAR, "comfy.ldm.aura.mmdit.MLP")
                ),
                TextRole.JOINED_READ: AttentionSite(r"single_layers\.\d+\.attn\.w1[kv]", _LINEAR),
                TextRole.JOINED_UNREAD: AttentionSite(
                    r"single_layers\.\d+\.(?:attn\.w1q|attn\.w1o|mlp)", (*_LINEAR, "comfy.ldm.aura.mmdit.MLP")
                ),
            }
        ),
        "text enters only as tokens (modulation from the timestep alone)",
    ),
    # Mochi (comfy/ldm/genmo/joint_model/asymm_models_joint.py): each block's asymmetric attention
    # projects the text with attn.qkv_y (image rows first in the joint attention, the text cropped to
    # its unpadded tokens), maps the text rows with attn.proj_y (to the text's narrower width) and
    # mlp_y; the last block does not update the text (proj_y is an Identity there, no mlp_y).
    _joint(
        "Mochi",
        ("GenmoMochi",),
        TextStream(
            {
                TextRole.READ: AttentionSite(r"blocks\.\d+\.attn\.qkv_y", _LINEAR),
                TextRole.UNREAD: AttentionSite(
                    r"blocks\.\d+\.(?:attn\.proj_y|mlp_y)", (*_LINEAR, "comfy.ldm.genmo.joint_model.layers.FeedForward")
                ),
            }
        ),
        "the positive carries its own attention-pooled T5 vector, which enters every block's modulation",
    ),
    # comfy/ldm/qwen_image/model.py: each block's attention projects the text with add_q/k/v_proj and
    # maps the text rows of the joint output with to_add_out; txt_mlp updates the text stream. The
    # joint attention puts the text first. The text queries feed only text rows: UNREAD.
    _joint(
        "Qwen-Image",
        ("QwenImage",),
        TextStream(
            {
                TextRole.READ: AttentionSite(r"transformer_blocks\.\d+\.attn\.add_[kv]_proj", _LINEAR),
                TextRole.UNREAD: AttentionSite(
                    r"transformer_blocks\.\d+\.(?:attn\.add_q_proj|attn\.to_add_out|txt_mlp)",
                    (*_LINEAR, "comfy.ldm.qwen_image.model.FeedForward"),
                ),
            }
        ),
        "text enters only as tokens (modulation from the timestep alone), and Qwen-Image-Edit's reference images "
        "(TextEncodeQwenImageEdit, ReferenceLatent) are often on the positive only",
    ),
    # Lumina 2 (comfy/ldm/lumina/model.py NextDiT): `cap_embedder` and the `context_refiner` blocks map the
    # caption alone (no modulation). Each main layer runs over [caption; image] rows, the caption's
    # unpadded tokens first (patchify_and_embed packs them per image): `attention.qkv` makes the caption's
    # queries, keys and values, `attention.out` and `feed_forward` map its rows. ComfyUI runs a model
    # call only for conds of one `num_tokens` (a CONDConstant), so every image of a call has that many
    # caption rows, unless a padded caption's mask says otherwise (checked per call: text_stream.py).
    # `noise_refiner` sees the image alone and is left as it is.
    _joint(
        "Lumina 2",
        ("Lumina2",),
        TextStream(
            {
                TextRole.UNREAD: AttentionSite(
                    r"cap_embedder|context_refiner\.\d+\.(?:attention\.(?:qkv|out)|feed_forward\.w[123])",
                    (*_LINEAR, "torch.nn.modules.container.Sequential"),
                ),
                TextRole.JOINED_READ: AttentionSite(r"layers\.\d+\.attention\.qkv", _LINEAR),
                TextRole.JOINED_UNREAD: AttentionSite(
                    r"layers\.\d+\.(?:attention\.out|feed_forward)", (*_LINEAR, "comfy.ldm.lumina.model.FeedForward")
                ),
            },
            text_rows_keyword="num_tokens",
            text_mask_keyword="attention_mask",
        ),
        "text enters only as tokens (modulation from the timestep alone)",
    ),
    _joint(
        "HiDream",
        ("HiDream",),
        _HIDREAM_STREAM,
        "the positive carries its own pooled CLIP vectors, which enter every block's modulation, and HiDream E1's "
        "reference image (image rows, computed every step)",
    ),
)
FAMILIES = _CROSS_ATTENTION_FAMILIES + JOINT_FAMILIES

# Families (model_config class names, base classes included) that cannot be served exactly, why,
# and what to use instead. Every class in ComfyUI 0.3.64's comfy.supported_models.models is either
# served by a family above or refused here, directly or through its base class.
_JOINT = (
    "mixes text and image tokens in joint attention, and T-GATE's text stream is built only for Flux, Chroma, Qwen-Image, "
    "SD3/SD3.5, AuraFlow, Mochi, Lumina 2 and HiDream so far (each joint family's text modules are listed and tested one by one)",
    "sample it without T-GATE (ComfyUI's EasyCache or LazyCache node can speed it up)",
)
REFUSED: Mapping[str, tuple[str, str]] = {
    # Subclasses refused through their base: HunyuanVideoI2V, HunyuanVideoSkyreelsI2V, HunyuanImage21,
    # HunyuanImage21Refiner (HunyuanVideo).
    "Omnigen2": _JOINT,
    "HunyuanVideo": (
        "mixes text and image tokens in joint attention and runs guidance distilled into one branch, while its text "
        "rows are under 0.3 % of a step's work: T-GATE would have nothing to save",
        "sample it without T-GATE (ComfyUI's EasyCache or LazyCache node can speed it up)",
    ),
    "ChromaRadiance": (  # derives from Chroma, which T-GATE serves
        "is Chroma's pixel-space variant, whose blocks T-GATE has not been tested on yet",
        "sample it without T-GATE (ComfyUI's EasyCache or LazyCache node can speed it up)",
    ),
    "Hunyuan3Dv2": (  # and Hunyuan3Dv2mini
        "mixes its image-condition tokens and shape latents in joint attention (Flux-style double- and single-stream "
        "blocks), so there is no conditioning-only cross-attention output to cache",
        "sample it without T-GATE (ComfyUI's EasyCache or LazyCache node can speed it up)",
    ),
    "Hunyuan3Dv2_1": (
        "expects both guidance branches in every model call: its forward splits the image-condition context and the "
        "output in two halves and swaps them, so the one-branch calls after the gate would fail",
        "sample it without T-GATE (ComfyUI's LazyCache node can speed it up)",
    ),
    "Stable_Cascade_C": (  # and Stable_Cascade_B: stage B uses the same AttnBlock
        "fuses self- and cross-attention keys and values, which cannot be separated",
        "sample it without T-GATE",
    ),
    # Cosmos 1 (comfy/ldm/cosmos/blocks.py VideoAttn): its attention runs on (frames, height, width,
    # batch, channels) tensors. T-GATE splits a call's CFG chunks and averages the branches on dim 0,
    # which here is frames: it would average frames, not branches.
    **dict.fromkeys(
        ("CosmosT2V", "CosmosI2V"),
        (
            "has its cross-attention in video attention laid out frames x height x width x batch x channels (batch on "
            "dim 3), while T-GATE splits and averages the guidance branches on dim 0, so it would average frames "
            "instead of branches",
            "use Cosmos Predict2, which T-GATE serves, or sample it without T-GATE (EasyCache works on Cosmos 1)",
        ),
    ),
    **dict.fromkeys(
        ("HunyuanDiT", "HunyuanDiT1"),
        (
            "steers every block with a pooled T5 text vector added to its timestep embedding, outside "
            "cross-attention, and its attention layers get no transformer_options; T-GATE support for it is not built",
            "sample it without T-GATE (ComfyUI's LazyCache node can speed it up)",
        ),
    ),
    **dict.fromkeys(
        ("WAN21_HuMo", "WAN22_Animate", "WAN22_S2V"),
        (
            "takes driving audio (HuMo, S2V) or a face video (Animate) through its own modules, outside the text "
            "cross-attention, with the negative's zeroed; keeping the positive branch would serve it, but that is "
            "not built and tested yet",
            "sample it without T-GATE (ComfyUI's EasyCache or LazyCache node can speed it up)",
        ),
    ),
    "StableAudio": (
        "has separate cross-attention, but T-GATE support for it is not built and tested yet",
        "sample it without T-GATE (ComfyUI's LazyCache node can speed it up)",
    ),
}


class UnsupportedModelError(ValueError):
    """The model has no cross-attention T-GATE can cache exactly."""


# ComfyUI loads a custom node pack by its folder path and names the module after it, so the error's
# type would read "/path/to/custom_nodes/ComfyUI-TGATE.tgate.families.UnsupportedModelError" in
# ComfyUI's error report (execution.py's full_type_name: module + "." + qualname) and in tracebacks.
# The pack's own name reads better wherever it is installed.
UnsupportedModelError.__module__ = "comfyui_tgate"


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
                f"T-GATE cannot patch this {names[0]} model: {names[0]} {why}. "
                f"Remove the T-GATE node for this model and {instead}. "
                f"T-GATE serves {supported_families()}."
            )
    raise UnsupportedModelError(
        f"T-GATE does not know the {names[0]} model family, so it cannot tell where its cross-attention is or "
        f"whether one branch keeps all of its conditioning. Remove the T-GATE node for this model. "
        f"T-GATE serves {supported_families()}."
    )


def attention_layers(family: Family, diffusion_model: torch.nn.Module, kinds: Iterable[str]) -> dict[str, str]:
    """{module path under `diffusion_model`: kind} of the family's attention modules of `kinds`; in a
    joint-attention family, its text stream's modules, all of the gate's kind (see text_roles).

    Raises an UnsupportedModelError when the model has nothing of the gate's kind where the family
    keeps it (a checkpoint of another shape, or a model ComfyUI built differently).
    """
    if family.text_stream is not None:
        return dict.fromkeys(text_roles(family, diffusion_model), CROSS)
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


def text_roles(family: Family, diffusion_model: torch.nn.Module) -> dict[str, TextRole]:
    """{module path: TextRole} of a joint-attention family's text stream in `diffusion_model`."""
    stream = family.text_stream
    roles = {}
    for name, module in diffusion_model.named_modules():
        role = stream.role(name, module)
        if role is None:
            continue
        if role is TextRole.UNREAD and output_width(module) is None:
            raise UnsupportedModelError(
                f"T-GATE expected {name} of this {family.name} model to be a linear module or a stack of them, and "
                "it is not: the model is not built as T-GATE knows this family. Remove the T-GATE node for this model."
            )
        roles[name] = role
    needed = {r for r in (TextRole.READ, TextRole.JOINED_READ) if r in stream.sites}
    missing = sorted(r.value for r in needed - set(roles.values()))
    if missing:
        paths = ", ".join(repr(stream.sites[TextRole(r)].path) for r in missing)
        raise UnsupportedModelError(
            f"T-GATE found no text-stream modules in this {family.name} model (looked for modules matching {paths}); "
            "it cannot speed it up. Remove the T-GATE node for this model."
        )
    return roles


def output_width(module: torch.nn.Module) -> int | None:
    """The width of the rows a linear module, or a stack of them ending with one (an MLP), returns:
    its last linear layer's; None where it has none."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].out_features if linears else None
