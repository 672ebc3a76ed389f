"""Model files with random weights that ComfyUI's own loader nodes detect as the real thing."""

from __future__ import annotations

from pathlib import Path

import torch

from .models import ARCHITECTURES, randomize

SD15_UNET = ARCHITECTURES["tiny-sd15"].unet

# A checkpoint ComfyUI's CheckpointLoaderSimple detects as SD1.5: the UNet has SD1.5's widths
# (320 channels, 768-wide text context) but a single level, and the text encoder and VAE are the
# real SD1.5 architectures, all with random weights stored in fp16.
CHECKPOINT_UNET = dict(
    SD15_UNET,
    model_channels=320,
    context_dim=768,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    num_heads=8,
)
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


def write_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models as supported_models
    from safetensors.torch import save_file

    state = {}
    unet = supported_models.SD15(CHECKPOINT_UNET).get_model({})
    parts = {
        "model.diffusion_model.": unet.diffusion_model,
        "cond_stage_model.": sd1_clip.SDClipModel(device="cpu", dtype=torch.float32),
        "first_stage_model.": autoencoder.AutoencoderKL(ddconfig=SD_VAE, embed_dim=4),
    }
    for i, (prefix, module) in enumerate(parts.items()):
        randomize(module, seed + i)
        for key, value in module.state_dict().items():
            state[prefix + key] = value.to(torch.float16).contiguous() if value.is_floating_point() else value.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
