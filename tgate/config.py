"""The T-GATE node's settings, checked once when the node runs."""

from __future__ import annotations

from dataclasses import dataclass

from .branch import FidelityBranch

CACHE_DEVICES = ("model_device", "cpu")


@dataclass(frozen=True)
class TGateConfig:
    gate_at: float = 0.4
    fidelity_branch: FidelityBranch = FidelityBranch.UNCOND
    cache_device: str = "model_device"

    def __post_init__(self) -> None:
        if not 0.0 <= self.gate_at <= 1.0:
            raise ValueError(f"T-GATE gate_at must be between 0.0 and 1.0, got {self.gate_at}; 1.0 turns gating off.")
        if self.cache_device not in CACHE_DEVICES:
            raise ValueError(f"T-GATE cache_device must be one of {CACHE_DEVICES}, got {self.cache_device!r}.")
        try:
            branch = FidelityBranch(self.fidelity_branch)
        except ValueError:
            choices = tuple(b.value for b in FidelityBranch)
            raise ValueError(f"T-GATE fidelity_branch must be one of {choices}, got {self.fidelity_branch!r}.") from None
        object.__setattr__(self, "fidelity_branch", branch)
