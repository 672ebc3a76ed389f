"""Input types the T-GATE nodes share."""

from __future__ import annotations

from comfy_api.latest import io


class ValidatedCombo(io.Combo.Input):
    """A combo ComfyUI checks itself when a prompt is queued, input by input, as it checks KSampler's
    sampler_name: in ComfyUI 0.3.64 the options of V3 "COMBO" inputs are not checked, and a node's
    own validate_inputs message is reported against every input it reads. Typed by its options, as
    ComfyUI's own V3 Combo.Output is."""

    def get_io_type(self):
        return self.options
