"""The attention outputs one run keeps, and what comes back when a later step reuses them.

Entries are kept per layer and per conditioning chunk (ComfyUI identifies chunks by the uuid of
their cond), since ComfyUI groups chunks into model calls by free memory and may group them
differently from one step to the next. A capture keeps either each chunk's own output (self-
attention before and after the gate) or, at the last step before the gate, for each chunk of the
branch run after it (the fidelity branch), the mean of that chunk and the other branch's chunks of the same shape (the
paper's rule); a chunk with no partner (cfg 1.0) keeps its own output. Guiders with more than two
cond lists (PerpNeg, DualCFG) keep the mean of every chunk of that shape, each weighing the same.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import NamedTuple

import torch

from .families import REUSE_KINDS

ChunkId = Hashable


OCCURRENCE = "#"  # never in a module path


def occurrence_key(layer: str, n: int) -> str:
    """What the n-th run (0-based) of a layer's module within one model call is kept under: the
    layer for the first run, `layer#n` for later ones (VACE runs each vace block once per control)."""
    return layer if n == 0 else f"{layer}{OCCURRENCE}{n}"


def layer_of(key: str) -> str:
    """The layer (module path) of a key made by occurrence_key."""
    return key.split(OCCURRENCE, 1)[0]


class ChunkReduction(NamedTuple):
    """Which chunks of one batched model call a capture keeps, and which are averaged into them
    (made by StepPlan.reduction). Plain ints and bools, so a compiled model sees it as a constant."""

    n_chunks: int
    stored: tuple[int, ...]  # the chunks whose outputs are stored
    mixed_in: tuple[int, ...]  # the other branch's chunks, averaged into each stored chunk (the gate's rule)
    mean_of_branches: bool
    # More than two cond lists: the stored chunk and every mixed-in chunk weigh the same. Two lists:
    # the stored chunk and the mean of the mixed-in ones weigh half each (the paper's two branches).
    chunk_mean: bool = False


def reduce_chunks(output: torch.Tensor, reduction: ChunkReduction) -> torch.Tensor:
    """What a capture keeps of one layer's batched output, as one tensor; runs inside the model.

    The stored chunks in call order, each averaged with the mean of the mixed-in chunks when there
    are any (in float32, since fp16 sums of large activations overflow; stored in the output dtype).
    A call with no chunk to store gives the float32 sum of its chunks, to pair with stored chunks
    from other calls.
    """
    if not reduction.mixed_in:
        if len(reduction.stored) == reduction.n_chunks:
            return output
        chunks = output.chunk(reduction.n_chunks)
        return torch.cat([chunks[i] for i in reduction.stored])
    chunks = output.chunk(reduction.n_chunks)
    mixed_sum = chunks[reduction.mixed_in[0]].float()
    for i in reduction.mixed_in[1:]:
        mixed_sum = mixed_sum + chunks[i].float()
    if not reduction.stored:
        return mixed_sum
    if reduction.chunk_mean:
        share = 1.0 / (1 + len(reduction.mixed_in))
        means = [((chunks[i].float() + mixed_sum) * share).to(output.dtype) for i in reduction.stored]
        return means[0] if len(means) == 1 else torch.cat(means)
    mixed_mean = mixed_sum / len(reduction.mixed_in)
    means = [((chunks[i].float() + mixed_mean) * 0.5).to(output.dtype) for i in reduction.stored]
    return means[0] if len(means) == 1 else torch.cat(means)


class Entry(NamedTuple):
    """Where one chunk's output is kept: chunk `index` of `count` equal chunks of `block`."""

    block: torch.Tensor
    index: int
    count: int

    def view(self) -> torch.Tensor:
        return self.block if self.count == 1 else self.block.chunk(self.count)[self.index]


class AttentionStore:
    """The outputs one run keeps, per layer and chunk, for the attention layers it was given."""

    def __init__(self, layer_kinds: Mapping[str, str], storage_device: torch.device | str | None = None):
        self.layer_kinds = dict(layer_kinds)  # {layer: kind}
        # None keeps entries where they were computed (the model's device).
        self.storage_device = torch.device(storage_device) if storage_device is not None else None
        self._entries: dict[str, dict[ChunkId, Entry]] = {}
        # Only used when ComfyUI runs the two branches in separate model calls (low memory): the
        # other branch's outputs are summed per layer and shape and mixed in when the capture ends.
        self._unpaired: dict[tuple[str, torch.Size], list[ChunkId]] = {}
        self._other_sums: dict[tuple[str, torch.Size], tuple[torch.Tensor, int]] = {}
        self._tables: dict[tuple, dict[str, torch.Tensor]] = {}
        # {layer: {chunk of the other branch: the kept chunk it was averaged into}}: where a mean
        # capture kept one chunk, its mean serves the other branch's chunk as well (extra evaluations).
        self._partners: dict[str, dict[ChunkId, ChunkId]] = {}
        self._unpaired_partners: dict[tuple[str, torch.Size], list[ChunkId]] = {}
        self._chunk_mean = False  # the capture in progress weighs every chunk the same (ChunkReduction.chunk_mean)
        # A chunk one capture stored twice for a layer: the same cond evaluated twice at one step on
        # different inputs (unnamed context windows), which one entry per chunk cannot serve.
        self.repeated: ChunkId | None = None
        self._capture_sigmas: dict[str, float] = {}  # per kind, the sigma of its last capture (start_capture)

    def start_capture(self, kinds: Collection[str], sigma: float, whole: bool) -> None:
        """An evaluation at `sigma` captures `kinds`: each starts anew, unless the evaluation is of part
        of the latent (`whole` False) at the sigma of that kind's last capture. Context windows evaluate
        parts of the latent one after another at the same sigma: those add to the capture. An
        evaluation of the whole latent starts a new one, at the same sigma too (heun evaluates a step's
        sigma twice: the previous step's correction, then the step itself)."""
        for kind in kinds:
            if self._capture_sigmas.get(kind) != sigma or whole:
                self.clear((kind,))
                self._capture_sigmas[kind] = sigma

    def store(
        self,
        layer: str,
        reduced: torch.Tensor,
        reduction: ChunkReduction,
        chunk_ids: Sequence[ChunkId],
        kind: str | None = None,
    ) -> None:
        """Keep what `reduce_chunks` gave for one layer of one model call. `kind`: the layer's kind
        where the store was not given it (a layer other packs' patches add, found at run time).

        It is copied: what comes out of a compiled model may live in a CUDA graph's memory pool,
        which the next replay overwrites, and a view would keep a whole batch alive.
        """
        if kind is not None:
            self.layer_kinds.setdefault(layer_of(layer), kind)
        if not reduction.stored:
            key = (layer, reduced.shape)
            total, count = self._other_sums.get(key, (None, 0))
            self._other_sums[key] = (reduced.clone() if total is None else total + reduced, count + len(reduction.mixed_in))
            self._unpaired_partners.setdefault(key, []).extend(chunk_ids[i] for i in reduction.mixed_in)
            return
        if reduction.mean_of_branches and len(reduction.stored) == 1:
            kept = chunk_ids[reduction.stored[0]]
            self._partners.setdefault(layer, {}).update({chunk_ids[i]: kept for i in reduction.mixed_in})
        block = reduced.clone()
        entries = self._entries.setdefault(layer, {})
        for index, position in enumerate(reduction.stored):
            if chunk_ids[position] in entries:
                self.repeated = chunk_ids[position]
            entry = Entry(block, index, len(reduction.stored))
            entries[chunk_ids[position]] = entry
            if reduction.mean_of_branches and not reduction.mixed_in:
                self._unpaired.setdefault((layer, entry.view().shape), []).append(chunk_ids[position])
                self._chunk_mean = reduction.chunk_mean

    def finish_capture(self) -> None:
        """Mix in partners seen in other model calls, then move entries to the storage device."""
        for (layer, shape), chunk_ids in self._unpaired.items():
            partner = self._other_sums.get((layer, shape))
            if partner is None:
                continue
            total, count = partner
            for chunk_id in chunk_ids:
                own = self._entries[layer][chunk_id].view()
                mean = (own.float() + total) / (1 + count) if self._chunk_mean else (own.float() + total / count) * 0.5
                self._entries[layer][chunk_id] = Entry(mean.to(own.dtype), 0, 1)
            if len(chunk_ids) == 1:
                partners = self._partners.setdefault(layer, {})
                partners.update({other: chunk_ids[0] for other in self._unpaired_partners.get((layer, shape), ())})
        self._unpaired.clear()
        self._other_sums.clear()
        self._unpaired_partners.clear()
        self._tables.clear()
        if self.storage_device is not None:
            moved: dict[int, torch.Tensor] = {}  # one copy per block, however many chunks share it
            for entries in self._entries.values():
                for chunk_id, entry in entries.items():
                    if id(entry.block) not in moved:
                        moved[id(entry.block)] = _move(entry.block, self.storage_device)
                    entries[chunk_id] = entry._replace(block=moved[id(entry.block)])

    def reuse_table(
        self, kinds: Collection[str], chunk_ids: Sequence[ChunkId], device: torch.device, partners: bool = False
    ) -> dict[str, torch.Tensor]:
        """{layer: kept output} of the layers of `kinds`, for a model call made of `chunk_ids`, on `device`.

        Layers missing an entry for any of the chunks are left out (they compute normally). A call
        made of the chunks of one capture, in its order, gets the kept tensor itself; tables are
        built once per combination until the next capture, so reusing allocates nothing, except
        with CPU storage, where each call gets its own copies. `partners`: a chunk of the branch a
        mean capture dropped gets the mean it was averaged into (for extra evaluations).
        """
        key = (tuple(sorted(kinds)), tuple(chunk_ids), device, partners)
        table = self._tables.get(key)
        if table is not None:
            return table
        table = {}
        for layer, entries in self._entries.items():
            if self.layer_kinds[layer_of(layer)] not in kinds:
                continue
            aliases = self._partners.get(layer, {}) if partners else {}
            parts = [entries.get(chunk_id) or entries.get(aliases.get(chunk_id)) for chunk_id in chunk_ids]
            if not parts or any(p is None for p in parts):
                continue
            table[layer] = _join(parts).to(device, non_blocking=True)
        if self.storage_device is None:
            self._tables[key] = table
        return table

    def holds(self, kind: str) -> bool:
        return any(entries and self.layer_kinds[layer_of(key)] == kind for key, entries in self._entries.items())

    def layers(self, kind: str) -> int:
        kept = {layer_of(key) for key, entries in self._entries.items() if entries}
        return sum(1 for layer in kept if self.layer_kinds[layer] == kind)

    @property
    def nbytes(self) -> int:
        return self.nbytes_of(REUSE_KINDS)

    def nbytes_of(self, kinds: Collection[str]) -> int:
        """Bytes kept for the layers of `kinds`."""
        blocks = {
            id(s.block): s.block
            for key, entries in self._entries.items()
            if self.layer_kinds[layer_of(key)] in kinds
            for s in entries.values()
        }
        return sum(b.numel() * b.element_size() for b in blocks.values())

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def clear(self, kinds: Collection[str] = REUSE_KINDS) -> None:
        self.repeated = None
        for layer in [key for key in self._entries if self.layer_kinds[layer_of(key)] in kinds]:
            del self._entries[layer]
            self._partners.pop(layer, None)
        for kind in kinds:
            self._capture_sigmas.pop(kind, None)
        self._tables.clear()
        self._unpaired_partners.clear()
        self._unpaired.clear()
        self._other_sums.clear()


def _join(parts: Sequence[Entry]) -> torch.Tensor:
    first = parts[0]
    whole = len(parts) == first.count and all(p.block is first.block and p.index == i for i, p in enumerate(parts))
    if whole:
        return first.block
    views = [p.view() for p in parts]
    return views[0] if len(views) == 1 else torch.cat(views)


def _move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    if device.type == "cpu" and tensor.is_cuda:
        # Pinned memory lets the copy run without the host waiting for the device.
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return pinned.copy_(tensor, non_blocking=True)
    return tensor.to(device, non_blocking=True)
