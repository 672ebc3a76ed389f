"""DeepCache in a ComfyUI UNet: which modules a reuse step skips, and the forward they run.

ComfyUI's `UNetModel._forward` runs `input_blocks` (pushing each output for the skip connections),
`middle_block`, then each `output_blocks[i]` on `cat(h, skip)`; each block is a
TimestepEmbedSequential whose children (ResBlock, SpatialTransformer, Down/Upsample) ComfyUI's
`forward_timestep_embed` calls one by one, so the children are what gets patched, never the block.

With branch b, a reuse step runs `input_blocks[0..b]` and `output_blocks[-(b+1):]` and nothing in
between: the first skipped child (the first of `input_blocks[b+1]`) returns an empty tensor (no
channels, the batch and spatial size of its input), every later skipped child passes it on (the
skip connections and concatenations of empty tensors cost nothing), and the last child of
`output_blocks[-(b+2)]` returns the output kept at the last refresh. The UNet's own loop, its
block indices and its patches still run around them, so nothing of ComfyUI's forward is copied.
Whether a call skips is read from its ModelCall (forward.py): the kept output is in its reuse
table, under the key `DeepLayout.layer`, exactly when the run decided to skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .families import DEEP
from .forward import CallSlot
from .store import reduce_chunks


class DeepCacheError(ValueError):
    """DeepCache cannot be applied as set to this model."""


DeepCacheError.__module__ = "comfyui_tgate"  # as UnsupportedModelError (families.py)


@dataclass(frozen=True)
class DeepLayout:
    """Where one branch setting cuts one UNet."""

    branch: int
    input_blocks: int  # how many the UNet has (as many output blocks)
    skipped: tuple[str, ...]  # paths under diffusion_model of the children a reuse step skips, in call order
    layer: str  # the block whose output a refresh keeps and a reuse step returns: output_blocks[-(branch+2)]

    @property
    def first(self) -> str:
        return self.skipped[0]

    @property
    def last(self) -> str:
        return self.skipped[-1]

    def trim_control(self, control: Any) -> Any:
        """ControlNet-style residuals (`control`: {"input"|"middle"|"output": [tensor or None]}) for
        a call that skips the deep blocks: those of the skipped blocks are dropped (None), as their
        blocks do not run; the others, the lists copied (ComfyUI pops them), are left as they are.
        The UNet pops one per block from the end of each list: input block i pops element len-1-i,
        output block k element len-1-k."""
        if not isinstance(control, dict):
            return control
        trimmed = dict(control)
        b, n = self.branch, self.input_blocks
        if control.get("input"):
            values = list(control["input"])
            cut = max(0, len(values) - 1 - b)  # input blocks b+1.. pop these
            trimmed["input"] = [None] * cut + values[cut:]
        if control.get("middle"):
            trimmed["middle"] = [None] * len(control["middle"])
        if control.get("output"):
            values = list(control["output"])
            cut = max(0, len(values) - n + b + 1)  # output blocks ..n-b-2 pop those from here on
            trimmed["output"] = values[:cut] + [None] * (len(values) - cut)
        return trimmed


def deep_layout(diffusion_model: torch.nn.Module, branch: int) -> DeepLayout:
    """The layout of `branch` in a ComfyUI UNetModel, or a DeepCacheError naming the input and the
    branches this model has."""
    inputs = getattr(diffusion_model, "input_blocks", None)
    outputs = getattr(diffusion_model, "output_blocks", None)
    if inputs is None or outputs is None or len(inputs) != len(outputs) or len(inputs) < 2:
        raise DeepCacheError(
            f"DeepCache needs a UNet with as many input as output blocks; this {type(diffusion_model).__name__} "
            "has not. Set deepcache_interval to 1 (DeepCache off) for this model."
        )
    n = len(inputs)
    if branch > n - 2:
        raise DeepCacheError(
            f"deepcache_branch {branch} is past this UNet's blocks: it has {n} input blocks, so deepcache_branch "
            f"goes from 0 (fastest, official) to {n - 2}. Set it to 0."
        )
    skipped = [f"input_blocks.{i}.{j}" for i in range(branch + 1, n) for j in range(len(inputs[i]))]
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        skipped += [f"middle_block.{j}" for j in range(len(middle))]
    skipped += [f"output_blocks.{k}.{j}" for k in range(n - branch - 1) for j in range(len(outputs[k]))]
    return DeepLayout(branch, n, tuple(skipped), f"output_blocks.{n - branch - 2}")


def deep_block_child(path: str, layout: DeepLayout, forward: Callable[..., torch.Tensor], slot: CallSlot) -> Callable:
    """Wrap the `forward` of the skipped child at `path` (see the module's docstring)."""
    forward = getattr(forward, "tgate_original", forward)  # never wrap our own wrapper twice
    first, last, layer = path == layout.first, path == layout.last, layout.layer

    def tgate_deep_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        call = slot.call
        if call is None:
            return forward(x, *args, **kwargs)
        if x.shape[1] == 0:  # this call skips: an earlier child returned the empty tensor
            # A copy: the next output block's output_block_patch (FreeU) may scale it in place.
            return call.reuse[layer].clone() if last else x
        if first:
            kept = call.reuse.get(layer)
            # The kept output has the spatial size of this child's input (both meet input_blocks[b]'s
            # output at output_blocks[-(b+1)]); another size (a new resolution) computes instead.
            if kept is not None and kept.shape[0] == x.shape[0] and kept.shape[2:] == x.shape[2:]:
                return x[:, :0]
        out = forward(x, *args, **kwargs)
        if last and DEEP in call.capture_kinds:
            call.captured[layer] = reduce_chunks(out, call.reduction)
        return out

    tgate_deep_forward.tgate_original = forward
    return tgate_deep_forward
