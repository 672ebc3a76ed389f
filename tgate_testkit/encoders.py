"""The models around a diffusion model, tiny and with random weights, built from ComfyUI's own
classes: VAEs, CLIP-vision models and text encoders, for the families' real conditioning nodes.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from .models import ARCHITECTURES, randomize

# What the tiny ACE-Step text encoder's tokenizer is trained on, and the lyrics the tests sing.
TINY_ACE_TAGS = (
    "upbeat electronic pop, female vocals, synth bass, 120 bpm",
    "calm acoustic guitar ballad, piano, soft drums",
    "rock anthem with distorted guitars and male vocals",
    "lofi hip hop beats, jazzy chords, vinyl crackle",
)
TINY_ACE_LYRICS = "[verse]\nla la la\nhello"


# SVD's conditioning node needs a CLIP-vision model and a VAE. These are their real ComfyUI classes,
# shrunk: the CLIP-vision projection is as wide as tiny-svd's context, and the VAE keeps SD's 8x
# downscale (four levels) and 4 latent channels.
TINY_CLIP_VISION = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 32,
    "image_size": 32,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "projection_dim": ARCHITECTURES["tiny-svd"].context_dim,
}
# SD's VAE (SD1.x, SDXL), as its checkpoints configure it.
SD_VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
TINY_VAE = dict(SD_VAE, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)


def tiny_clip_vision(seed: int = 0, settings: dict | None = None):
    import json
    import tempfile

    import comfy.clip_vision

    # ClipVisionModel reads its configuration from a json file only.
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "clip_vision.json"
        config.write_text(json.dumps(settings or TINY_CLIP_VISION))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
    randomize(clip_vision.model, seed)
    return clip_vision


def tiny_vae(seed: int = 0):
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.sd

    params = {"ddconfig": TINY_VAE, "embed_dim": 4}
    module = autoencoder.AutoencoderKL(**params)
    randomize(module, seed)
    return comfy.sd.VAE(sd=module.state_dict(), config={"params": params})


# ACE-Step's text encoder is ComfyUI's AceT5Model: a UMT5-base (its configuration is fixed in a json
# file, 768 wide, a 256k vocabulary) for the tags and the lyrics tokenizer (a vocabulary file in
# ComfyUI) for the lyrics. The UMT5 is shrunk through the configuration override SDClipModel reads
# from model_options ("<model_name>_model_config"; UMT5BaseModel sets no model name) to the width of
# tiny-ace-step's context, and its sentencepiece tokenizer is trained here on TINY_ACE_TAGS.
TINY_UMT5 = {"d_model": ARCHITECTURES["tiny-ace-step"].context_dim, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}


def umt5_tokenizer(texts, vocab_size: int) -> bytes:
    """A sentencepiece model trained on `texts`, with UMT5's special tokens (pad 0, end 1, unknown 2)."""
    import sentencepiece

    spiece = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts) * 20),
        model_writer=spiece,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return spiece.getvalue()


def tiny_ace_text_encoder(seed: int = 0):
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.ace as ace

    spiece = umt5_tokenizer(TINY_ACE_TAGS, vocab_size=64)
    target = comfy.supported_models_base.ClipTarget(ace.AceT5Tokenizer, ace.AceT5Model)
    config = dict(TINY_UMT5, vocab_size=64)
    clip = comfy.sd.CLIP(target, tokenizer_data={"spiece_model": spiece}, model_options={"_model_config": config})
    randomize(clip.cond_stage_model, seed)
    return clip


# LTXV's VAE (comfy/ldm/lightricks/vae), shrunk through the configuration ComfyUI reads from a
# checkpoint's metadata: the real 128 latent channels, 8x time and 32x space downscale (patch 4 and
# three compress_all stages), one residual block at each end.
TINY_LTXV_VAE = {
    "dims": 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    "blocks": [["res_x", 1], ["compress_all", 1], ["compress_all", 1], ["compress_all", 1], ["res_x", 1]],
    "scaling_factor": 1.0,
    "norm_layer": "pixel_norm",
    "patch_size": 4,
    "latent_log_var": "uniform",
    "use_quant_conv": False,
    "causal_decoder": False,
}


def tiny_ltxv_vae(seed: int = 0):
    import json

    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltxv_vae
    import comfy.sd

    module = ltxv_vae.VideoVAE(config=TINY_LTXV_VAE)
    randomize(module, seed)
    stats = module.per_channel_statistics  # buffers, left uninitialized by the constructor
    stats.get_buffer("mean-of-means").zero_()
    stats.get_buffer("std-of-means").fill_(1.0)
    return comfy.sd.VAE(sd=module.state_dict(), metadata={"config": json.dumps({"vae": TINY_LTXV_VAE})})


def wan21_vae_module(seed: int = 0):
    """Wan 2.1's VAE module (Cosmos Predict2 uses it too) with random weights, at the full width
    (dim 96) ComfyUI always builds it with, whatever the state dict: about 127M parameters."""
    import comfy.ldm.wan.vae as wan_vae

    module = wan_vae.WanVAE(
        dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    )
    randomize(module, seed)
    return module


def wan21_vae(seed: int = 0):
    """comfy.sd.VAE around wan21_vae_module (ComfyUI detects it from the state dict)."""
    import comfy.sd

    module = wan21_vae_module(seed)
    return comfy.sd.VAE(sd=module.state_dict())


# Wan 2.1's VAE and a ViT-H-shaped CLIP vision model, tiny, for the real WanImageToVideo node.
TINY_WAN_VAE_DIM = 8  # the real Wan 2.1 VAE is 96 wide; everything else (8x spatial, 4x temporal, 16 channels) is real


def tiny_wan_vae(seed: int = 0):
    """comfy.sd.VAE built as for a real Wan 2.1 VAE checkpoint, 8 wide instead of 96.

    comfy.sd.VAE detects the Wan 2.1 VAE from its state dict and builds comfy.ldm.wan.vae.WanVAE with a
    fixed config (dim 96); for the time of the call that class is swapped for one forcing dim 8, and
    the state dict comes from that same tiny class, so all of ComfyUI's Wan VAE handling (scale factors,
    latent format, causal 4x time compression) is the real one."""
    import comfy.ldm.wan.vae as wan_vae
    import comfy.sd

    real = wan_vae.WanVAE

    class TinyWanVAE(real):
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "dim": TINY_WAN_VAE_DIM})

    module = TinyWanVAE(
        z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0
    )
    randomize(module, seed)
    sd = {k: v.contiguous() for k, v in module.state_dict().items()}
    wan_vae.WanVAE = TinyWanVAE
    try:
        vae = comfy.sd.VAE(sd=sd)
    finally:
        wan_vae.WanVAE = real
    return vae


# ViT-H/14's token layout (224 px, 14 px patches: 257 tokens) and width (1280), 2 thin layers.
TINY_CLIP_VISION_H = dict(TINY_CLIP_VISION, hidden_size=1280, image_size=224, patch_size=14, projection_dim=64)


def tiny_clip_vision_h(seed: int = 0):
    return tiny_clip_vision(seed, TINY_CLIP_VISION_H)


# PixArt's text encoder as CLIPLoader (type "pixart") builds it, shrunk: ComfyUI's own PixArt clip
# target (PixArtTokenizer, with the T5 tokenizer files ComfyUI ships, and PixArtT5XXL), its T5-XXL
# configuration overridden through the model option SDClipModel reads ("t5xxl_model_config") to the
# tiny PixArt models' caption width.
TINY_PIXART_T5 = {
    "d_model": ARCHITECTURES["tiny-pixart-sigma"].context_dim,
    "d_ff": 64,
    "d_kv": 16,
    "num_heads": 2,
    "num_layers": 2,
}


def tiny_pixart_text_encoder(seed: int = 0):
    import comfy.sd
    import comfy.supported_models as supported_models

    target = supported_models.PixArtSigma({}).clip_target()  # PixArtAlpha's is the same
    clip = comfy.sd.CLIP(target, model_options={"t5xxl_model_config": TINY_PIXART_T5, "dtype": torch.float32})
    randomize(clip.cond_stage_model, seed)
    return clip
