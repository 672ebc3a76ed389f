"""ComfyUI-TGATE: T-GATE (cached cross-attention, one CFG branch after the gate) for ComfyUI.

ComfyUI calls `comfy_entrypoint` (the V3 extension API). The node module is imported there, not
at package import, so the engine and its tests import without ComfyUI.

WEB_DIRECTORY is served at /extensions/<this folder>/; ComfyUI's frontend reads each node's help
page from its docs/<node id>.md (web/docs/TGate.md...) for the node library's help panel.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import TGateExtension

    return TGateExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
