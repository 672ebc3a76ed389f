"""The text rows' share of one joint-attention model call's FLOPs, counted by
torch.utils.flop_counter.FlopCounterMode and attributed per module.

    python -m tgate_bench.text_share --arch flux-dev --size 256 1024 --threads 1

One model call (batch 1, one branch) of a joint-attention family (Flux, Chroma, Qwen-Image, SD3, Lumina 2,
HiDream, AuraFlow, Mochi) at each
size. The counter counts matrix products (linear layers and attention); each linear layer's FLOPs
are read from the counter around its own call, and attribute to the text by the module's path:
- text-only modules (the text stream's rows: Flux's `txt_in` and double blocks' `txt_*`, Qwen-Image's
  `txt_in` and `txt_*`, `attn.add_*_proj`, `attn.to_add_out`): all of their FLOPs;
- joined modules over [text; image] rows (Flux's single blocks' `linear1`, `linear2`): the text rows'
  part, text / (text + image) rows of them;
- the joint attention (the call's FLOPs outside every linear layer): the text queries' part, the same
  fraction.
`skipped_share` is the part the pack's T-GATE skips after the gate: the modules of its text stream
(tgate/families.py, TextStream) in full, or their text rows where joined; the text queries' attention
and the small text-only modules outside it (Flux's txt_in, modulation) stay computed.

FLOPs do not depend on the weights' values, so by default the model is built and counted on PyTorch's
"meta" device (shapes only: no arithmetic, no memory), which takes seconds at 1024² too; --device cpu
runs the call for real, with ComfyUI's CPU attention (the tests check both count the same).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

# model_config class name (or a base's) -> module paths under `diffusion_model` whose rows are all text
# (outermost modules only: a module's FLOPs include those of the modules it calls).
TEXT_ONLY = {
    "Flux": r"txt_in|double_blocks\.\d+\.txt_(?:mod|norm1|attn\.qkv|attn\.norm|attn\.proj|norm2|mlp)",
    "Chroma": r"txt_in|double_blocks\.\d+\.txt_(?:norm1|attn\.qkv|attn\.norm|attn\.proj|norm2|mlp)",
    "QwenImage": r"txt_norm|txt_in|transformer_blocks\.\d+\.(?:txt_mod|txt_norm1|txt_norm2|txt_mlp"
    r"|attn\.add_[qkv]_proj|attn\.norm_added_[qk]|attn\.to_add_out)",
    "SD3": r"context_embedder|joint_blocks\.\d+\.context_block",
    "Lumina2": r"cap_embedder|context_refiner\.\d+",
    "HiDream": r"caption_projection\.\d+|double_stream_blocks\.\d+\.block\.(?:attn1\.to_(?:[qkv]_t|out_t)|ff_t)",
    "AuraFlow": r"cond_seq_linear|double_layers\.\d+\.(?:modC|attn\.w1[qkvo]|mlpC)",
    "GenmoMochi": r"t5_y_embedder|t5_yproj|blocks\.\d+\.(?:mod_y|attn\.qkv_y|attn\.proj_y|mlp_y)",
}
JOINED = {
    "Flux": r"single_blocks\.\d+\.linear[12]",
    "Chroma": r"single_blocks\.\d+\.linear[12]",
    "QwenImage": r"(?!)",
    "SD3": r"(?!)",
    "Lumina2": r"layers\.\d+\.(?:attention\.qkv|attention\.out|feed_forward)",
    "HiDream": r"single_stream_blocks\.\d+\.block\.(?:attn1\.to_(?:[qkv]|out)|ff_i)",
    "AuraFlow": r"single_layers\.\d+\.(?:attn\.w1[qkvo]|mlp)",
    "GenmoMochi": r"(?!)",
}

# Families whose FLOPs depend on the values, not the shapes alone, so the meta device cannot count them:
# model_config class name -> why.
VALUE_ROUTED = {"HiDream": "its mixture of experts routes each row by its value"}


def _family_key(model_config) -> str:
    names = [c.__name__ for c in type(model_config).__mro__]
    key = next((n for n in names if n in TEXT_ONLY), None)
    if key is None:
        raise SystemExit(f"text share: {type(model_config).__name__} is no joint-attention family ({', '.join(TEXT_ONLY)})")
    return key


def model_call(patcher, arch, size: int, device: str | torch.device = "cpu"):
    """The model's inputs for one call of batch 1 at `size` pixels, as ComfyUI's sampler makes them
    (BaseModel.extra_conds of the family's conditioning), on `device`, and the text and image row counts."""
    from tgate_testkit.models import random_cond

    model = patcher.model
    context, options = random_cond(arch, 1, 1, size)[0]
    noise = torch.randn(arch.latent_shape(1, size))
    params = {"width": size, "height": size, **options, "cross_attn": context, "noise": noise, "device": torch.device("cpu")}
    conds = model.extra_conds(**params)
    # Tensors to the device; constants (Lumina 2's num_tokens) as they are.
    kwargs = {k: v.cond.to(device) if isinstance(v.cond, torch.Tensor) else v.cond for k, v in conds.items()}
    patch = model.diffusion_model.patch_size
    frames = noise.shape[2] if noise.dim() == 5 else 1  # a video's latent frames (Mochi)
    image_rows = frames * (noise.shape[-1] // patch) * (noise.shape[-2] // patch)
    # HiDream's blocks carry, after T5's tokens, the text stream's Llama layer and the block's own;
    # AuraFlow's text stream starts with its register tokens.
    registers = getattr(model.diffusion_model, "register_tokens", None)
    text_rows = (
        arch.context_tokens + (2 * arch.llama[1] if arch.llama else 0) + (registers.shape[1] if registers is not None else 0)
    )
    return (noise.to(device), torch.tensor([0.5], device=device), kwargs), text_rows, image_rows


def _plain_attention(device) -> dict:
    """transformer_options for the call: on "meta", attention as plain matrix products (ComfyUI's CPU
    backend asks for the free memory, which a meta device has not; the counter counts no CPU SDPA)."""
    if device == "cpu":
        return {}
    from comfy.ldm.modules import attention

    return {"optimized_attention_override": lambda func, *args, **kwargs: attention.attention_basic(*args, **kwargs)}


def text_share(patcher, arch, size: int, device: str = "meta") -> dict:
    """FLOPs of one model call at `size` and the text rows' part of them (see the module's docstring).
    On "meta" the model is moved there (its weights are lost): build one for it (build_model(..., device="meta"))."""
    from torch.utils.flop_counter import FlopCounterMode

    from tgate import families

    model = patcher.model
    if device != "cpu":
        model.to(device)
    key = _family_key(model.model_config)
    if device == "meta" and key in VALUE_ROUTED:
        raise SystemExit(f"text share: {key}'s FLOPs depend on its values ({VALUE_ROUTED[key]}): count it with --device cpu")
    stream = families.family_of(model.model_config).text_stream
    (x, sigma, kwargs), text_rows, image_rows = model_call(patcher, arch, size, device)
    fraction = text_rows / (text_rows + image_rows)
    counter = FlopCounterMode(display=False)
    linears, hooks = {}, []

    def watch(name):
        def before(module, args):
            linears[name] = -counter.get_total_flops()

        def after(module, args, output):
            linears[name] += counter.get_total_flops()

        return before, after

    for name, module in model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            before, after = watch(name)
            hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad(), counter:
            model.apply_model(x, sigma, transformer_options=_plain_attention(device), **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    total = counter.get_total_flops()
    modules = dict(model.diffusion_model.named_modules())

    def under(pattern, name):  # the linear layer is the module or inside it
        return any(re.fullmatch(pattern, name[:i]) for i in range(len(name), 0, -1) if i == len(name) or name[i] == ".")

    def skipped(name):
        for prefix in [name[:i] for i in range(len(name), 0, -1) if i == len(name) or name[i] == "."]:
            role = stream.role(prefix, modules[prefix])
            if role is not None:
                return 1.0 if role in (families.TextRole.READ, families.TextRole.UNREAD) else fraction
        return 0.0

    text_only = sum(f for n, f in linears.items() if under(TEXT_ONLY[key], n))
    joined = sum(f for n, f in linears.items() if under(JOINED[key], n))
    attention = total - sum(linears.values())
    parts = {"text_only": text_only, "joined_text_rows": fraction * joined, "text_queries": fraction * attention}
    return {
        "size": size,
        "text_rows": text_rows,
        "image_rows": image_rows,
        "total_flops": total,
        "attention_flops": attention,
        "text_share": sum(parts.values()) / total,
        "parts": {k: v / total for k, v in parts.items()},
        "skipped_share": sum(f * skipped(n) for n, f in linears.items()) / total,
        "device": device,
    }


def format_share(name: str, r: dict) -> str:
    parts = ", ".join(f"{k.replace('_', ' ')} {100 * v:.1f} %" for k, v in r["parts"].items())
    return (
        f"{name} {r['size']}x{r['size']}: {r['text_rows']} text + {r['image_rows']} image rows, "
        f"{r['total_flops'] / 1e12:.3f} TFLOP per call; text rows {100 * r['text_share']:.1f} % ({parts}); "
        f"T-GATE skips {100 * r['skipped_share']:.1f} %"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tgate_bench.text_share", description=__doc__)
    p.add_argument("--comfyui")
    p.add_argument("--arch", required=True)
    p.add_argument("--size", type=int, nargs="+", default=[256])
    p.add_argument("--device", choices=["meta", "cpu"], default="meta")
    p.add_argument("--full-depth", action="store_true", help="count the real checkpoint's blocks (the architecture's full_depth)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tgate_testkit.comfy_env import comfyui_or_exit, import_comfyui
    from tgate_testkit.models import ARCHITECTURES, build_model

    comfy_path = comfyui_or_exit(args.comfyui)
    import_comfyui(comfy_path)
    arch = ARCHITECTURES[args.arch]
    unet = dict(arch.unet, **dict(arch.full_depth)) if args.full_depth else None
    name = f"{args.arch} ({', '.join(f'{k} {v}' for k, v in arch.full_depth)})" if args.full_depth else args.arch
    results = []
    for size in args.size:
        results.append(text_share(build_model(arch, device=args.device, unet=unet), arch, size, args.device))
        print(format_share(name, results[-1]), flush=True)
    if args.json:
        command = " ".join(["python -m tgate_bench.text_share", *(sys.argv[1:] if argv is None else argv)])
        args.json.write_text(json.dumps({"arch": name, "command": command, "shares": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
