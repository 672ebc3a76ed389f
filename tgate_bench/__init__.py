"""Benchmark and test support: real ComfyUI, random-weight models from ComfyUI's own classes.

Unlike the engine in `tgate/`, this package imports ComfyUI (after `comfy_env.import_comfyui`).
"""
