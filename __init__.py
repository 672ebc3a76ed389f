"""ComfyUI-TGATE: T-GATE (cached cross-attention, one CFG branch after the gate) for ComfyUI.

ComfyUI calls `comfy_entrypoint` (the V3 extension API). The node module is imported there, not
at package import, so the engine and its tests import without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import TGateExtension

    return TGateExtension()


__all__ = ["comfy_entrypoint"]
