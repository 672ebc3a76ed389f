"""The forward that each cross-attention module runs while T-GATE is on.

It is installed as an object patch on the module's `forward`, chaining to whatever forward was
there. All decisions are made outside the model (see `run.py`); for one model call the module only
finds, in `transformer_options`, either a table of outputs to return instead of computing, or a
table to put its reduced output in. Both are plain dicts keyed by layer name, so a torch.compile'd model
sees one fixed variant per stage and never reads per-run state such as cond uuids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .cache import reduce_chunks

REPLAY_KEY = "tgate_replay"  # transformer_options key: {layer: cached output} for this model call
CAPTURE_KEY = "tgate_capture"  # transformer_options key: {layer: reduced output}, filled during the call
CAPTURE_PLAN_KEY = "tgate_capture_plan"  # transformer_options key: the call's ChunkPlan


def cached_cross_attention(layer: str, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a cross-attention `forward(x, ..., transformer_options=...)` for T-GATE."""
    forward = getattr(forward, "tgate_original", forward)  # never wrap our own wrapper twice

    def tgate_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options")
        if not options:
            return forward(x, *args, **kwargs)
        replay = options.get(REPLAY_KEY)
        if replay is not None:
            cached = replay.get(layer)
            if cached is not None and cached.shape == x.shape:
                return cached  # no projections, no attention
        out = forward(x, *args, **kwargs)
        capture = options.get(CAPTURE_KEY)
        if capture is not None:
            # Reduced here, layer by layer, so the full batched outputs are not all kept alive.
            capture[layer] = reduce_chunks(out, options[CAPTURE_PLAN_KEY])
        return out

    tgate_forward.tgate_original = forward
    tgate_forward.tgate_layer = layer
    return tgate_forward
