"""The forward that each cross-attention module runs while T-GATE is on.

It is installed as an object patch on the module's `forward`, chaining to whatever forward was
there, and reads the evaluation's gate pass from `transformer_options`. Without one (outside a
T-GATE run, or in extra model calls made by PAG, SAG and the like) it only calls through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .cache import CrossAttentionCache
from .schedule import Stage

PASS_KEY = "tgate_pass"  # transformer_options key of the current evaluation's GatePass


@dataclass(frozen=True)
class GatePass:
    """What cross-attention does during one model evaluation: capture, or replay from cache."""

    stage: Stage
    cache: CrossAttentionCache


def cached_cross_attention(layer: str, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a cross-attention `forward(x, ..., transformer_options=...)` for T-GATE."""
    forward = getattr(forward, "tgate_original", forward)  # never wrap our own wrapper twice

    def tgate_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options")
        gate = options.get(PASS_KEY) if options else None
        if gate is None:
            return forward(x, *args, **kwargs)
        if gate.stage is Stage.FIDELITY:
            cached = gate.cache.lookup(layer, options["uuids"], x)
            if cached is not None:
                return cached  # no projections, no attention
            return forward(x, *args, **kwargs)
        out = forward(x, *args, **kwargs)
        if gate.stage is Stage.CAPTURE:
            gate.cache.capture(layer, out, options["cond_or_uncond"], options["uuids"])
        return out

    tgate_forward.tgate_original = forward
    tgate_forward.tgate_layer = layer
    return tgate_forward
