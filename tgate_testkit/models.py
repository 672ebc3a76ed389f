"""Random-weight diffusion models built from ComfyUI's own model classes.

Speed does not depend on the weights, so benchmarks use the full-size architectures with random
values; the tests use tiny ones of the same shapes. The UNet configurations are those ComfyUI's
model detection produces for real checkpoints (comfy/model_detection.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Architecture:
    model_config: str  # class name in comfy.supported_models
    unet: dict  # the diffusion model's configuration, as model detection gives it (a UNet's or a transformer's)
    context_tokens: int
    pooled: int = 0  # width of SDXL's pooled text vector; 0 for none
    # For families whose configuration has no `context_dim` or whose latents are not 4-channel images
    # (the transformer families); the defaults are the UNets'.
    context_width: int = 0  # width of the text tokens the model takes (T5-XXL: 4096); 0: the config's context_dim
    prompt_tokens: int = 0  # of context_tokens, those of the prompt; the rest is the text encoder's padding,
    # marked in an `attention_mask` as T5 encoders return it (0: no mask)
    zero_padding: bool = False  # the text encoder zeroes its padding tokens (zero_out_masked, Cosmos's T5)
    no_pooled: bool = False  # the text encoder gives pooled_output None (Chroma's T5 alone)
    cond_values: tuple = ()  # (key, value) pairs the family's conditioning node sets on positive and negative alike
    latent: tuple[int, ...] = (4,)  # a latent's shape per image before height and width: (channels,) or (channels, frames)
    downscale: int = 8  # image pixels per latent cell, across and down
    fixed_latent: tuple[int, ...] = ()  # a latent's whole shape where it does not follow the image size (audio)
    lyrics_tokens: int = 0  # ACE-Step: how many lyrics token ids the conditioning carries; 0 for none
    image_tokens: int = 0  # CLIP-vision tokens given as clip_vision_output (Wan i2v: 257 x 1280); 0 for none
    full_depth: tuple = ()  # (key, value) pairs of the real checkpoint's block counts where `unet` has fewer
    # HiDream: the Llama hidden states its text encoder gives as `conditioning_llama3`, (layers, tokens),
    # each layer context_width wide; () for none.
    llama: tuple[int, int] = ()

    @property
    def context_dim(self) -> int:
        return self.context_width or self.unet["context_dim"]

    def latent_shape(self, batch: int, size: int) -> tuple[int, ...]:
        """The empty latent's shape for `batch` square images (or videos) of `size` pixels."""
        if self.fixed_latent:
            return (batch, *self.fixed_latent)
        return (batch, *self.latent, size // self.downscale, size // self.downscale)

    def empty_latent(self, batch: int, size: int) -> torch.Tensor:
        return torch.zeros(self.latent_shape(batch, size))


_SD15 = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1,
    context_dim=768,
    num_heads=8,
    num_head_channels=-1,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_spatial_transformer=True,
    legacy=False,
    dims=2,
    use_temporal_resblock=False,
    use_temporal_attention=False,
)
_SDXL = dict(
    _SD15,
    num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10,
    context_dim=2048,
    num_heads=-1,
    num_head_channels=64,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
    num_classes="sequential",
)
_TINY_SD15 = dict(
    _SD15,
    model_channels=32,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=64,
    num_heads=2,
)
_TINY_POOLED = 32
_TINY_SDXL = dict(
    _TINY_SD15,
    transformer_depth=[0, 2],
    transformer_depth_output=[0, 0, 2, 2],
    transformer_depth_middle=2,
    num_heads=-1,
    num_head_channels=16,
    use_linear_in_transformer=True,
    adm_in_channels=_TINY_POOLED + 6 * 256,
    num_classes="sequential",
)

# SD2.x takes 64-channel heads (its model config imposes them), so its tiny UNet is a little wider.
_TINY_SD2 = dict(_TINY_SD15, model_channels=64, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
_TINY_SDXL_REFINER = dict(_TINY_SDXL, adm_in_channels=_TINY_POOLED + 5 * 256)

# Stable Video Diffusion (img2vid): the keys model detection adds for a video UNet. The init image's
# latent is concatenated to the noisy latent (8 input channels); the 768-wide `y` is three 256-wide
# timestep embeddings of fps, motion bucket and augmentation (model_base.SVD_img2vid.encode_adm); the
# context is one token, the init image's CLIP-vision embedding, so context_tokens is 1. The model
# config imposes 64-channel heads, so the tiny UNet is 64 wide like tiny-sd2.
_TINY_SVD = dict(
    _TINY_SD2,
    in_channels=8,
    adm_in_channels=768,
    num_classes="sequential",
    extra_ff_mix_layer=True,
    use_spatial_context=True,
    merge_strategy="learned_with_images",
    merge_factor=0.0,
    video_kernel_size=[3, 1, 1],
    use_temporal_resblock=True,
    use_temporal_attention=True,
    disable_temporal_crossattention=False,
)

# ACE-Step (audio): the configuration model detection gives the 3.5B checkpoint, shrunk to two blocks
# of two 16-wide heads. The latent is (8, 16, length): 8 channels of 16 frequency rows, patched
# 16x1, so each latent column is one token (32 here). The context is the tags' UMT5 embedding
# (text_embedding_dim wide); the lyrics arrive as token ids of the lyrics tokenizer's vocabulary
# (lyric_encoder_vocab_size), and the lyric encoder, a 1024-wide conformer ComfyUI builds with fixed
# sizes, is most of the tiny model's 90M weights. speaker_embedding_dim stays 512: ComfyUI
# feeds a zero speaker embedding of that width.
_TINY_ACE_STEP = dict(
    audio_model="ace",
    attention_head_dim=16,
    in_channels=8,
    inner_dim=32,
    max_height=16,
    max_position=32768,
    max_width=32768,
    mlp_ratio=2.5,
    num_attention_heads=2,
    num_layers=2,
    out_channels=8,
    patch_size=[16, 1],
    rope_theta=1000000.0,
    speaker_embedding_dim=512,
    text_embedding_dim=32,
    ssl_encoder_depths=[8, 8],
    ssl_latent_dims=[1024, 768],
    ssl_names=["mert", "m-hubert"],
    lyric_encoder_vocab_size=6693,
    lyric_hidden_size=1024,  # the conformer's fixed output width, which lyric_proj takes: not shrinkable
)

# LTXV: the keys model detection gives a 2B checkpoint (28 blocks; attention width 32 heads x 64 =
# 2048 from attn2.to_k; cross_attention_dim 2048) with LTXVModel's defaults for the rest (128 latent
# channels, 4096-wide T5-XXL captions projected to 2048). The VAE downscales 8x in time and 32x in
# space: 97 frames are 13 latent frames. The text is T5-XXL padded to 128 tokens, with its attention
# mask (comfy/text_encoders/lt.py); LTXVConditioning sets frame_rate (default 25) on both conds.
_LTXV_2B = dict(image_model="ltxv", num_layers=28, attention_head_dim=64, cross_attention_dim=2048)
# Tiny: 2 blocks of 4 heads x 8 = 32 wide (cross_attention_dim must equal the attention width, since
# captions are projected to it); latent channels and caption width stay real, as ComfyUI's LTXV
# nodes and VAE make 128-channel latents.
_TINY_LTXV = dict(_LTXV_2B, num_layers=2, attention_head_dim=8, num_attention_heads=4, cross_attention_dim=32)
_LTXV_TEXT = dict(context_tokens=128, context_width=4096, prompt_tokens=64, cond_values=(("frame_rate", 25.0),), downscale=32)

# Cosmos Predict2: what model detection gives the 2B text-to-image checkpoint (2048 channels, 28
# blocks of 16 heads, adaLN-LoRA 256, 1024-wide text). Its text encoder is the original T5-XXL
# (1024 wide), padded to 512 tokens with the padding zeroed (comfy/text_encoders/cosmos.py); the
# model ignores the mask. Latents are Wan 2.1's: 16 channels, 8x down in space, 4x in time.
_COSMOS_PREDICT2_2B = dict(
    image_model="cosmos_predict2",
    max_img_h=240,
    max_img_w=240,
    max_frames=128,
    in_channels=16,
    out_channels=16,
    patch_spatial=2,
    patch_temporal=1,
    model_channels=2048,
    concat_padding_mask=True,
    crossattn_emb_channels=1024,
    pos_emb_cls="rope3d",
    pos_emb_learnable=True,
    pos_emb_interpolation="crop",
    min_fps=1,
    max_fps=30,
    use_adaln_lora=True,
    adaln_lora_dim=256,
    num_blocks=28,
    num_heads=16,
    extra_per_block_abs_pos_emb=False,
    rope_h_extrapolation_ratio=4.0,
    rope_w_extrapolation_ratio=4.0,
    rope_t_extrapolation_ratio=1.0,
    extra_h_extrapolation_ratio=1.0,
    extra_w_extrapolation_ratio=1.0,
    extra_t_extrapolation_ratio=1.0,
    rope_enable_fps_modulation=False,
)
# Tiny: 2 blocks of 2 heads x 16 (the 3D RoPE needs heads of 12 or more channels). The image-to-video
# variant takes the mask channel (17 inputs) with the 2B video model's RoPE ratios.
_TINY_COSMOS_PREDICT2 = dict(_COSMOS_PREDICT2_2B, model_channels=32, num_blocks=2, num_heads=2, adaln_lora_dim=8)
_TINY_COSMOS_PREDICT2_I2V = dict(
    _TINY_COSMOS_PREDICT2, in_channels=17, rope_h_extrapolation_ratio=3.0, rope_w_extrapolation_ratio=3.0
)
_COSMOS_TEXT = dict(context_tokens=512, context_width=1024, prompt_tokens=64, zero_padding=True, downscale=8)

# Wan 2.1/2.2 (comfy/ldm/wan/model.py): the keys comfy/model_detection.py reads from a checkpoint. The
# text context is UMT5-XXL's, 4096 wide, padded by ComfyUI's tokenizer to at least 512 tokens
# (min_length 512, padding zeroed); heads are 128 wide in the real models. i2v models (in_dim 36:
# 16 noise + 4 mask + 16 image channels) put 257 CLIP-vision tokens (ViT-H penultimate states,
# 1280 wide, through `img_emb`) in front of the text; VACE adds `vace_blocks` fed by 96 channels
# (32 of control latents + 64 of mask); the Wan 2.2 5B works on the Wan 2.2 VAE's 48-channel latent.
_WAN = dict(
    image_model="wan2.1",
    model_type="t2v",
    patch_size=(1, 2, 2),
    freq_dim=256,
    window_size=(-1, -1),
    qk_norm=True,
    cross_attn_norm=True,
    eps=1e-6,
    in_dim=16,
    out_dim=16,
)
_WAN21_1_3B = dict(_WAN, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
# Tiny: two of the real 128-wide heads (model detection reads num_heads as dim // 128, so a checkpoint
# of this shape loads as exactly this model), two blocks, the real text width.
_TINY_WAN = dict(_WAN, dim=256, ffn_dim=512, num_heads=2, num_layers=2)
_TINY_WAN_I2V = dict(_TINY_WAN, model_type="i2v", in_dim=36)
_TINY_WAN22_5B = dict(_TINY_WAN, in_dim=48, out_dim=48)
_TINY_WAN_VACE = dict(_TINY_WAN, model_type="vace", num_layers=4, vace_layers=2, vace_in_dim=96)
# Audio- and face-driven variants: their extra modules keep the real (fixed) widths.
_WAN_TEXT = dict(context_width=4096, latent=(16, 3))
_TINY_WAN_TEXT = dict(_WAN_TEXT, context_tokens=24)  # ComfyUI gives 512; fewer keep the tiny models fast, same code path

# PixArt: the keys model detection gives a real checkpoint (detect_unet_config, "t_block.1.weight"):
# patch 2, 16 heads, 1152 wide, 4 latent channels, 28 blocks; caption_channels is the T5-XXL width
# (PixArtMS's default, not detected). Sigma has no size/aspect micro-conditions and 300 caption
# tokens; alpha has micro-conditions and 120. pe_interpolation is what detection guesses for a
# 1024 checkpoint, and what PixArtMS computes itself at a 128x128 latent. ComfyUI's PixArt text
# encoder neither pads nor masks (pixart_t5.py), so the context is as long as the prompt: 120 tokens
# is a long prompt, and the cross-attention share (T-GATE's gain) grows with it.
_PIXART_SIGMA = dict(
    image_model="pixart_sigma",
    num_heads=16,
    patch_size=2,
    hidden_size=1152,
    in_channels=4,
    depth=28,
    caption_channels=4096,
    model_max_length=300,
    input_size=128,
    pe_interpolation=2,
    micro_condition=False,
)
_PIXART_ALPHA = dict(_PIXART_SIGMA, image_model="pixart_alpha", model_max_length=120, micro_condition=True)
# Tiny: 48 wide (alpha's size and aspect embeddings take a third each, so a multiple of 3), two
# 24-channel heads, three blocks, a 32-wide context (the tiny T5 of tgate_testkit.encoders). Sample tiny
# PixArt at a latent side above 32 (64: 512 px): PixArtMS's position embedding divides by
# round(side / 64), which is 0 up to 32 (Python rounds 0.5 to even): a ZeroDivisionError.
_TINY_PIXART_SIGMA = dict(
    _PIXART_SIGMA,
    hidden_size=48,
    num_heads=2,
    depth=3,
    caption_channels=32,
    model_max_length=16,
    input_size=32,
    pe_interpolation=1,
)
_TINY_PIXART_ALPHA = dict(_TINY_PIXART_SIGMA, image_model="pixart_alpha", micro_condition=True)

# Joint attention (model_detection.py's configurations, narrowed): Flux with two double and two
# single blocks, Chroma (Flux blocks, modulation from its distilled guidance layer) and Qwen-Image.
_TINY_FLUX = dict(
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=8,
    context_in_dim=8,
    hidden_size=32,
    mlp_ratio=2.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[4, 6, 6],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=False,
)
_TINY_CHROMA = {
    **{k: v for k, v in _TINY_FLUX.items() if k not in ("vec_in_dim", "guidance_embed")},  # Chroma has neither
    "image_model": "chroma",
    "in_channels": 64,
    "out_channels": 64,
    "in_dim": 64,  # the approximator's input: timestep, guidance and block-index embeddings (16 + 16 + 32)
    "out_dim": 32,  # = hidden_size
    "hidden_dim": 32,
    "n_layers": 1,
}
# HiDream I1: 1 double and 2 single blocks, hidden 32 (2 heads of 16, RoPE axes 8 + 4 + 4), T5 and
# Llama both 8 wide; one Llama layer per block from a stack of 2 (the real model picks 48 of Llama
# 3.1's 32 layers, the last repeated), a mixture of 3 experts, 2 active, in every image feed-forward.
_TINY_HIDREAM = dict(
    image_model="hidream",
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    caption_channels=[8, 8],
    text_emb_dim=8,
    num_routed_experts=3,
    num_activated_experts=2,
    axes_dims_rope=[8, 4, 4],
    max_resolution=[16, 16],
    llama_layers=[0, 1, 1],
)
# Chroma Radiance (Chroma's pixel-space variant, refused): what the refusal tests build.
_TINY_CHROMA_RADIANCE = {
    **_TINY_CHROMA,
    "image_model": "chroma_radiance",
    "in_channels": 3,
    "out_channels": 3,
    "patch_size": 16,
    "nerf_hidden_size": 8,
    "nerf_mlp_ratio": 2,
    "nerf_depth": 1,
    "nerf_max_freqs": 2,
    "nerf_tile_size": 0,
    "nerf_final_head_type": "linear",
    "nerf_embedder_dtype": None,
}
# SD3's MMDiT (hidden 64 x depth) and AuraFlow (4-channel latent; max_seq: 8 x 8 patches, a 128 px image).
_TINY_SD3 = dict(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    depth=2,
    adm_in_channels=32,
    pos_embed_max_size=16,
    num_patches=256,
    pos_embed_scaling_factor=None,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 8, "out_features": 128}},
)
_TINY_AURAFLOW = dict(
    in_channels=4,
    out_channels=4,
    patch_size=2,
    dim=32,
    n_layers=3,
    n_double_layers=1,
    n_heads=2,
    global_conddim=32,
    cond_seq_dim=8,
    max_seq=64,
)
# Mochi (model_detection.py's configuration, narrowed): 2 blocks, the last of which does not update
# the text; T5 text padded to t5_token_length with a mask, as ComfyUI's Mochi encoder gives it.
_TINY_MOCHI = dict(
    image_model="mochi_preview",
    depth=2,
    patch_size=2,
    num_heads=2,
    hidden_size_x=32,
    hidden_size_y=16,
    mlp_ratio_x=384.0,  # the block asserts an image MLP 12288 wide (Mochi's 1536 x 8)
    mlp_ratio_y=2.0,
    learn_sigma=False,
    in_channels=12,
    qk_norm=True,
    qkv_bias=False,
    out_bias=True,
    attn_drop=0.0,
    patch_embed_bias=True,
    posenc_preserve_area=True,
    timestep_mlp_bias=True,
    attend_to_padding=False,
    timestep_scale=1000.0,
    use_t5=True,
    t5_feat_dim=8,
    t5_token_length=8,
    rope_theta=10000.0,
)
# Lumina 2 (NextDiT): Gemma's caption unpadded, with its all-ones attention mask (the encoder returns
# one; ComfyUI then passes num_tokens alone), and fewer keys and values heads than query heads, as the
# real model (24 and 8).
_TINY_LUMINA2 = dict(
    image_model="lumina2",
    patch_size=2,
    in_channels=16,
    dim=32,
    cap_feat_dim=8,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=1,
    qk_norm=True,
    axes_dims=[4, 6, 6],
    axes_lens=[32, 32, 32],
)
_TINY_QWEN_IMAGE = dict(
    image_model="qwen_image",
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
)

# Full-width joint-attention models (comfy/model_detection.py's configurations for the real checkpoints)
# with FEWER BLOCKS, so that they fit and run on a 24 GB CPU machine: every block keeps its real widths,
# heads and text length, so a block's cost and the text rows' share of it are the real model's.
# Flux dev (19 double + 38 single blocks) and Chroma (the same blocks) here with 2 double + 4 single
# (the real 1:2 ratio), about 1.3B weights; Qwen-Image with 3 of its 60 blocks, about 1.1B.
# Flux dev: guidance embedding, pooled CLIP-L (768), T5-XXL padded to 256 tokens (ComfyUI's Flux
# tokenizer, min_length 256, no mask), FluxGuidance 3.5 on both conds.
_FLUX_DEV = dict(
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=2,  # of 19
    depth_single_blocks=4,  # of 38
    axes_dim=[16, 56, 56],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=True,
)
_FLUX_DEPTH = (("depth", 19), ("depth_single_blocks", 38))  # the real checkpoints' (Flux dev and schnell, Chroma)
# Chroma: Flux's blocks without vector_in and guidance_in (modulations from the distilled guidance
# layer, 5 layers 5120 wide); latents are 16 channels (its img_in takes 64 = 16 x 2 x 2); T5-XXL
# unpadded (64 tokens: a long prompt).
_CHROMA = dict(
    {k: v for k, v in _FLUX_DEV.items() if k not in ("vec_in_dim", "guidance_embed")},
    image_model="chroma",
    in_channels=64,
    out_channels=64,
    in_dim=64,
    out_dim=3072,
    hidden_dim=5120,
    n_layers=5,
)
# Qwen-Image: 24 heads x 128 = 3072, Qwen2.5-VL's 3584-wide text unpadded (64 tokens), 3 of its 60
# blocks; model detection reads in_channels from img_in (64 = 16 latent channels x 2 x 2). Chroma's
# distilled guidance layer runs over 344 modulation rows whatever the depth, and every model's
# embedders and final layer are there once: with fewer blocks these weigh more in a step than in the
# real model (tgate_bench.text_share --full-depth counts the real depth, shapes only).
_QWEN_IMAGE = dict(image_model="qwen_image", in_channels=64, num_layers=3)
# SD3.5 Large, as model detection reads its checkpoint: depth 38 sets the width (64 x 38 = 2432) and
# the heads (38); `num_blocks` runs 4 of its 38 joint blocks. Text: CLIP-L + CLIP-G (77 tokens, padded
# to T5's 4096 width) then T5 (77 tokens), pooled 2048.
_SD35_LARGE = dict(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    depth=38,
    num_blocks=4,
    input_size=None,
    adm_in_channels=2048,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}},
    num_patches=36864,
    pos_embed_max_size=192,
    qk_norm="rms",
    pos_embed_scaling_factor=None,
    x_block_self_attn_layers=[],
)
# Lumina 2 (Lumina-Image-2.0), as model detection reads it: 2304 wide, 24 query and 8 key/value heads,
# Gemma 2 2B's 2304-wide caption; 4 of its 26 main layers, both refiners. The caption: what
# CLIPTextEncodeLumina2 gives, its system prompt and a short prompt, about 128 tokens unpadded (the
# encoder returns an all-ones mask, so ComfyUI passes num_tokens alone).
_LUMINA2 = dict(
    _TINY_LUMINA2,
    dim=2304,
    cap_feat_dim=2304,
    n_layers=4,
    n_refiner_layers=2,
    n_heads=24,
    n_kv_heads=8,
    axes_dims=[32, 32, 32],
    axes_lens=[300, 512, 512],
)
# HiDream I1 Full, as model detection reads it: 20 heads x 128 = 2560 wide, RoPE 64 + 32 + 32, T5 and
# Llama 3.1 both 4096 wide, 4 experts (2 active) in every image feed-forward; 1 double and 2 single
# blocks of its 16 and 32 (the real 1:2 ratio), each with its Llama layer (the real model's first and
# last ones) from the 32 the text encoder stacks. The text: T5 and Llama each padded to 128 tokens
# (ComfyUI's HiDream encoder), pooled CLIP-L and -G (2048).
_HIDREAM_LLAMA_LAYERS = [*range(32), *[31] * 16]
_HIDREAM_FULL = dict(
    _TINY_HIDREAM,
    attention_head_dim=128,
    num_attention_heads=20,
    caption_channels=[4096, 4096],
    text_emb_dim=2048,
    num_routed_experts=4,
    axes_dims_rope=[64, 32, 32],
    max_resolution=[128, 128],
    llama_layers=[0, 31, 31],
)
# AuraFlow (MMDiT's defaults, which model detection keeps): 3072 wide, 12 heads, Pile-T5 XL's 2048-wide
# text padded to 256 tokens (ComfyUI's AuraFlow encoder), 8 register tokens before it, SDXL's 4-channel
# latent (max_seq 4096: 64 x 64 patches, 1024²); 1 double and 4 single layers of its 4 and 32.
_AURAFLOW = dict(_TINY_AURAFLOW, dim=3072, n_layers=5, n_heads=12, global_conddim=3072, cond_seq_dim=2048, max_seq=4096)
# Mochi preview, as model detection reads it (48 blocks; 4 here): 3072 wide for the video, 1536 for the
# text, T5-XXL padded to 256 tokens with its mask, 12-channel latent frames.
_MOCHI = dict(
    _TINY_MOCHI,
    depth=4,
    num_heads=24,
    hidden_size_x=3072,
    hidden_size_y=1536,
    mlp_ratio_x=4.0,
    mlp_ratio_y=4.0,
    t5_feat_dim=4096,
    t5_token_length=256,
)

ARCHITECTURES = {
    "sd15": Architecture("SD15", _SD15, context_tokens=77),
    "sdxl": Architecture("SDXL", _SDXL, context_tokens=77, pooled=1280),
    "tiny-sd15": Architecture("SD15", _TINY_SD15, context_tokens=7),
    "tiny-sdxl": Architecture("SDXL", _TINY_SDXL, context_tokens=7, pooled=_TINY_POOLED),
    "tiny-sd2": Architecture("SD20", _TINY_SD2, context_tokens=7),
    "tiny-sdxl-refiner": Architecture("SDXLRefiner", _TINY_SDXL_REFINER, context_tokens=7, pooled=_TINY_POOLED),
    "tiny-svd": Architecture("SVD_img2vid", _TINY_SVD, context_tokens=1),
    "wan21-1.3b": Architecture("WAN21_T2V", _WAN21_1_3B, **dict(_WAN_TEXT, context_tokens=512, latent=(16, 9))),
    "tiny-wan21-t2v": Architecture("WAN21_T2V", _TINY_WAN, **_TINY_WAN_TEXT),
    "tiny-wan21-i2v": Architecture("WAN21_I2V", _TINY_WAN_I2V, image_tokens=257, **_TINY_WAN_TEXT),
    "tiny-wan22-5b": Architecture("WAN22_T2V", _TINY_WAN22_5B, **dict(_TINY_WAN_TEXT, latent=(48, 3), downscale=16)),
    "tiny-wan21-vace": Architecture("WAN21_Vace", _TINY_WAN_VACE, **_TINY_WAN_TEXT),
    "ltxv-2b": Architecture("LTXV", _LTXV_2B, latent=(128, 13), **_LTXV_TEXT),
    "tiny-ltxv": Architecture("LTXV", _TINY_LTXV, latent=(128, 3), **_LTXV_TEXT),
    "cosmos-predict2-2b": Architecture("CosmosT2IPredict2", _COSMOS_PREDICT2_2B, latent=(16, 1), **_COSMOS_TEXT),
    "tiny-cosmos-predict2": Architecture("CosmosT2IPredict2", _TINY_COSMOS_PREDICT2, latent=(16, 1), **_COSMOS_TEXT),
    "tiny-cosmos-predict2-i2v": Architecture("CosmosI2VPredict2", _TINY_COSMOS_PREDICT2_I2V, latent=(16, 3), **_COSMOS_TEXT),
    "pixart-sigma": Architecture("PixArtSigma", _PIXART_SIGMA, context_tokens=120, context_width=4096),
    "pixart-alpha": Architecture("PixArtAlpha", _PIXART_ALPHA, context_tokens=120, context_width=4096),
    "tiny-pixart-sigma": Architecture("PixArtSigma", _TINY_PIXART_SIGMA, context_tokens=7, context_width=32),
    "tiny-pixart-alpha": Architecture("PixArtAlpha", _TINY_PIXART_ALPHA, context_tokens=7, context_width=32),
    "flux-dev": Architecture(
        "Flux",
        _FLUX_DEV,
        context_tokens=256,
        context_width=4096,
        pooled=768,
        cond_values=(("guidance", 3.5),),
        latent=(16,),
        full_depth=_FLUX_DEPTH,
    ),
    "chroma": Architecture(
        "Chroma", _CHROMA, context_tokens=64, context_width=4096, no_pooled=True, latent=(16,), full_depth=_FLUX_DEPTH
    ),
    "qwen-image": Architecture(
        "QwenImage", _QWEN_IMAGE, context_tokens=64, context_width=3584, latent=(16, 1), full_depth=(("num_layers", 60),)
    ),
    "sd35-large": Architecture(
        "SD3", _SD35_LARGE, context_tokens=154, context_width=4096, pooled=2048, latent=(16,), full_depth=(("num_blocks", 38),)
    ),
    "lumina2": Architecture(
        "Lumina2",
        _LUMINA2,
        context_tokens=128,
        context_width=2304,
        prompt_tokens=128,
        no_pooled=True,
        latent=(16,),
        full_depth=(("n_layers", 26),),
    ),
    "hidream-full": Architecture(
        "HiDream",
        _HIDREAM_FULL,
        context_tokens=128,
        context_width=4096,
        pooled=2048,
        latent=(16,),
        llama=(32, 128),
        full_depth=(("num_layers", 16), ("num_single_layers", 32), ("llama_layers", _HIDREAM_LLAMA_LAYERS)),
    ),
    "auraflow": Architecture(
        "AuraFlow",
        _AURAFLOW,
        context_tokens=256,
        context_width=2048,
        no_pooled=True,
        full_depth=(("n_layers", 36), ("n_double_layers", 4)),
    ),
    "mochi": Architecture(
        "GenmoMochi",
        _MOCHI,
        context_tokens=256,
        context_width=4096,
        prompt_tokens=64,
        latent=(12, 7),
        full_depth=(("depth", 48),),
    ),
    "tiny-flux": Architecture("Flux", _TINY_FLUX, context_tokens=8, context_width=8, pooled=8, latent=(16,)),
    "tiny-lumina2": Architecture(
        "Lumina2", _TINY_LUMINA2, context_tokens=8, context_width=8, prompt_tokens=8, no_pooled=True, latent=(16,)
    ),
    "tiny-chroma-radiance": Architecture(
        "ChromaRadiance", _TINY_CHROMA_RADIANCE, context_tokens=8, context_width=8, no_pooled=True, latent=(3,), downscale=1
    ),
    "tiny-hidream": Architecture(
        "HiDream", _TINY_HIDREAM, context_tokens=8, context_width=8, pooled=8, latent=(16,), llama=(2, 8)
    ),
    "tiny-sd3": Architecture("SD3", _TINY_SD3, context_tokens=8, context_width=8, pooled=32, latent=(16,)),
    "tiny-auraflow": Architecture("AuraFlow", _TINY_AURAFLOW, context_tokens=8, context_width=8, no_pooled=True),
    "tiny-mochi": Architecture("GenmoMochi", _TINY_MOCHI, context_tokens=8, context_width=8, prompt_tokens=6, latent=(12, 2)),
    "tiny-chroma": Architecture("Chroma", _TINY_CHROMA, context_tokens=8, context_width=8, no_pooled=True, latent=(16,)),
    "tiny-qwen-image": Architecture("QwenImage", _TINY_QWEN_IMAGE, context_tokens=8, context_width=32, latent=(16, 1)),
    "tiny-ace-step": Architecture(
        "ACEStep", _TINY_ACE_STEP, context_tokens=8, context_width=32, fixed_latent=(8, 16, 32), lyrics_tokens=12
    ),
}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Fill every weight with seeded values of sensible scale (ComfyUI leaves new weights empty)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(module.named_parameters()):
            g = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.1, generator=g)


def fill_pos_embed(diffusion_model: torch.nn.Module, seed: int) -> None:
    """SD3's position embedding is a buffer a checkpoint fills; ComfyUI leaves it uninitialised (NaN or
    garbage): seeded small values here. Other models are left as they are."""
    pos_embed = getattr(diffusion_model, "pos_embed", None)
    if isinstance(pos_embed, torch.Tensor) and not isinstance(pos_embed, torch.nn.Parameter):
        with torch.no_grad():
            pos_embed.normal_(0.0, 0.02, generator=torch.Generator(device=pos_embed.device).manual_seed(seed))


def build_model(
    arch: str | Architecture, dtype: torch.dtype = torch.float32, seed: int = 0, unet: dict | None = None, device=None
):
    """A ComfyUI ModelPatcher around a random-weight model of `arch`, built on `device` (default
    ComfyUI's; "meta" gives shapes without weights, for counting FLOPs)."""
    import comfy.model_management as mm
    import comfy.model_patcher as model_patcher
    import comfy.supported_models as supported_models

    arch = ARCHITECTURES[arch] if isinstance(arch, str) else arch
    config = getattr(supported_models, arch.model_config)(unet or arch.unet)
    config.set_inference_dtype(dtype, None)
    device = torch.device(device) if device else mm.get_torch_device()
    model = config.get_model({}, device=device)
    model.diffusion_model.to(device=device, dtype=dtype)
    if device.type != "meta":
        randomize(model, seed)
        fill_pos_embed(model.diffusion_model, seed)
    return model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


def random_cond(arch: str | Architecture, seed: int, batch: int = 1, size: int = 64) -> list:
    """A random conditioning shaped as the family's text encoder and conditioning nodes make it; image
    i of a batch gets the same tensors whatever the batch size."""
    arch = ARCHITECTURES[arch] if isinstance(arch, str) else arch
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, arch.context_tokens, arch.context_dim, generator=g)
    options = {"pooled_output": None} if arch.no_pooled else {}
    if arch.pooled:
        pooled = torch.randn(batch, arch.pooled, generator=torch.Generator().manual_seed(seed + 1000))
        options = dict(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0, target_width=size, target_height=size)
    if arch.prompt_tokens:
        mask = torch.zeros(batch, arch.context_tokens, dtype=torch.long)
        mask[:, : arch.prompt_tokens] = 1
        if arch.zero_padding:
            context = context * mask.unsqueeze(-1)
        options.update(pooled_output=None, attention_mask=mask)
    options.update(arch.cond_values)
    if arch.llama:
        g = torch.Generator().manual_seed(seed + 3000)
        options["conditioning_llama3"] = torch.randn(batch, *arch.llama, arch.context_dim, generator=g)
    if arch.image_tokens:
        # What CLIPVisionEncode gives (crop none): only the penultimate hidden states reach a Wan model.
        import comfy.clip_vision

        vision = comfy.clip_vision.Output()
        g = torch.Generator().manual_seed(seed + 2000)
        vision.penultimate_hidden_states = torch.randn(batch, arch.image_tokens, 1280, generator=g)
        options["clip_vision_output"] = vision
    if arch.lyrics_tokens:
        # As TextEncodeAceStepAudio gives them: int64 token ids, and the strength they are scaled by.
        vocab = arch.unet["lyric_encoder_vocab_size"]
        lyrics = torch.randint(0, vocab, (batch, arch.lyrics_tokens), generator=torch.Generator().manual_seed(seed + 2000))
        options = dict(pooled_output=None, conditioning_lyrics=lyrics, lyrics_strength=1.0)
    return [[context, options]]
