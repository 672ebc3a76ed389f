"""The T-GATE engine: schedule, cache, branch choice and the ComfyUI wrapper functions.

Nothing here imports ComfyUI; `nodes.py` connects it to a ComfyUI MODEL.
"""

from .attention import CAPTURE_KEY, REPLAY_KEY, cached_cross_attention
from .branch import COND, UNCOND, FidelityBranch, kept_branch, only_branch
from .cache import ChunkPlan, CrossAttentionCache, reduce_chunks
from .config import CACHE_DEVICES, TGateConfig
from .layers import NoCrossAttentionError, cross_attention_layers, require_cross_attention
from .run import (
    CONFIG_KEY,
    PASS_KEY,
    RUN_KEY,
    GatePass,
    GateRun,
    apply_model_with_gate,
    calc_cond_batch_with_gate,
    sample_with_gate,
)
from .schedule import GateSchedule, Stage

__all__ = [
    "CACHE_DEVICES",
    "CAPTURE_KEY",
    "ChunkPlan",
    "CONFIG_KEY",
    "COND",
    "PASS_KEY",
    "REPLAY_KEY",
    "RUN_KEY",
    "UNCOND",
    "CrossAttentionCache",
    "FidelityBranch",
    "GatePass",
    "GateRun",
    "GateSchedule",
    "NoCrossAttentionError",
    "Stage",
    "TGateConfig",
    "apply_model_with_gate",
    "cached_cross_attention",
    "calc_cond_batch_with_gate",
    "cross_attention_layers",
    "kept_branch",
    "only_branch",
    "reduce_chunks",
    "require_cross_attention",
    "sample_with_gate",
]
