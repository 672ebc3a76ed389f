"""What a model really computes, seen from outside with torch hooks and a torch function mode:
model calls and their batch, attention calls and projections, attention outputs, host-device syncs.
"""

from __future__ import annotations

import contextlib

from torch.overrides import TorchFunctionMode


class ModelCalls:
    """Per diffusion-model call, recorded with torch hooks: the batch, the chunk layout ComfyUI gave
    it (`cond_or_uncond`), the sigma it evaluates (`sigma`, a one-element tensor; the run's step
    sigmas land in `sample_sigmas`), how many cross- and self-attention modules ran and how many
    of their query projections ran (`cross_q`, `self_q`), and on request clones of every
    cross-attention output (`out`, by module name) and of part of the model's input
    (`keep_input(x)`).

    Module names are matched by suffix: `cross` and `self_attention` are the family's attention
    module names (SD's "attn2"/"attn1"; a tuple for several), `cross_q`/`self_q` the name of their
    query projection. ComfyUI skips `attn2.forward` where an attn2 replace patch applies but still
    runs `attn2.to_q` (see its BasicTransformerBlock): `cross_calls` and `cross_q` then differ.
    """

    def __init__(self, cross="attn2", self_attention="attn1", cross_q="to_q", self_q="to_q", outputs=False, keep_input=None):
        self.cross, self.self_attention, self.cross_q, self.self_q = cross, self_attention, cross_q, self_q
        self.outputs, self.keep_input = outputs, keep_input
        self.calls: list[dict] = []
        self.sample_sigmas = None

    @contextlib.contextmanager
    def watch(self, patcher):
        diffusion_model = patcher.model.diffusion_model
        handles = [diffusion_model.register_forward_pre_hook(self._call, with_kwargs=True)]
        for name, module in diffusion_model.named_modules():
            if name.endswith(self.cross):
                handles.append(module.register_forward_pre_hook(self._count("cross_calls")))
                handles.append(getattr(module, self.cross_q).register_forward_pre_hook(self._count("cross_q")))
                if self.outputs:
                    handles.append(module.register_forward_hook(self._output(name)))
            elif name.endswith(self.self_attention):
                handles.append(getattr(module, self.self_q).register_forward_pre_hook(self._count("self_q")))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _call(self, module, args, kwargs):
        options = kwargs.get("transformer_options") or {}
        layout = options.get("cond_or_uncond")
        call = {"batch": args[0].shape[0], "layout": list(layout or ()), "cross_calls": 0, "cross_q": 0, "self_q": 0, "out": {}}
        if options.get("sigmas") is not None:  # the evaluation's sigma, kept as a tensor: reading it would sync
            call["sigma"] = options["sigmas"].detach().reshape(-1)[:1].clone()
        if options.get("sample_sigmas") is not None:  # the run's own steps, as the sampler was given them
            self.sample_sigmas = options["sample_sigmas"]
        if self.keep_input is not None:
            call["input"] = self.keep_input(args[0]).detach().clone()
        self.calls.append(call)

    def _count(self, key):
        def hook(module, args):
            if self.calls:  # a module run outside a model call (none in ComfyUI) is not counted
                self.calls[-1][key] += 1

        return hook

    def _output(self, name):
        def hook(module, args, output):
            self.calls[-1]["out"][name] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    def column(self, key) -> list:
        """One value per model call."""
        return [c[key] for c in self.calls]

    def outputs_of(self, name) -> list:
        """Every recorded output of cross-attention module `name`, in call order."""
        return [c["out"][name] for c in self.calls if name in c["out"]]

    def sigmas(self) -> list[float]:
        """The sigma of every call, read back once the run is over."""
        return [float(c["sigma"]) for c in self.calls]

    @property
    def batch_sizes(self) -> list[int]:
        return self.column("batch")

    @property
    def to_q_calls(self) -> int:
        return sum(self.column("cross_q"))

    @property
    def attn2_calls(self) -> int:
        return sum(self.column("cross_calls"))


SYNCING_OPS = {"item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy"}


class SyncCounter(TorchFunctionMode):
    """Counts tensor operations that make the host wait for the device, and where they happen."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.in_attention = 0
        self._depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING_OPS:
            self.total += 1
            if self._depth:
                self.in_attention += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def around_attention(self, patcher, suffixes=("attn2",)):
        handles = []
        for name, module in patcher.model.diffusion_model.named_modules():
            if name.endswith(suffixes):
                handles.append(module.register_forward_pre_hook(lambda m, a: self._enter()))
                handles.append(module.register_forward_hook(lambda m, a, o: self._leave()))
        try:
            with self:
                yield self
        finally:
            for h in handles:
                h.remove()

    def _enter(self):
        self._depth += 1

    def _leave(self):
        self._depth -= 1
