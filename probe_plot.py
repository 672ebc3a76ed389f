"""The T-GATE probe's plot, drawn with matplotlib (Agg, no window): per kind of attention, the relative
change of each depth group's output from one step to the next on a log axis, the mean in bold, the
threshold, the suggested gate and the family's official gate; on a joint-attention family, the
cond/uncond distance the gate is suggested from, beside the text stream's change."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .tgate.families import CROSS, SELF
from .tgate.probe import ProbeResult

WIDTH, HEIGHT, DPI = 1024, 640, 100  # pixels of the IMAGE output
MAX_GROUPS = 6  # thin curves per panel: layers in depth order, split into at most this many groups
FLOOR = 1e-6  # changes below this (or zero) are drawn at it on the log axis


@dataclass(frozen=True)
class Marks:
    title: str
    threshold: float
    suggested_step: int  # first step after the gate; == steps: do not gate
    suggested_gate_at: float
    official_step: int
    official_gate_at: float
    family: str


def depth_groups(count: int, groups: int = MAX_GROUPS) -> list[range]:
    """Contiguous groups of layer positions (depth order), as even as can be."""
    groups = max(1, min(groups, count))
    edges = [round(i * count / groups) for i in range(groups + 1)]
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _floor(values) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return np.where(np.isnan(array), np.nan, np.maximum(array, FLOOR))


def plot_probe(result: ProbeResult, marks: Marks) -> torch.Tensor:
    """A [1, HEIGHT, WIDTH, 3] float image in [0, 1] (ComfyUI's IMAGE). On a joint-attention family (the
    result has the cond/uncond distance) the first panel is that distance, which the gate is suggested
    from, and the text stream's change is shown beside it without a threshold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    joint = result.distance_sums is not None
    change = result.relative_change()  # [steps, layers, branches]
    steps = change.shape[0]
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    canvas = FigureCanvasAgg(fig)
    kinds = [k for k in (CROSS, SELF) if result.layers_of(k)]
    axes = list(fig.subplots(1, len(kinds) + joint, sharey=not joint, squeeze=False)[0])
    if joint:
        _distance_panel(axes.pop(0), result, marks, steps)
    for ax, kind in zip(axes, kinds, strict=True):
        _change_panel(ax, result, marks, change, kind, threshold=not joint and kind == CROSS)
    if not joint:
        axes[0].set_ylabel("relative change  ||o_t - o_(t-1)|| / ||o_(t-1)||", fontsize=10)
    if marks.suggested_step >= steps:
        why = "the cond/uncond distance" if joint else "the cross-attention mean"
        fig.text(0.5, 0.005, f"suggested: do not gate ({why} never stays below the threshold)", ha="center")
    fig.suptitle(marks.title, fontsize=13)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).float().div(255.0).unsqueeze(0)


def _change_panel(ax, result: ProbeResult, marks: Marks, change: torch.Tensor, kind: str, threshold: bool) -> None:
    """The relative change of the layers of `kind`: depth groups, the branches' means, the mean in bold."""
    steps = change.shape[0]
    x = np.arange(1, steps)
    layers = result.layers_of(kind)
    by_layer = change[:, layers].nanmean(dim=2)  # mean over the branches: [steps, layers]
    colors = _colors(len(depth_groups(len(layers))))
    for color, group in zip(colors, depth_groups(len(layers)), strict=True):
        curve = by_layer[:, list(group)].nanmean(dim=1)[1:]
        label = f"layer {group.start + 1}" if len(group) == 1 else f"layers {group.start + 1}-{group.stop}"
        ax.plot(x, _floor(curve), color=color, linewidth=1.0, alpha=0.9, label=f"{label} of {len(layers)}")
    for branch, style, name in ((0, "--", "cond"), (1, ":", "uncond")):
        values = result.mean_change(kind, branch)[1:]
        if not all(math.isnan(v) for v in values):
            ax.plot(x, _floor(values), color="0.25", linestyle=style, linewidth=1.6, label=f"mean, {name} branch")
    ax.plot(x, _floor(result.mean_change(kind)[1:]), color="black", linewidth=3.0, label="mean (both branches)")
    if threshold:
        ax.axhline(marks.threshold, color="tab:red", linestyle=":", linewidth=1.4, label=f"threshold {marks.threshold:g}")
    _gate_lines(ax, marks, steps)
    if result.distance_sums is not None:
        name = "text stream (for reference)"
    else:
        name = "cross-attention (text)" if kind == CROSS else "self-attention"
    ax.set_title(f"{name}: {len(layers)} layers", fontsize=12)
    ax.set_yscale("log")
    ax.set_xlim(0.5, max(steps - 0.5, 1.5))
    ax.set_xlabel("step t (change of each layer's output from step t-1 to t)", fontsize=10)
    if result.distance_sums is not None:
        ax.set_ylabel("relative change  ||o_t - o_(t-1)|| / ||o_(t-1)||", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.85)


def _distance_panel(ax, result: ProbeResult, marks: Marks, steps: int) -> None:
    """A joint family's cond/uncond distance per step, the threshold the gate is suggested from, the gates."""
    distance = result.cond_uncond_distance()
    if distance and not all(math.isnan(v) for v in distance):
        ax.plot(np.arange(len(distance)), _floor(distance), "o-", color="black", linewidth=2.5, markersize=4, label="distance")
    else:
        ax.text(0.5, 0.5, "no uncond branch (cfg 1): no distance", ha="center", transform=ax.transAxes)
    ax.axhline(marks.threshold, color="tab:red", linestyle=":", linewidth=1.4, label=f"threshold {marks.threshold:g}")
    _gate_lines(ax, marks, steps)
    ax.set_title("cond/uncond distance of the predictions (the gate's signal)", fontsize=11)
    ax.set_yscale("log")
    ax.set_xlim(-0.5, max(steps - 0.5, 1.5))
    ax.set_xlabel("step t (the first evaluation of step t)", fontsize=10)
    ax.set_ylabel("||cond - uncond|| / ||cond||", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", framealpha=0.85)


def _gate_lines(ax, marks: Marks, steps: int) -> None:
    """The suggested and the official gate, between the last step with text and the first without."""
    if marks.suggested_step < steps:
        ax.axvline(
            marks.suggested_step - 0.5,
            color="tab:red",
            linewidth=2.0,
            label=f"suggested gate: step {marks.suggested_step} (gate_at {marks.suggested_gate_at:.3g})",
        )
    if 0 < marks.official_step < steps:
        ax.axvline(
            marks.official_step - 0.5,
            color="tab:blue",
            linestyle="--",
            linewidth=2.0,
            label=f"official gate: step {marks.official_step} (gate_at {marks.official_gate_at:g})",
        )


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.1 + 0.75 * i / max(count - 1, 1)) for i in range(count)]


def blank_image(message: str) -> torch.Tensor:
    """Where matplotlib is missing: a plain grey image (the STRING output says why)."""
    del message
    return torch.full((1, HEIGHT, WIDTH, 3), 0.5)
