"""A one-file ComfyUI custom node (no nodes) that lets the tiny text encoders of tgate_testkit.model_files
load through ComfyUI's own loaders.

ComfyUI builds T5-XXL, UMT5-XXL and CLIP-G from fixed json configurations (billions of weights), and
detects them from the file's keys. The tiny files keep the keys and the widths detection and the
diffusion models read (T5's 4096-wide model, 24 blocks; CLIP-G's 1280) and carry, as the tensor
"tgate_tiny.model_options" (utf-8 json), the configuration override ComfyUI's SDClipModel itself
takes from model_options ("<model_name>_model_config": fewer layers, thinner feed-forward, a small
vocabulary for UMT5 whose tokenizer the file carries). This module passes that override to
comfy.sd.load_text_encoder_state_dicts (CLIPLoader) and comfy.sd.load_state_dict_guess_config
(CheckpointLoaderSimple); files without the tensor load exactly as before.

Self-contained on purpose: tgate_bench.examples copies this file into a ComfyUI base directory's
custom_nodes folder.
"""

import functools
import json

MARKER = "tgate_tiny.model_options"
NODE_CLASS_MAPPINGS = {}


def _options(sd):
    value = sd.pop(MARKER, None)
    return {} if value is None else json.loads(bytes(value.tolist()).decode("utf-8"))


def _merge(options, extra):
    merged = dict(options or {})
    for key, value in extra.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def install():
    import comfy.sd

    if getattr(comfy.sd, "_tgate_tiny_options", False):
        return
    load_te, load_ckpt = comfy.sd.load_text_encoder_state_dicts, comfy.sd.load_state_dict_guess_config

    @functools.wraps(load_te)
    def load_text_encoder_state_dicts(
        state_dicts=[], embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={}
    ):  # noqa: B006,E501
        extra = {}
        for sd in state_dicts:
            extra = _merge(extra, _options(sd))
        return load_te(
            state_dicts, embedding_directory=embedding_directory, clip_type=clip_type, model_options=_merge(model_options, extra)
        )  # noqa: E501

    @functools.wraps(load_ckpt)
    def load_state_dict_guess_config(sd, *args, te_model_options={}, **kwargs):  # noqa: B006
        return load_ckpt(sd, *args, te_model_options=_merge(te_model_options, _options(sd)), **kwargs)

    comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts
    comfy.sd.load_state_dict_guess_config = load_state_dict_guess_config
    comfy.sd._tgate_tiny_options = True


try:  # as a custom node, ComfyUI is importable; imported for MARKER alone, it may not be
    install()
except ModuleNotFoundError:
    pass
