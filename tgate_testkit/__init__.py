"""Support shared by the tests and the benchmark: finding and loading ComfyUI, random-weight models
of every family built from ComfyUI's own classes (and model files its loaders accept), hook
recorders and the run log. Unlike the engine in `tgate/`, this package imports ComfyUI, after
`comfy_env.import_comfyui`.
"""
