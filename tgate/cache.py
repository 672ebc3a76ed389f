"""The cross-attention outputs captured at the gate and replayed after it.

One entry per cross-attention layer and per conditioning chunk of the branch that keeps running
after the gate (ComfyUI identifies chunks by the uuid of their cond). Following the paper, an
entry is the mean of that chunk's output and the other branch's output of the same shape; a chunk
with no same-shaped partner (cfg 1.0, area conds) keeps its own output.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

ChunkId = Hashable


class CrossAttentionCache:
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

    def capture(self, layer: str, output: torch.Tensor, branches: Sequence[int], chunk_ids: Sequence[ChunkId]) -> None:
        """Store one layer's output of a batched model call made of `len(chunk_ids)` chunks."""
        chunks = output.chunk(len(chunk_ids))
        kept = [(c, i) for c, b, i in zip(chunks, branches, chunk_ids, strict=True) if b == self.keep_branch]
        others = [c for c, b in zip(chunks, branches, strict=True) if b != self.keep_branch]
        other_sum = _float_sum(others)
        layer_entries = self._entries.setdefault(layer, {})
        if not kept:
            if other_sum is not None:
                key = (layer, others[0].shape)
                total, count = self._other_sums.get(key, (None, 0))
                self._other_sums[key] = (other_sum if total is None else total + other_sum, count + len(others))
            return
        for chunk, chunk_id in kept:
            if other_sum is not None:
                # Average in float32: fp16 sums of two large activations can overflow.
                layer_entries[chunk_id] = ((chunk.float() + other_sum / len(others)) * 0.5).to(chunk.dtype)
            else:
                # A view would keep the whole batched output alive and, under CUDA graphs, point
                # into memory the next replay overwrites.
                layer_entries[chunk_id] = chunk.clone()
                self._unpaired.setdefault((layer, chunk.shape), []).append(chunk_id)

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


def _float_sum(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    if not tensors:
        return None
    # A copy even when already float32: the model's outputs may live in a CUDA graph's memory pool,
    # which the next replay overwrites.
    total = tensors[0].to(torch.float32, copy=True)
    for t in tensors[1:]:
        total = total + t.float()
    return total


def _move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    if device.type == "cpu" and tensor.is_cuda:
        # Pinned memory lets the copy run without the host waiting for the device.
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return pinned.copy_(tensor, non_blocking=True)
    return tensor.to(device, non_blocking=True)
