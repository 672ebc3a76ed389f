"""The nodes' settings, checked once when a node runs."""

from __future__ import annotations

from dataclasses import dataclass

from .branch import FidelityBranch

CACHE_DEVICES = ("model_device", "cpu")


@dataclass(frozen=True)
class SelfAttentionReuse:
    """TGATE-V2's self-attention schedule, named as in the paper and the official code."""

    warm_up: int = 2  # steps computed in full before self-attention is first cached
    sp_interval: int = 5  # before the gate (semantics planning): recompute self-attention every this many steps
    fi_interval: int = 1  # after the gate (fidelity improving): recompute self-attention every this many steps

    def __post_init__(self) -> None:
        if self.warm_up < 0:
            raise ValueError(f"T-GATE warm_up must be 0 or more, got {self.warm_up}.")
        for name in ("sp_interval", "fi_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"T-GATE {name} must be 1 or more, got {getattr(self, name)}; 1 recomputes every step.")


@dataclass(frozen=True)
class DeepCache:
    """DeepCache's schedule (Ma et al.; horseee/DeepCache `DeepCacheSDHelper`), named by what it sets
    in ComfyUI's UNet; the official parameters are `cache_interval` and `cache_branch_id`."""

    interval: int = 3  # refresh the deep blocks every this many steps (official cache_interval); 1: never reuse
    branch: int = 0  # input_blocks[0..branch] and output_blocks[-(branch+1):] run every step (official cache_branch_id)

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(
                f"T-GATE deepcache_interval must be 1 or more, got {self.interval}; 1 turns DeepCache off, 3 is official."
            )
        if self.branch < 0:
            raise ValueError(f"T-GATE deepcache_branch must be 0 or more, got {self.branch}; 0 is official.")


@dataclass(frozen=True)
class TGateConfig:
    gate_at: float = 0.4
    fidelity_branch: FidelityBranch = FidelityBranch.AUTO
    cache_device: str = "model_device"
    self_attention: SelfAttentionReuse | None = None  # None: cross-attention only (T-GATE V1)
    deep_cache: DeepCache | None = None  # None: every block runs at every step (deepcache_interval 1)

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

    def describe(self) -> str:
        """The settings as a user set them, for logs."""
        text = f"gate_at {self.gate_at:g}, fidelity_branch {self.fidelity_branch.value}, cache_device {self.cache_device}"
        if self.self_attention is not None:
            s = self.self_attention
            text += f", warm_up {s.warm_up}, sp_interval {s.sp_interval}, fi_interval {s.fi_interval}"
        if self.deep_cache is not None:
            text += f", deepcache_interval {self.deep_cache.interval}, deepcache_branch {self.deep_cache.branch}"
        return text
