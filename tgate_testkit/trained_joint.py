"""The coloured-shapes world of tgate_testkit.trained, learnt by a joint-attention model: Flux's blocks.

Same prompts, same fixed-table text tokens [start, colour, shape, position], same latent (4 channels
in model space, SD1.5's latent scale, so `trained.model_space`, `read` and `score` apply unchanged),
same checker. What differs is how text enters: as tokens in a text stream that every double-stream
block updates and mixes with the image tokens in one joint attention, and that the single-stream
blocks carry as the first rows of [text; image] (ComfyUI's `comfy.ldm.flux` classes, as Flux, Chroma
and HunyuanImage use them). No pooled text vector (`y` stays ComfyUI's zeros) and no guidance
embedding: text enters through the tokens alone, as in Qwen-Image, Chroma, AuraFlow and Lumina 2, and
the model is trained for real classifier-free guidance (caption dropout), as those are.

The model config is ComfyUI's FluxSchnell config (rectified flow, `ModelType.FLOW`, shift 1: linear
sigmas) with SD1.5's 4-channel latent format instead of Flux's 16 channels. Its weights are
tgate_testkit/weights/shapes-joint.safetensors, trained by `python -m tgate_bench.train_shapes --model joint`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

from tgate_testkit import trained

WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes-joint.safetensors"
# The second model (docs/joint/PLAN.md, addendum 2): the same, with a pooled text vector in every
# block's modulation through Flux's `vector_in`, the mean of the prompt's token embeddings.
POOLED_WEIGHTS = WEIGHTS.with_name("shapes-joint-pooled.safetensors")
POOLED_WIDTH = trained.CONTEXT_DIM

# Flux-shaped (ComfyUI's Flux class), shrunk: hidden 128 in 4 heads of 32 (RoPE axes 8 + 12 + 12,
# the first axis being the image index Flux keeps at 0), two double-stream and two single-stream
# blocks; the 32x32 latent in 2x2 patches is 256 image tokens beside the 4 text tokens.
FLUX = dict(
    image_model="flux",
    in_channels=trained.CHANNELS,
    out_channels=trained.CHANNELS,
    vec_in_dim=1,  # no pooled vector: the model sees ComfyUI's zeros there
    context_in_dim=trained.CONTEXT_DIM,
    hidden_size=128,
    mlp_ratio=4.0,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[8, 12, 12],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    guidance_embed=False,
)
DOUBLE_BLOCKS, SINGLE_BLOCKS = FLUX["depth"], FLUX["depth_single_blocks"]


def config(pooled: bool = False):
    """ComfyUI's FluxSchnell model config around FLUX, with SD1.5's 4-channel latent format; `pooled`:
    the second model's, whose `vector_in` reads a POOLED_WIDTH pooled vector."""
    import comfy.latent_formats as latent_formats
    import comfy.supported_models as supported_models

    class ShapesJoint(supported_models.FluxSchnell):
        latent_format = latent_formats.SD15
        # Flux's factor sizes the activations of a 12-billion-weight model: with it ComfyUI would
        # split cond and uncond of a 48-prompt batch into separate calls for want of memory.
        memory_usage_factor = 0.1

    cfg = ShapesJoint(dict(FLUX, vec_in_dim=POOLED_WIDTH) if pooled else dict(FLUX))
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def build(weights: Path | None = WEIGHTS, device=None, pooled: bool = False):
    """A ComfyUI ModelPatcher around the Flux-shaped model (`pooled`: the second model), with the
    trained weights (or ComfyUI's classes' fresh initialisation, seeded by the caller, for None)."""
    import comfy.model_management as mm
    import comfy.model_patcher as model_patcher

    device = device or mm.get_torch_device()
    model = config(pooled).get_model({}, device=device)
    if weights is None:
        _initialise(model.diffusion_model)
    else:
        from safetensors.torch import load_file

        model.diffusion_model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    model.diffusion_model.to(device=device, dtype=torch.float32)
    return model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


def _initialise(module: torch.nn.Module) -> None:
    """trained.reset_layers, and the modulations' and the final layer's output zeroed (adaLN-zero,
    as DiT and Flux train): every block starts as the identity."""
    trained.reset_layers(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lin." in name or name.startswith(("final_layer.linear.", "final_layer.adaLN_modulation")):
                p.zero_()


def conditioning(prompts, pooled: bool = False) -> list:
    """ComfyUI CONDITIONING for a batch of prompts: the shapes world's text tokens, and as
    `pooled_output` zeros (ComfyUI's Flux model reads one; zeros are what the first model saw in
    training) or, for the second model, the tokens' pooled vector."""
    tokens = trained.encode(prompts)
    vector = pooled_vector(tokens) if pooled else torch.zeros(tokens.shape[0], FLUX["vec_in_dim"])
    return [[tokens, {"pooled_output": vector}]]


def pooled_vector(context: torch.Tensor) -> torch.Tensor:
    """The second model's pooled text vector: the mean of the prompt's token embeddings, [batch, 64]."""
    return context.mean(dim=1)


class _OutOfPlace(torch.Tensor):
    """A block input whose `+=` makes a new tensor. Flux's blocks add to their input in place
    (`txt += ...`, `x += ...`) after a LayerNorm kept it for the backward pass, which autograd
    refuses; the values are the same either way, so training hands the blocks this view."""

    def __iadd__(self, other):
        return torch.add(self, other)


def _out_of_place_block(args: dict, extra: dict) -> dict:
    """A `patches_replace["dit"]` entry that runs the original block on _OutOfPlace inputs."""
    inputs = {k: v.as_subclass(_OutOfPlace) if k in ("img", "txt") else v for k, v in args.items()}
    return {k: v.as_subclass(torch.Tensor) for k, v in extra["original_block"](inputs).items()}


TRAINING_OPTIONS = {
    "patches_replace": {
        "dit": {("double_block", i): _out_of_place_block for i in range(DOUBLE_BLOCKS)}
        | {("single_block", i): _out_of_place_block for i in range(SINGLE_BLOCKS)}
    }
}


def objective(model_sampling, pooled: bool = False):
    """The rectified-flow loss ComfyUI's sampler assumes (`ModelType.FLOW`, CONST: denoised =
    x_t - s * output): x_t = (1 - s) x0 + s n and the model predicts n - x0; s is drawn uniformly
    from the model sampling's 1000 sigmas (shift 1: t / 1000). Returns loss(net, x0, context, generator);
    `pooled`: the second model, given the context's pooled vector."""
    table = model_sampling.sigmas.float()

    def loss(net, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s = table[torch.randint(0, table.shape[0], (x0.shape[0],), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        y = pooled_vector(context) if pooled else None  # None: ComfyUI's Flux gives zeros
        prediction = net(x_t, s, context=context, y=y, transformer_options=TRAINING_OPTIONS)
        return (prediction - (noise - x0)).square().mean()

    return loss


# What train_shapes needs of the second model: its weights file, builder and objective.
POOLED = SimpleNamespace(WEIGHTS=POOLED_WEIGHTS, build=partial(build, pooled=True), objective=partial(objective, pooled=True))

__all__ = [
    "DOUBLE_BLOCKS",
    "FLUX",
    "POOLED",
    "POOLED_WEIGHTS",
    "SINGLE_BLOCKS",
    "WEIGHTS",
    "build",
    "conditioning",
    "config",
    "objective",
    "pooled_vector",
]
