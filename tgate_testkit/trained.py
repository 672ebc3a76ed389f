"""A small trained text-to-image model that shows whether T-GATE keeps the prompt: coloured shapes.

The world: one shape on a black 32x32 canvas, described by a caption of three words from a small
vocabulary, "<colour> <shape> <position>" (4 colours x 3 shapes x 4 positions: 48 prompts). The image
is drawn directly as the model's 4-channel latent, no VAE: channels 0-2 are RGB in [-1, 1], channel 3
is the shape's mask (+1 inside, -1 outside). The text encoder is a fixed table: each word has a seeded
random 64-wide embedding, a caption is the four tokens [start, colour, shape, position] (the empty
caption has the null token in the last three), given to the UNet as cross-attention context, as
CLIPTextEncode's output would be.

The model is SD1.5-shaped and built from ComfyUI's own classes (supported_models.SD15, its UNetModel
and model_sampling: eps prediction, 1000 discrete scaled-linear timesteps), small enough to train on a
CPU in under an hour (tgate_bench.train_shapes). Its weights are tgate_testkit/weights/shapes-unet.safetensors.

The checker needs no model: it reads the sampled latent (what KSampler returns), thresholds the mask
channel between its background and its shape level, keeps the largest connected region, and names
the colour (the mean RGB inside it minus that outside, nearest of the four's), the shape (how much
of its bounding box it fills: square ~1, circle ~0.79, triangle ~0.5) and the position (the side of the canvas centre its
centroid lies on). Guessing at random gets all three right 1 time in 48.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

SIDE = 32  # latent side; ComfyUI images of 256 px
CHANNELS = 4
CONTEXT_DIM = 64
COLOURS = {  # RGB in [-1, 1]
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
SHAPES = ("square", "circle", "triangle")
POSITIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}  # (dx, dy), y down
PROMPTS = tuple(itertools.product(COLOURS, SHAPES, POSITIONS))  # (colour, shape, position), 48 of them
CHANCE = 1 / len(PROMPTS)

SHAPE_SIZE = 14  # the shape's bounding box side, in latent cells
OFFSET = 8  # how far the shape's centre sits from the canvas centre, before jitter
JITTER = 2  # the centre moves up to this many cells either way, in x and y
# Latent values: ComfyUI's SD1.5 latent format multiplies a latent by this before the model sees it
# (and divides the result by it), so the model works on scaled values and returns latents / 0.18215.
SD15_SCALE = 0.18215

VOCABULARY = ("<start>", "<null>", *COLOURS, *SHAPES, *POSITIONS)
TOKENS = 4
EMBEDDING_SEED = 14

WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes-unet.safetensors"

# SD1.5-shaped (ComfyUI's SD15 model config and UNetModel), shrunk: three levels of 32 -> 64 -> 64
# channels, one res block each, transformer blocks (self- then cross-attention) at the lowest level
# (8x8) and in the middle block: four cross-attention layers, 1.4M weights. Attention at 16x16 as
# well tripled the training step's time on the CPU for little gain on this data.
UNET = dict(
    image_size=SIDE,
    in_channels=CHANNELS,
    out_channels=CHANNELS,
    model_channels=32,
    num_res_blocks=[1, 1, 1],
    channel_mult=[1, 2, 2],
    transformer_depth=[0, 0, 1],
    transformer_depth_output=[0, 0, 0, 0, 1, 1],  # ComfyUI pops these from the end: the lowest level's
    transformer_depth_middle=1,
    context_dim=CONTEXT_DIM,
    num_heads=4,
    num_head_channels=-1,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_spatial_transformer=True,
    legacy=False,
    dims=2,
    use_temporal_resblock=False,
    use_temporal_attention=False,
)


def caption(prompt: tuple[str, str, str]) -> str:
    colour, shape, position = prompt
    return f"a {colour} {shape} on the {position}"


# -- the text encoder ---------------------------------------------------------------------------
def embedding_table() -> torch.Tensor:
    """The fixed word embeddings, [len(VOCABULARY), CONTEXT_DIM]: seeded, never trained."""
    return torch.randn(len(VOCABULARY), CONTEXT_DIM, generator=torch.Generator().manual_seed(EMBEDDING_SEED))


def token_ids(prompts) -> torch.Tensor:
    """[batch, TOKENS] ids; None for a prompt is the empty caption."""
    null = VOCABULARY.index("<null>")
    rows = []
    for prompt in prompts:
        words = prompt if prompt is not None else (None, None, None)
        rows.append([0] + [VOCABULARY.index(w) if w is not None else null for w in words])
    return torch.tensor(rows, dtype=torch.long)


def encode(prompts) -> torch.Tensor:
    """The cross-attention context, [batch, TOKENS, CONTEXT_DIM], of a list of prompts (None: empty)."""
    return embedding_table()[token_ids(prompts)]


def conditioning(prompts) -> list:
    """ComfyUI CONDITIONING for a batch of prompts, as CLIPTextEncode would give it."""
    return [[encode(prompts), {}]]


# -- the dataset ----------------------------------------------------------------------------------
def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.arange(SIDE, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return xs, ys


def shape_mask(shape: str, cx: float, cy: float, size: float = SHAPE_SIZE) -> torch.Tensor:
    """[SIDE, SIDE] bool: `shape` with its bounding box of side `size` centred on (cx, cy)."""
    xs, ys = _grid()
    half = size / 2
    dx, dy = xs - cx, ys - cy
    if shape == "square":
        return (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "circle":
        return dx.square() + dy.square() <= half * half
    if shape == "triangle":  # pointing up: the width grows from 0 at the top to `size` at the bottom
        v = (dy + half) / size
        return (v >= 0) & (v <= 1) & (dx.abs() <= half * v)
    raise ValueError(shape)


def draw(prompt: tuple[str, str, str], generator: torch.Generator | None = None) -> torch.Tensor:
    """One training image [CHANNELS, SIDE, SIDE] in model space (values in [-1, 1]); `generator`
    jitters the centre (None: no jitter)."""
    colour, shape, position = prompt
    dx, dy = POSITIONS[position]
    jx = jy = 0
    if generator is not None:
        jx, jy = (int(v) for v in torch.randint(-JITTER, JITTER + 1, (2,), generator=generator))
    cx, cy = SIDE / 2 + dx * OFFSET + jx, SIDE / 2 + dy * OFFSET + jy
    mask = shape_mask(shape, cx, cy)
    image = -torch.ones(CHANNELS, SIDE, SIDE)
    for c, value in enumerate(COLOURS[colour]):
        image[c][mask] = value
    image[3][mask] = 1.0
    return image


def batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, list]:
    """`size` random (image, prompt) pairs: images [size, CHANNELS, SIDE, SIDE], prompts as tuples."""
    picks = torch.randint(0, len(PROMPTS), (size,), generator=generator).tolist()
    prompts = [PROMPTS[i] for i in picks]
    return torch.stack([draw(p, generator) for p in prompts]), prompts


# -- the checker ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reading:
    colour: str | None
    shape: str | None
    position: str | None

    def scores(self, prompt) -> tuple[bool, bool, bool]:
        return self.colour == prompt[0], self.shape == prompt[1], self.position == prompt[2]


MIN_AREA = 30  # mask cells below which nothing was drawn (a 14-cell triangle has ~100)
# The mask channel is cut halfway between its background level (the median: a shape covers at most a
# fifth of the canvas) and its level inside the shape (the 98th percentile: the top 20 cells), not at
# 0: samples of this small model often tint the whole background (mask channel too), which says
# nothing about the prompt. Below this contrast nothing was drawn.
MIN_CONTRAST = 0.5


def largest_region(mask: torch.Tensor) -> torch.Tensor:
    """The largest 4-connected region of a [SIDE, SIDE] bool mask: the shape, without stray cells of
    an imperfect sample (which would stretch its bounding box) or a second, smaller blob."""
    from scipy import ndimage  # in ComfyUI's requirements

    labels, count = ndimage.label(mask.numpy())
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask.numpy(), labels, index=range(1, count + 1))
    return torch.from_numpy(labels == 1 + int(sizes.argmax()))


def read(image: torch.Tensor) -> Reading:
    """What one generated image [CHANNELS, SIDE, SIDE] (model space) shows."""
    level = image[3]
    background, inside = float(level.median()), float(level.flatten().quantile(0.98))
    if inside - background < MIN_CONTRAST:
        return Reading(None, None, None)
    mask = largest_region(level > (background + inside) / 2)
    area = int(mask.sum())
    if area < MIN_AREA:
        return Reading(None, None, None)
    # The colour as the shape's contrast with the background: a tint the sample puts over the whole
    # canvas shifts both alike. Drawn on black (-1), colour c raises the channels by COLOURS[c] + 1.
    contrast = image[:3, mask].mean(dim=1) - image[:3, ~mask].mean(dim=1)
    names = list(COLOURS)
    patterns = torch.tensor([COLOURS[n] for n in names]) + 1.0
    colour = names[int((patterns - contrast).square().sum(dim=1).argmin())]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    box = (int(xs.max() - xs.min()) + 1) * (int(ys.max() - ys.min()) + 1)
    fill = area / box
    shape = "square" if fill > 0.88 else "circle" if fill > 0.64 else "triangle"
    cx, cy = float(xs.float().mean()) + 0.5 - SIDE / 2, float(ys.float().mean()) + 0.5 - SIDE / 2
    if abs(cx) >= abs(cy):
        position = "left" if cx < 0 else "right"
    else:
        position = "top" if cy < 0 else "bottom"
    return Reading(colour, shape, position)


def model_space(samples: torch.Tensor) -> torch.Tensor:
    """KSampler's output latent -> the values the model was trained on."""
    return samples.float() * SD15_SCALE


@dataclass(frozen=True)
class Score:
    accuracy: float  # all three attributes right
    colour: float
    shape: float
    position: float
    n: int

    def row(self) -> str:
        return f"{self.accuracy:.3f} | {self.colour:.3f} | {self.shape:.3f} | {self.position:.3f}"


def score(samples: torch.Tensor, prompts) -> Score:
    """Prompt-following of KSampler output latents [batch, CHANNELS, SIDE, SIDE] against `prompts`."""
    images = model_space(samples)
    rows = torch.tensor([read(img).scores(p) for img, p in zip(images, prompts, strict=True)], dtype=torch.float64)
    per = rows.mean(dim=0).tolist()
    return Score(float(rows.all(dim=1).double().mean()), *per, n=len(prompts))


def to_rgb(samples: torch.Tensor) -> torch.Tensor:
    """KSampler output latents -> ComfyUI IMAGE [batch, SIDE, SIDE, 3] in [0, 1] (the RGB channels)."""
    return ((model_space(samples)[:, :3] + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


# -- the model --------------------------------------------------------------------------------------
def build(weights: Path | None = WEIGHTS, device=None):
    """A ComfyUI ModelPatcher around the SD1.5-shaped UNet of UNET, with the trained weights (or the
    fresh initialisation ComfyUI's classes give, made deterministic by the caller's seed, for None)."""
    import comfy.model_management as mm
    import comfy.model_patcher as model_patcher
    import comfy.supported_models as supported_models

    config = supported_models.SD15(dict(UNET))
    config.set_inference_dtype(torch.float32, None)
    device = device or mm.get_torch_device()
    model = config.get_model({}, device=device)
    if weights is None:
        _initialise(model.diffusion_model)
    else:
        from safetensors.torch import load_file

        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        model.diffusion_model.load_state_dict(state)
    model.diffusion_model.to(device=device, dtype=torch.float32)
    return model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


def reset_layers(module: torch.nn.Module) -> None:
    """ComfyUI's operations skip weight initialisation (comfy.ops disable_weight_init leaves weights
    empty): give the layers PyTorch's default initialisation (seeded by the caller); norms start as
    the identity (Flux's RMSNorm keeps its weight as `scale`)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                torch.nn.Linear.reset_parameters(sub)  # comfy.ops overrides reset_parameters to do nothing
            elif isinstance(sub, torch.nn.Conv2d):
                torch.nn.Conv2d.reset_parameters(sub)
            elif isinstance(sub, torch.nn.GroupNorm | torch.nn.LayerNorm) and sub.weight is not None:
                torch.nn.init.ones_(sub.weight)
                torch.nn.init.zeros_(sub.bias)
            elif type(sub).__name__ == "RMSNorm" and getattr(sub, "scale", None) is not None:
                torch.nn.init.ones_(sub.scale)


def _initialise(module: torch.nn.Module) -> None:
    """reset_layers, and the output layer zeroed as the original UNet code does."""
    reset_layers(module)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("out.2."):
                p.zero_()


def alphas_cumprod(model_sampling) -> torch.Tensor:
    """The 1000 alphas_cumprod of ComfyUI's ModelSamplingDiscrete, from the sigmas it keeps."""
    sigmas = model_sampling.sigmas.float()
    return 1.0 / (1.0 + sigmas.square())


def objective(model_sampling):
    """SD1.5's eps objective at uniformly random timesteps of ComfyUI's ModelSamplingDiscrete:
    x_t = sqrt(a) x0 + sqrt(1 - a) n and the model predicts n. Returns loss(net, x0, context, generator)."""
    alphas = alphas_cumprod(model_sampling)

    def loss(net, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, alphas.shape[0], (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return (net(x_t, t.float(), context=context) - noise).square().mean()

    return loss


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.model.diffusion_model.parameters())


__all__ = [
    "CHANCE",
    "COLOURS",
    "POSITIONS",
    "PROMPTS",
    "SHAPES",
    "WEIGHTS",
    "Reading",
    "Score",
    "alphas_cumprod",
    "batch",
    "build",
    "caption",
    "conditioning",
    "draw",
    "encode",
    "objective",
    "read",
    "score",
    "to_rgb",
]
