"""Random-weight model files that ComfyUI's own loader nodes detect as the intended model types: the one
place that writes model files, for the tests and for `python -m tgate_bench.examples`.

Every file keeps the keys and the shapes ComfyUI's detection reads (comfy/model_detection.py,
comfy/sd.py), so CheckpointLoaderSimple, UNETLoader, CLIPLoader and VAELoader take them for the real
thing; what detection does not fix is made small. Where ComfyUI fixes a shape it stays real size (the
SD VAE, 83M weights; the Wan 2.1 VAE, 127M; CLIP-L; PixArt's 1152-wide blocks). ComfyUI builds
T5-XXL, UMT5-XXL and CLIP-G from fixed configurations; their files carry a configuration override that
tgate_testkit/comfy_tiny_options.py hands to ComfyUI (see there). Weights are seeded random values:
the diffusion models' in fp16, the text encoders' and VAEs' matrices in fp8 (see _fp8).
Import only once ComfyUI is importable (tgate_testkit.comfy_env.import_comfyui).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .comfy_tiny_options import MARKER
from .encoders import SD_VAE, umt5_tokenizer, wan21_vae_module
from .models import ARCHITECTURES, fill_pos_embed, randomize

# -- SD1.5 ----------------------------------------------------------------------------------------
# A checkpoint ComfyUI's CheckpointLoaderSimple detects as SD1.5: the UNet has SD1.5's widths
# (320 channels, 768-wide text context) but a single level, and the text encoder and VAE are the
# real SD1.5 architectures, all with random weights (see _fp8).
CHECKPOINT_UNET = dict(
    ARCHITECTURES["tiny-sd15"].unet,
    model_channels=320,
    context_dim=768,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    num_heads=8,
)


def _fp16(state: dict) -> dict:
    return {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}


def _fp8(state: dict) -> dict:
    """Matrices in float8_e4m3fn, the rest in fp16: for the text encoders and VAEs, whose compute dtype
    ComfyUI chooses itself (the loaders convert on load). Halves the files; the diffusion models stay
    fp16, since ComfyUI takes a diffusion model's dtype from its file."""
    out = _fp16(state)
    return {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() and v.ndim >= 2 else v for k, v in out.items()}


def _save(state: dict, path: Path, options: dict | None = None) -> Path:
    from safetensors.torch import save_file

    if options:
        state[MARKER] = torch.tensor(list(json.dumps(options).encode("utf-8")), dtype=torch.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models as supported_models

    state = {}
    unet = supported_models.SD15(CHECKPOINT_UNET).get_model({})
    parts = {
        "model.diffusion_model.": unet.diffusion_model,
        "cond_stage_model.": sd1_clip.SDClipModel(device="cpu", dtype=torch.float32),
        "first_stage_model.": autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4),
    }
    for i, (prefix, module) in enumerate(parts.items()):
        randomize(module, seed + i)
        store = _fp16 if prefix == "model.diffusion_model." else _fp8
        state.update(store({prefix + key: value for key, value in module.state_dict().items()}))
    return _save(state, path)


# -- SDXL ----------------------------------------------------------------------------------------
# Detection matches SDXL on 320 channels, linear transformers, a 2048-wide context, a 2816-wide
# `y` and input transformer depths [0, 0, 2, 2, 10, 10] (so three levels of two blocks): those stay.
# The levels are all 320 wide (SDXL's are 320, 640, 1280) and the middle and output blocks hold one
# transformer each where SDXL has 10 or 2. The text encoders are SDXL's CLIP-L (real) and CLIP-G
# with 3 of its 32 layers (1280 wide: the context and the pooled vector need that width).
SDXL_CHECKPOINT_UNET = dict(
    ARCHITECTURES["sdxl"].unet,
    channel_mult=[1, 1, 1],
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
    transformer_depth_middle=1,
)
TINY_CLIP_G = {"clip_g_model_config": {"num_hidden_layers": 3}}


def _checkpoint(path: Path, model, clip, vae, seed: int, options: dict) -> Path:
    """A single-file checkpoint as ComfyUI saves one (model.state_dict_for_saving): the diffusion model in
    fp16, the text encoders and the VAE in fp8, the text encoders' configuration override carried along."""
    for i, module in enumerate((model.diffusion_model, clip, vae)):
        randomize(module, seed + i)
    fill_pos_embed(model.diffusion_model, seed)
    state = model.state_dict_for_saving(clip_state_dict=clip.state_dict(), vae_state_dict=vae.state_dict())
    unet = "model.diffusion_model."
    state = {
        **_fp8({k: v for k, v in state.items() if not k.startswith(unet)}),
        **_fp16({k: v for k, v in state.items() if k.startswith(unet)}),
    }
    return _save(state, path, options)


def write_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.sdxl_clip as sdxl_clip
    import comfy.supported_models as supported_models

    model = supported_models.SDXL(dict(SDXL_CHECKPOINT_UNET)).get_model({})
    clip = sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32, model_options=TINY_CLIP_G)
    vae = autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    return _checkpoint(path, model, clip, vae, seed, TINY_CLIP_G)


# -- PixArt-Sigma --------------------------------------------------------------------------------
# UNETLoader detects PixArt from "t_block.1.weight" and fixes 1152 channels and 16 heads; the depth is
# counted (1 block here, 28 in the real model) and the caption projection takes T5-XXL's 4096 width.
PIXART_UNET = dict(ARCHITECTURES["pixart-sigma"].unet, depth=1)
# PixArt's T5-XXL (CLIPLoader type "pixart"): detection needs block 23's feed-forward at the 4096
# width; the override keeps those and ComfyUI's T5 tokenizer's vocabulary, with 2 heads of 16 and a
# 32-wide feed-forward in each of the 24 blocks.
TINY_T5XXL = {"t5xxl_model_config": {"d_ff": 32, "d_kv": 16, "num_heads": 2}}


def write_pixart_sigma_unet(path: Path, seed: int = 0) -> Path:
    import comfy.supported_models as supported_models

    model = supported_models.PixArtSigma(dict(PIXART_UNET)).get_model({})
    randomize(model.diffusion_model, seed)
    return _save(_fp16(model.diffusion_model.state_dict()), path)


def write_pixart_t5(path: Path, seed: int = 0) -> Path:
    import comfy.text_encoders.pixart_t5 as pixart_t5

    te = pixart_t5.pixart_te()(device="cpu", dtype=torch.float32, model_options=TINY_T5XXL)
    randomize(te, seed)
    return _save(_fp8(te.t5xxl.transformer.state_dict()), path, TINY_T5XXL)


def write_sd_vae(path: Path, seed: int = 0) -> Path:
    """The SD/SDXL VAE (AutoencoderKL, real size: ComfyUI fixes its widths), as VAELoader takes it."""
    import comfy.ldm.models.autoencoder as autoencoder

    vae = autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    randomize(vae, seed)
    return _save(_fp8(vae.state_dict()), path)


# -- Wan 2.1 -------------------------------------------------------------------------------------
# UNETLoader reads Wan's sizes from the state dict: tiny-wan21-t2v (two 128-wide heads, two blocks).
WAN_UNET = ARCHITECTURES["tiny-wan21-t2v"].unet
# UMT5-XXL (CLIPLoader type "wan"): as for PixArt's T5, and a 256-token vocabulary with the
# sentencepiece tokenizer the file carries (ComfyUI reads it from the "spiece_model" tensor).
UMT5_VOCAB = 256
TINY_UMT5XXL = {"umt5xxl_model_config": {"d_ff": 32, "d_kv": 16, "num_heads": 2, "vocab_size": UMT5_VOCAB}}
TOKENIZER_TEXT = (
    "a fox moving quickly in a beautiful winter scenery nature trees mountains daytime tracking camera",
    "a photograph of a red fox sitting in a snowy forest, golden hour, detailed fur",
    "blurry, low quality, watermark, static, overexposed, worst quality, ugly, deformed",
)


def write_wan21_unet(path: Path, seed: int = 0) -> Path:
    import comfy.supported_models as supported_models

    model = supported_models.WAN21_T2V(dict(WAN_UNET)).get_model({})
    randomize(model.diffusion_model, seed)
    return _save(_fp16(model.diffusion_model.state_dict()), path)


def tiny_spiece_model() -> bytes:
    return umt5_tokenizer(TOKENIZER_TEXT, UMT5_VOCAB)


def write_wan_umt5(path: Path, seed: int = 0) -> Path:
    import comfy.text_encoders.wan as wan

    te = wan.te()(device="cpu", dtype=torch.float32, model_options=TINY_UMT5XXL)
    randomize(te, seed)
    state = _fp8(te.umt5xxl.transformer.state_dict())
    state["spiece_model"] = torch.frombuffer(bytearray(tiny_spiece_model()), dtype=torch.uint8)
    return _save(state, path, TINY_UMT5XXL)


def write_wan21_vae(path: Path, seed: int = 0) -> Path:
    """Wan 2.1's VAE: ComfyUI detects it from the keys and builds it 96 wide whatever the file, so it
    is real size (127M weights)."""
    module = wan21_vae_module(seed)
    return _save(_fp8(module.state_dict()), path)


# -- SD3.5 ---------------------------------------------------------------------------------------
# A checkpoint CheckpointLoaderSimple detects as SD3 (ComfyUI's SD3.5 template loads one file): the
# MMDiT is tiny-sd3 with SD3.5 Large's RMS query/key norm (detection reads depth from x_embedder's
# width, 64 per block: 2 blocks, 128 wide) and the widths the text encoders fix: a 4096-wide context
# (T5-XXL; CLIP-L + CLIP-G padded) and a 2048-wide pooled vector (CLIP-L + CLIP-G). pos_embed covers
# 16 x 16 patches (SD3.5's 192 x 192): a 256 px image at most. The text encoders are CLIP-L (real),
# the 3-layer CLIP-G and the thin T5-XXL of the PixArt file; the VAE is SD3's 16-channel one, real
# size (ComfyUI fixes its widths) and without quant convolutions, as SD3's.
SD35_CHECKPOINT_UNET = dict(
    ARCHITECTURES["tiny-sd3"].unet,
    adm_in_channels=2048,
    qk_norm="rms",
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
)
TINY_SD35_TEXT = {**TINY_CLIP_G, **TINY_T5XXL}


def write_sd35_checkpoint(path: Path, seed: int = 0) -> Path:
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.supported_models as supported_models
    import comfy.text_encoders.sd3_clip as sd3_clip

    model = supported_models.SD3(dict(SD35_CHECKPOINT_UNET)).get_model({})
    clip = sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=True, dtype_t5=torch.float16)(
        device="cpu", dtype=torch.float32, model_options=TINY_SD35_TEXT
    )
    vae = autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dict(SD_VAE, z_channels=16)},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dict(SD_VAE, z_channels=16)},
    )
    return _checkpoint(path, model, clip, vae, seed, TINY_SD35_TEXT)


# -- what each example workflow loads --------------------------------------------------------------
# (ComfyUI models subfolder, file name, writer): names say tiny and never match a real checkpoint.
FILES = {
    "sd15": ("checkpoints", "tgate-tiny-sd15.safetensors", write_sd15_checkpoint),
    "sdxl": ("checkpoints", "tgate-tiny-sdxl.safetensors", write_sdxl_checkpoint),
    "sd35": ("checkpoints", "tgate-tiny-sd35.safetensors", write_sd35_checkpoint),
    "pixart-sigma": ("diffusion_models", "tgate-tiny-pixart-sigma.safetensors", write_pixart_sigma_unet),
    "pixart-t5": ("text_encoders", "tgate-tiny-pixart-t5xxl.safetensors", write_pixart_t5),
    "sdxl-vae": ("vae", "tgate-tiny-sdxl-vae.safetensors", write_sd_vae),
    "wan21": ("diffusion_models", "tgate-tiny-wan21-t2v.safetensors", write_wan21_unet),
    "wan-umt5": ("text_encoders", "tgate-tiny-wan-umt5xxl.safetensors", write_wan_umt5),
    "wan21-vae": ("vae", "tgate-tiny-wan21-vae.safetensors", write_wan21_vae),
}


def write(name: str, models_dir: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write FILES[name] under `models_dir` (a ComfyUI models folder); an existing file is kept unless
    `overwrite`."""
    folder, filename, writer = FILES[name]
    path = Path(models_dir) / folder / filename
    if path.is_file() and not overwrite:
        return path
    return writer(path, seed=seed)
