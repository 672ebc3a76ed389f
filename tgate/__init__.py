"""The T-GATE engine: model families, the per-step plan, what a run keeps, and the ComfyUI
wrapper functions that carry the plan out.

Nothing here imports ComfyUI; `nodes.py` connects it to a ComfyUI MODEL.
"""

from .branch import COND, UNCOND, FidelityBranch, fidelity_index, only_lists, stand_ins
from .config import CACHE_DEVICES, DeepCache, SelfAttentionReuse, TGateConfig
from .deep import DeepCacheError, DeepLayout, deep_block_child, deep_layout
from .evaluation import Evaluation
from .families import (
    CROSS,
    DEEP,
    FAMILIES,
    KINDS,
    REFUSED,
    SELF,
    Family,
    TextRole,
    TextStream,
    UnsupportedModelError,
    attention_layers,
    family_of,
    output_width,
    supported_families,
    text_roles,
)
from .forward import CallSlot, ModelCall, gated_attention
from .plan import Action, Kept, StepPlan, plan_step, plan_steps
from .run import (
    CONFIG_KEY,
    GatePatch,
    GateRun,
    apply_model_with_gate,
    calc_cond_batch_with_gate,
    guided_by_stand_in,
    sample_with_gate,
)
from .schedule import GateSchedule, active_conds
from .stats import RunCounts, RunStats, add_run_listener, remove_run_listener
from .store import AttentionStore, ChunkReduction, reduce_chunks
from .text_stream import call_text_rows, gated_text_module

__all__ = [
    "CACHE_DEVICES",
    "COND",
    "CONFIG_KEY",
    "CROSS",
    "DEEP",
    "FAMILIES",
    "KINDS",
    "REFUSED",
    "SELF",
    "UNCOND",
    "Action",
    "AttentionStore",
    "CallSlot",
    "ChunkReduction",
    "DeepCache",
    "DeepCacheError",
    "DeepLayout",
    "Evaluation",
    "Family",
    "FidelityBranch",
    "GatePatch",
    "GateRun",
    "GateSchedule",
    "active_conds",
    "Kept",
    "ModelCall",
    "RunCounts",
    "RunStats",
    "SelfAttentionReuse",
    "StepPlan",
    "TGateConfig",
    "TextRole",
    "TextStream",
    "UnsupportedModelError",
    "add_run_listener",
    "apply_model_with_gate",
    "attention_layers",
    "calc_cond_batch_with_gate",
    "call_text_rows",
    "deep_block_child",
    "deep_layout",
    "family_of",
    "gated_attention",
    "gated_text_module",
    "output_width",
    "text_roles",
    "fidelity_index",
    "only_lists",
    "stand_ins",
    "plan_step",
    "plan_steps",
    "reduce_chunks",
    "remove_run_listener",
    "guided_by_stand_in",
    "sample_with_gate",
    "supported_families",
]
