"""The forward each module of a joint-attention family's text stream runs while T-GATE is on.

In a joint-attention model (Flux, Chroma, Qwen-Image...) text enters as tokens that every block
carries in a text stream and mixes into one joint attention with the image tokens. The image rows
read the text only as keys and values there, so T-GATE freezes the modules that make them (the gate
keeps the fidelity branch's own rows, the joint study's rule) and, once they are frozen, skips what
only feeds later text rows. The roles are data (families.TextRole, per family in families.py); the
plan is the cross-attention one (the text stream is the gate's kind), carried out per model call
through the same CallSlot and ModelCall as the attention forwards (forward.py).

Image rows come out as the model computes them from the frozen text: a joined module computes its
image rows alone and joins them to the kept text rows. The joint attention call itself is left
alone, so the text queries are still computed, and their rows (which nothing reads) too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .families import CROSS, TextRole, TextStream, output_width
from .forward import CallSlot, ModelCall, next_occurrence
from .store import reduce_chunks


def gated_text_module(
    layer: str,
    role: TextRole,
    forward: Callable[..., torch.Tensor],
    slot: CallSlot,
    stream: TextStream,
    module: torch.nn.Module,
) -> Callable[..., torch.Tensor]:
    """Wrap the `forward` of `module`, a text-stream module of `role` in its family's `stream`, for
    T-GATE; its ModelCall comes from `slot`."""
    forward = getattr(forward, "tgate_original", forward)  # never wrap our own wrapper twice
    text_first = stream.text_first  # in joined rows the text rows come first (Flux: [text; image]), else last
    width = output_width(module) if role is TextRole.UNREAD else None  # the zeros' width
    # Of a JOINED_READ module's text rows, the leading columns the image reads and the capture keeps
    # (0: all); the others come back as zeros.
    columns = stream.joined_read_columns * module.in_features if role is TextRole.JOINED_READ else 0

    def text_rows_of(rows: torch.Tensor, count: int) -> torch.Tensor:
        return rows[:, :count] if text_first else rows[:, rows.shape[1] - count :]

    def image_rows_of(rows: torch.Tensor, count: int) -> torch.Tensor:
        return rows[:, count:] if text_first else rows[:, : rows.shape[1] - count]

    def joined(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if text.shape[-1] < image.shape[-1]:  # the unread columns (TextStream.joined_read_columns)
            text = torch.cat((text, text.new_zeros((*text.shape[:-1], image.shape[-1] - text.shape[-1]))), -1)
        return torch.cat((text, image) if text_first else (image, text), 1)

    def tgate_text_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        call = slot.call
        if call is None:
            return forward(x, *args, **kwargs)
        if role is TextRole.UNREAD:
            # Nothing the image reads depends on it once the text is frozen.
            return x.new_zeros((*x.shape[:-1], width)) if call.text_frozen else forward(x, *args, **kwargs)
        if role is TextRole.JOINED_UNREAD:
            count = _text_rows(call)
            if not call.text_frozen or count is None:
                return forward(x, *args, **kwargs)
            image = forward(image_rows_of(x, count), *args, **kwargs)
            return joined(image.new_zeros((image.shape[0], count, image.shape[2])), image)
        key = next_occurrence(call, layer)
        kept = call.reuse.get(key)
        if role is TextRole.READ:
            call.text_rows.append(x.shape[1])
            if kept is not None:
                if kept.shape[:-1] == x.shape[:-1]:
                    return kept  # computes nothing
                call.misfits.append(key)
            out = forward(x, *args, **kwargs)
            _capture(call, key, out)
            return out
        # JOINED_READ
        count = _text_rows(call)
        if kept is not None:
            if kept.shape[0] == x.shape[0] and x.shape[1] > kept.shape[1] and count == kept.shape[1]:
                return joined(kept, forward(image_rows_of(x, kept.shape[1]), *args, **kwargs))
            call.misfits.append(key)
        out = forward(x, *args, **kwargs)
        if count is not None:
            rows = text_rows_of(out, count)
            _capture(call, key, rows[..., :columns] if columns else rows)
        return out

    tgate_text_forward.tgate_original = forward
    return tgate_text_forward


def _text_rows(call: ModelCall) -> int | None:
    """How many text rows the joined rows of the call start (or end) with: what the call's text modules
    saw last, or what the call says (call_text_rows); None when neither tells: the joined modules then
    compute in full, and keep nothing."""
    return call.text_rows[-1] if call.text_rows else None


def call_text_rows(stream: TextStream, call_kwargs: dict) -> int | None:
    """The number of text rows every image of a model call has in its joined rows, from the keyword
    arguments ComfyUI calls the model with (`stream.text_rows_keyword`, TextStream); None where the
    stream does not name one, the call lacks it, or a padded text's mask gives the images different
    counts (their text rows then end at different rows, which no kept rows fit)."""
    if stream.text_rows_keyword is None:
        return None
    mask = call_kwargs.get(stream.text_mask_keyword) if stream.text_mask_keyword else None
    if mask is None:
        count = call_kwargs.get(stream.text_rows_keyword)
        return int(count) if count is not None else None
    # The model reads the same sums to the host itself (Lumina 2's patchify_and_embed), once per call.
    counts = set(mask.sum(dim=1).tolist())
    return int(counts.pop()) if len(counts) == 1 else None


def _capture(call: ModelCall, key: str, rows: torch.Tensor) -> None:
    """Keep what the call's reduction keeps of `rows` (the fidelity branch's chunks; a call of the
    other branch alone keeps nothing)."""
    if CROSS in call.capture_kinds and call.reduction is not None and call.reduction.stored:
        call.captured[key] = reduce_chunks(rows, call.reduction)
