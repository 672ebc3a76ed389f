"""The T-GATE engine: schedule, cache, branch choice and the ComfyUI wrapper functions.

Nothing here imports ComfyUI; `nodes.py` connects it to a ComfyUI MODEL.
"""

from .attention import PASS_KEY, GatePass, cached_cross_attention
from .branch import COND, UNCOND, FidelityBranch, kept_branch, only_branch
from .cache import CrossAttentionCache
from .layers import NoCrossAttentionError, cross_attention_layers, require_cross_attention
from .run import CONFIG_KEY, RUN_KEY, GateRun, TGateConfig, calc_cond_batch_with_gate, sample_with_gate
from .schedule import GateSchedule, Stage

__all__ = [
    "CONFIG_KEY",
    "COND",
    "PASS_KEY",
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
    "cached_cross_attention",
    "calc_cond_batch_with_gate",
    "cross_attention_layers",
    "kept_branch",
    "only_branch",
    "require_cross_attention",
    "sample_with_gate",
]
