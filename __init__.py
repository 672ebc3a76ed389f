"""ComfyUI-TGATE: T-GATE (cached cross-attention, one CFG branch after the gate) for ComfyUI."""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
