"""The forward each patched attention module runs while T-GATE is on, for every kind of attention.

It is installed as an object patch on the module's `forward`, chaining to whatever forward was
there. All decisions are made outside the model (see run.py): for one model call the module finds
in its CallSlot a ModelCall, with a table of outputs to return instead of computing and the kinds
whose outputs to keep. The table is a plain dict keyed by layer, and the rest plain constants, so a
torch.compile'd model sees one fixed variant per kind of step and never reads per-run state such
as cond uuids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .families import CROSS
from .store import ChunkReduction, occurrence_key, reduce_chunks

# Where a replaced cross-attention layer's outputs are kept: this prefix, then the block and the
# transformer index ComfyUI hands the replacement (`input.1.0`). Never a module path.
REPLACED_CROSS = "patches_replace.attn2."


class ModelCall(NamedTuple):
    reuse: dict[str, torch.Tensor]  # {layer: output to return}; layers not in it compute
    capture_kinds: frozenset[str]  # the kinds whose outputs are kept
    reduction: ChunkReduction | None  # how a kept output is reduced; None when nothing is kept
    captured: dict[str, torch.Tensor]  # filled during the call: {layer: reduced output}
    # Filled during the call: {layer: times its module ran}. A module that runs several times in one
    # model call (VACE runs each vace block once per control) keeps and reuses one entry per run,
    # keyed by occurrence_key.
    calls: dict[str, int]
    # Filled during the call: the layers whose kept output did not fit (another shape: a patch such as
    # Deep Shrink resized the layer since the capture). They computed; the run then recaptures.
    misfits: list[str]
    # Joint-attention families (text_stream.py): whether every module that makes what the image reads
    # of the text returns its kept rows in this call, so the text stream's other modules need not run;
    # and, filled during the call, the number of text rows the text modules saw.
    text_frozen: bool = False
    text_rows: list[int] | None = None


class CallSlot:
    """The one carrier of run state, shared by the wrappers and the patched forwards of one node
    application: `run`, the sampling run in progress (set by OUTER_SAMPLE), and `call`, the ModelCall
    of the model call in progress (set by APPLY_MODEL for the duration of the call). The forwards
    hold the slot, so nothing travels through the model: families whose attention ComfyUI calls
    without `transformer_options` (PixArt: `PixArtMS.forward` drops it, and its blocks call
    `cross_attn(x, y, mask)`) are served as the others are. Under torch.compile the slot is an
    object the compiled function closes over: dynamo reads `call` through it, guards on its layout
    and takes its tensors as graph inputs.

    Clones of the patched model share it (ComfyUI deep-copies their options): copying it would cut
    the link with the forwards, so a copy is the slot itself."""

    def __init__(self) -> None:
        self.run: Any = None  # the GateRun in progress (run.py)
        self.call: ModelCall | None = None

    def __deepcopy__(self, memo: dict) -> CallSlot:
        return self

    def __copy__(self) -> CallSlot:
        return self


def gated_attention(
    layer: str, kind: str, forward: Callable[..., torch.Tensor], slot: CallSlot, tuple_output: int = 0
) -> Callable[..., torch.Tensor]:
    """Wrap an attention `forward` of `kind` for T-GATE; its ModelCall comes from `slot`.
    `tuple_output`: 0 where `forward` returns its output, n where it returns an n-tuple (output, None, ...)."""
    forward = getattr(forward, "tgate_original", forward)  # never wrap our own wrapper twice

    def tgate_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        call = slot.call
        if call is None:
            return forward(*args, **kwargs)
        key, reused = _reusable(call, layer, _query(args, kwargs))
        if reused is not None:
            # No projections, no attention.
            return (reused,) + (None,) * (tuple_output - 1) if tuple_output else reused
        out = forward(*args, **kwargs)
        if kind in call.capture_kinds:
            kept = out
            if tuple_output:
                if any(o is not None for o in out[1:]):
                    return out  # it returned more than its output: never replaced, so nothing kept
                kept = out[0]
            # Reduced here, layer by layer, so the full batched outputs are not all kept alive.
            call.captured[key] = reduce_chunks(kept, call.reduction)
        return out

    tgate_forward.tgate_original = forward
    return tgate_forward


def gated_replacement(
    replacement: Callable[..., torch.Tensor], slot: CallSlot, made: dict[int, tuple[Callable, Callable]]
) -> Callable[..., torch.Tensor]:
    """Wrap an attn2 replace patch (`patches_replace["attn2"]`, IPAdapter-style) for T-GATE: a
    replaced cross-attention layer is cross-attention. ComfyUI's BasicTransformerBlock calls
    `replacement(q, k, v, extra_options)` between `attn2.to_q/to_k/to_v` and `attn2.to_out`
    instead of `attn2.forward`; its output (before `to_out`) is captured and reused as a patched
    layer's is, under REPLACED_CROSS + the block it serves. `to_out` being linear, the mean of the
    replacement's outputs passed through it is the mean of the layer's outputs.
    `made`: {id(replacement): (replacement, wrapper)}, the wrappers made so far (one run's), so each
    replacement gets one wrapper and a compiled model sees the same function at every call."""
    known = made.get(id(replacement))
    if known is not None and known[0] is replacement:
        return known[1]

    def tgate_attn2_replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        call = slot.call
        if call is None:
            return replacement(q, k, v, extra_options)
        block = extra_options.get("block") or ()
        layer = REPLACED_CROSS + ".".join(str(part) for part in (*block, extra_options.get("block_index", 0)))
        key, reused = _reusable(call, layer, q)
        if reused is not None:
            return reused  # the replacement does not run
        out = replacement(q, k, v, extra_options)
        if CROSS in call.capture_kinds:
            call.captured[key] = reduce_chunks(out, call.reduction)
        return out

    tgate_attn2_replace.tgate_original = replacement
    made[id(replacement)] = (replacement, tgate_attn2_replace)
    return tgate_attn2_replace


def _reusable(call: ModelCall, layer: str, query: torch.Tensor) -> tuple[str, torch.Tensor | None]:
    """The key this run of `layer` is kept under in `call`, and the output to return instead of
    computing, if any. An attention output has its query's shape: a kept output of another shape
    does not fit, and the layer computes (the run sees the misfit and recaptures)."""
    key = next_occurrence(call, layer)
    reused = call.reuse.get(key)
    if reused is None:
        return key, None
    if reused.shape != query.shape:
        call.misfits.append(key)
        return key, None
    return key, reused


def next_occurrence(call: ModelCall, layer: str) -> str:
    """The key this run of `layer` is kept under in `call`: its first run in the call under the layer,
    later ones under store.occurrence_key (VACE's blocks run once per control)."""
    n = call.calls.get(layer, 0)
    call.calls[layer] = n + 1
    return occurrence_key(layer, n)


def _query(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
