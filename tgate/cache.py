"""The cross-attention outputs captured at the gate and replayed after it.

One entry per cross-attention layer and per conditioning chunk of the branch that keeps running
after the gate (ComfyUI identifies chunks by the uuid of their cond). Following the paper, an
entry is the mean of that chunk's output and the other branch's output of the same shape; a chunk
with no same-shaped partner (cfg 1.0: there is no other branch) keeps its own output.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import torch

ChunkId = Hashable


class ChunkPlan(NamedTuple):
    """Positions, in one batched model call, of the chunks of the branch kept after the gate and
    of the other branch's chunks. A tuple of ints, so a compiled model sees it as a constant."""

    n_chunks: int
    kept: tuple[int, ...]
    others: tuple[int, ...]


def reduce_chunks(output: torch.Tensor, plan: ChunkPlan) -> tuple[torch.Tensor, ...]:
    """What a capture keeps of one layer's batched output; runs inside the model.

    One tensor per kept chunk: the mean of the chunk and of the other branch's chunks (the paper's
    rule), averaged in float32 since fp16 sums of large activations overflow, stored in the output
    dtype; or the chunk itself where the call holds no other chunk. A call with no kept chunk
    gives the float32 sum of its chunks, to pair with kept chunks from other calls.
    """
    chunks = output.chunk(plan.n_chunks)
    other_sum = None
    for i in plan.others:
        other_sum = chunks[i].float() if other_sum is None else other_sum + chunks[i].float()
    if not plan.kept:
        return (other_sum,)
    if other_sum is None:
        return tuple(chunks[i] for i in plan.kept)
    other_mean = other_sum / len(plan.others)
    return tuple(((chunks[i].float() + other_mean) * 0.5).to(output.dtype) for i in plan.kept)


class CrossAttentionCache:
    """One run's captured cross-attention outputs: filled at the capture step, read after it."""

    def __init__(self, storage_device: torch.device | str | None = None):
        # None keeps entries where they were computed (the model's device).
        self.storage_device = torch.device(storage_device) if storage_device is not None else None
        self.keep_branch = 0
        self._entries: dict[str, dict[ChunkId, torch.Tensor]] = {}
        # Only used when ComfyUI runs the two branches in separate model calls (low memory):
        # the other branch's outputs are summed per layer and shape and mixed in at the end.
        self._unpaired: dict[tuple[str, torch.Size], list[ChunkId]] = {}
        self._other_sums: dict[tuple[str, torch.Size], tuple[torch.Tensor, int]] = {}
        self._tables: dict[tuple, dict[str, torch.Tensor]] = {}

    def begin_capture(self, keep_branch: int) -> None:
        """Start a capture; `keep_branch` is the index (0 cond, 1 uncond) that runs after it."""
        self.clear()
        self.keep_branch = keep_branch

    def plan(self, branches: Sequence[int]) -> ChunkPlan:
        """How a call whose chunks belong to `branches` (cond_or_uncond) is reduced at capture."""
        kept = tuple(i for i, b in enumerate(branches) if b == self.keep_branch)
        others = tuple(i for i, b in enumerate(branches) if b != self.keep_branch)
        return ChunkPlan(len(branches), kept, others)

    def store(self, layer: str, reduced: Sequence[torch.Tensor], plan: ChunkPlan, chunk_ids: Sequence[ChunkId]) -> None:
        """Keep what `reduce_chunks` gave for one layer of one model call.

        Everything is copied: what comes out of a compiled model may live in a CUDA graph's memory
        pool, which the next replay overwrites, and a view would keep a whole batch alive.
        """
        if not plan.kept:
            (other_sum,) = reduced
            key = (layer, other_sum.shape)
            total, count = self._other_sums.get(key, (None, 0))
            self._other_sums[key] = (other_sum.clone() if total is None else total + other_sum, count + len(plan.others))
            return
        layer_entries = self._entries.setdefault(layer, {})
        for position, tensor in zip(plan.kept, reduced, strict=True):
            chunk_id = chunk_ids[position]
            layer_entries[chunk_id] = tensor.clone()
            if not plan.others:
                self._unpaired.setdefault((layer, tensor.shape), []).append(chunk_id)

    def finish_capture(self) -> None:
        """Mix in partners seen in other model calls, then move entries to the storage device."""
        for key, chunk_ids in self._unpaired.items():
            partner = self._other_sums.get(key)
            if partner is None:
                continue
            total, count = partner
            entries = self._entries[key[0]]
            for chunk_id in chunk_ids:
                own = entries[chunk_id]
                entries[chunk_id] = ((own.float() + total / count) * 0.5).to(own.dtype)
        self._unpaired.clear()
        self._other_sums.clear()
        if self.storage_device is not None:
            for entries in self._entries.values():
                for chunk_id, tensor in entries.items():
                    entries[chunk_id] = _move(tensor, self.storage_device)

    def replay_table(self, chunk_ids: Sequence[ChunkId], device: torch.device) -> dict[str, torch.Tensor]:
        """{layer: stored output} for a model call made of `chunk_ids`, on `device`.

        Layers missing an entry for any of the chunks are left out (they compute normally). Tables
        are built once per chunk combination and reused for the rest of the run, so steps after
        the gate allocate nothing, except with CPU storage, where each call gets its own copies.
        """
        key = (tuple(chunk_ids), device)
        table = self._tables.get(key)
        if table is not None:
            return table
        table = {}
        for layer, entries in self._entries.items():
            parts = [entries.get(chunk_id) for chunk_id in chunk_ids]
            if not parts or any(p is None for p in parts):
                continue
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
            table[layer] = out.to(device, non_blocking=True)
        if self.storage_device is None:
            self._tables[key] = table
        return table

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    @property
    def layers(self) -> int:
        return sum(1 for entries in self._entries.values() if entries)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entries in self._entries.values() for t in entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self._tables.clear()
        self._unpaired.clear()
        self._other_sums.clear()


def _move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    if device.type == "cpu" and tensor.is_cuda:
        # Pinned memory lets the copy run without the host waiting for the device.
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return pinned.copy_(tensor, non_blocking=True)
    return tensor.to(device, non_blocking=True)
