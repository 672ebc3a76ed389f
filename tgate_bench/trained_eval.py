"""Does T-GATE keep the prompt? The paper's experiment on the trained coloured-shapes model
(tgate_testkit.trained): every prompt sampled by ComfyUI's KSampler node with the same noise, as is
(baseline), with the T-GATE nodes, and with the text given only before or only after the gate; the
checker scores what was generated. Also the probe's plot and suggestion, and the picture grid of docs/choosing-the-gate.md.

    COMFYUI_PATH=/path/to/ComfyUI python -m tgate_bench.trained_eval --steps 25 --cfg 6 --out docs/trained

Writes table.md (the accuracy table), results.json, probe.png (the TGateProbe node's plot) and
grid.png (prompts in rows; baseline, T-GATE, T-GATE advanced, text only after the gate in columns).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tgate_testkit.comfy_env import PACK_ROOT, comfyui_or_exit

DEFAULT_GATE = 0.4  # both T-GATE nodes' default gate_at
HOLDS = 0.05  # accuracy "holds" within this of the baseline's (the tests' margin)
THRESHOLDS = (0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02)  # probe thresholds tried
# euler, 25 steps: the paper's setting; simple: KSampler's default scheduler (docs/choosing-the-gate.md:
# the probe on "normal")
STEPS, CFG, SAMPLER, SCHEDULER, SEED = 25, 6.0, "euler", "simple", 0


@dataclass(frozen=True)
class Variant:
    """One column of the paper's experiment: how the model and the positive are set up."""

    label: str
    gate_at: float | None = None  # the T-GATE node's gate_at (simple node), or where the text starts/stops
    node: str = ""  # "TGate", "TGateAdvanced" or "" (plain model)
    text: str = "all"  # "all", "before" (only before gate_at), "after" (only after it), "none"


VARIANTS = {
    "baseline": Variant("baseline (full CFG, text at every step)"),
    "tgate": Variant("T-GATE, gate_at 0.4 (default)", DEFAULT_GATE, "TGate"),
    "tgate_advanced": Variant("T-GATE (advanced), gate_at 0.4 (default)", DEFAULT_GATE, "TGateAdvanced"),
    "text_before": Variant("text only before the gate (0.4)", DEFAULT_GATE, text="before"),
    "text_after": Variant("text only after the gate (0.4)", DEFAULT_GATE, text="after"),
    "tgate_0.2": Variant("T-GATE, gate_at 0.2", 0.2, "TGate"),
    "tgate_0.6": Variant("T-GATE, gate_at 0.6", 0.6, "TGate"),
    "no_text": Variant("no text (empty prompt): the floor", text="none"),
}


def node_defaults(node) -> dict:
    """The node's widget inputs' defaults, as the UI puts them."""
    return {i.id: i.default for i in node.GET_SCHEMA().inputs if i.id != "model" and hasattr(i, "default")}


def positive_for(nodes, prompts, text: str, gate_at: float | None, conditioning=None):
    """The positive conditioning: the prompts' text at every step, or, with ComfyUI's own
    ConditioningSetTimestepRange and ConditioningCombine, the text on one side of `gate_at` and the
    empty caption on the other (the paper's "text only before / after the gate"). `conditioning`
    makes a model's CONDITIONING from prompts (default: the shapes UNet's)."""
    from tgate_testkit import trained

    conditioning = conditioning or trained.conditioning
    prompt, empty = conditioning(prompts), conditioning([None] * len(prompts))
    if text == "all":
        return prompt
    if text == "none":
        return empty
    ranged = nodes.ConditioningSetTimestepRange().set_range
    before, after = (prompt, empty) if text == "before" else (empty, prompt)
    return nodes.ConditioningCombine().combine(ranged(before, 0.0, gate_at)[0], ranged(after, gate_at, 1.0)[0])[0]


def sample(
    nodes, model, variant: Variant, prompts, *, steps=STEPS, cfg=CFG, seed=SEED, scheduler=SCHEDULER, gate_at: float | None = None
):
    """KSampler (the node) on the variant; returns the output latents [len(prompts), 4, 32, 32].
    `gate_at` overrides the variant's (for a sweep of the simple node)."""
    from tgate_testkit import trained

    gate = variant.gate_at if gate_at is None else gate_at
    if variant.node:
        node = nodes.NODE_CLASS_MAPPINGS[variant.node]
        model = node.execute(model, **{**node_defaults(node), "gate_at": gate}).result[0]
    positive = positive_for(nodes, prompts, variant.text, gate)
    negative = trained.conditioning([None] * len(prompts))
    latent = {"samples": torch.zeros(len(prompts), trained.CHANNELS, trained.SIDE, trained.SIDE)}
    return nodes.KSampler().sample(model, seed, steps, cfg, SAMPLER, scheduler, positive, negative, latent, denoise=1.0)[0][
        "samples"
    ]


def probe(nodes, model, prompts, *, steps=STEPS, cfg=CFG, seed=SEED, scheduler=SCHEDULER, threshold: float | None = None):
    """The TGateProbe node on the prompts (one batch): (latent, IMAGE, suggested_gate_at, summary)."""
    from tgate_testkit import trained

    node = nodes.NODE_CLASS_MAPPINGS["TGateProbe"]
    threshold = node_defaults(node)["threshold"] if threshold is None else threshold
    latent = {"samples": torch.zeros(len(prompts), trained.CHANNELS, trained.SIDE, trained.SIDE)}
    positive, negative = trained.conditioning(prompts), trained.conditioning([None] * len(prompts))
    args = (model, seed, steps, cfg, SAMPLER, scheduler, positive, negative, latent, 1.0, threshold)
    return node.execute(*args).result


def picture_grid(rows: list[tuple[str, list[torch.Tensor]]], columns: list[str], path: Path, title: str) -> None:
    """Images [32, 32, 3] in rows (a caption each) and labelled columns, drawn big with square pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.55 * len(columns) + 1.5, 1.5 * len(rows) + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (caption, images) in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
            if c == 0:
                words = caption.removeprefix("a ").split(" on the ")
                ax.set_ylabel("\n".join(words), fontsize=9, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=8)
    height = 1.5 * len(rows) + 0.8
    fig.subplots_adjust(left=0.17, right=0.98, top=1 - 0.8 / height, bottom=0.1 / height, wspace=0.08, hspace=0.1)
    fig.savefig(path, dpi=100)


def save_image(image: torch.Tensor, path: Path) -> None:
    """A ComfyUI IMAGE [1, H, W, 3] as a png."""
    from PIL import Image

    array = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path, optimize=True)


def environment() -> str:
    import comfyui_version

    cpu = platform.processor() or platform.machine()
    return (
        f"CPU ({cpu}), {torch.get_num_threads()} thread(s); torch {torch.__version__}, "
        f"ComfyUI {comfyui_version.__version__}, {datetime.date.today().isoformat()}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tgate_bench.trained_eval", description=__doc__)
    p.add_argument("--comfyui")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--cfg", type=float, default=CFG)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--scheduler", default=SCHEDULER)
    p.add_argument("--sweep", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", help="gate_at values for the simple node's sweep")
    p.add_argument("--grid-prompts", type=int, default=6, help="rows of the picture grid")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=PACK_ROOT / "docs" / "trained")
    p.add_argument("--weights", type=Path, default=None, help="default: tgate_testkit/weights/shapes-unet.safetensors")
    args = p.parse_args(argv)
    comfy_path = comfyui_or_exit(args.comfyui, args.threads)
    from tgate_testkit.runtime import ComfyRuntime

    runtime = ComfyRuntime.load(comfy_path, PACK_ROOT)
    nodes = runtime.nodes
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    from tgate import CROSS
    from tgate.probe import gate_at_for_step, gate_step_of, suggest_gate_step
    from tgate_testkit import trained

    model = trained.build(args.weights or trained.WEIGHTS)
    prompts = list(trained.PROMPTS)
    settings = dict(steps=args.steps, cfg=args.cfg, seed=args.seed, scheduler=args.scheduler)
    setting_text = f"{SAMPLER}/{args.scheduler}, {args.steps} steps, cfg {args.cfg:g}, seed {args.seed}, {len(prompts)} prompts"
    args.out.mkdir(parents=True, exist_ok=True)
    results, samples = {}, {}
    for name, variant in VARIANTS.items():
        samples[name] = sample(nodes, model, variant, prompts, **settings)
        results[name] = trained.score(samples[name], prompts)
        print(f"{name}: {results[name].row()}", flush=True)
    # The simple node's sweep over gate_at (the variants' gates reused: same noise, same result).
    sweep = {VARIANTS[n].gate_at: results[n] for n in ("tgate", "tgate_0.2", "tgate_0.6")}

    def gated(gate: float) -> trained.Score:
        if gate not in sweep:
            sweep[gate] = trained.score(sample(nodes, model, VARIANTS["tgate"], prompts, gate_at=gate, **settings), prompts)
            print(f"T-GATE gate_at {gate:g}: {sweep[gate].row()}", flush=True)
        return sweep[gate]

    for gate in (float(v) for v in args.sweep.split(",")):
        gated(gate)

    # The probe on the same prompts and noise: its plot, and what it suggests at several thresholds,
    # each suggestion sampled with T-GATE: does accuracy hold there?
    _, image, suggested_gate_at, summary = probe(nodes, model, prompts, **settings)
    save_image(image, args.out / "probe.png")
    print(summary, flush=True)
    probe_module = sys.modules[nodes.NODE_CLASS_MAPPINGS["TGateProbe"].__module__]
    _, result, _ = probe_module.record_run(
        model, args.seed, args.steps, args.cfg, SAMPLER, args.scheduler, trained.conditioning(prompts),
        trained.conditioning([None] * len(prompts)),
        {"samples": torch.zeros(len(prompts), trained.CHANNELS, trained.SIDE, trained.SIDE)},
    )  # fmt: skip
    mean_change = result.mean_change(CROSS)
    percent_to_sigma = model.get_model_object("model_sampling").percent_to_sigma
    thresholds = {}
    for threshold in THRESHOLDS:
        step = suggest_gate_step(mean_change, threshold)
        gate = gate_at_for_step(result.sigmas, step, percent_to_sigma)
        score = results["baseline"] if gate >= 1.0 else gated(gate)
        thresholds[threshold] = dict(step=step, gate_at=gate, accuracy=score.accuracy)
    baseline = results["baseline"].accuracy
    holds = sorted(g for g, sc in sweep.items() if abs(sc.accuracy - baseline) <= HOLDS)
    step_of = {g: gate_step_of(result.sigmas, g, percent_to_sigma) for g in sweep}

    # The grid: one prompt per colour and position, shapes in turn.
    picks = [prompts[i] for i in torch.linspace(0, len(prompts) - 1, args.grid_prompts).round().long().tolist()]
    columns = ["baseline", "tgate", "tgate_advanced", "text_after"]
    rgb = {name: trained.to_rgb(samples[name]) for name in columns}
    rows = [(trained.caption(p), [rgb[name][prompts.index(p)] for name in columns]) for p in picks]
    headers = ["baseline", "T-GATE 0.4", "T-GATE adv. 0.4", "text after 0.4"]
    title = f"python -m tgate_bench.trained_eval; {setting_text}\n{environment()}"
    picture_grid(rows, headers, args.out / "grid.png", title)

    lines = [
        f"Prompt-following on the trained shapes model ({setting_text}; chance {trained.CHANCE:.3f}).",
        "",
        "| variant | all three right | colour | shape | position |",
        "|---|---|---|---|---|",
        *(f"| {VARIANTS[n].label} | {s.row()} |" for n, s in results.items()),
        "",
        f"T-GATE (simple node) over gate_at; accuracy holds (within {HOLDS} of the baseline's) at gate_at "
        + ", ".join(f"{g:g}" for g in holds),
        "",
        f"| gate_at | gate step (of {args.steps}) | all three right | colour | shape | position |",
        "|---|---|---|---|---|---|",
        *(f"| {g:g} | {step_of[g]} | {sc.row()} |" for g, sc in sorted(sweep.items())),
        "",
        "Probe: cross-attention mean relative change per step (steps 1..): " + ", ".join(f"{v:.3g}" for v in mean_change[1:]),
        "",
        "| threshold | suggested step | suggested gate_at | T-GATE's accuracy there |",
        "|---|---|---|---|",
        *(f"| {t:g} | {v['step']} | {v['gate_at']:.3g} | {v['accuracy']:.3f} |" for t, v in thresholds.items()),
        "",
        environment(),
    ]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    data = dict(
        settings=setting_text,
        environment=environment(),
        results={n: s.__dict__ for n, s in results.items()},
        sweep={str(g): dict(sc.__dict__, step=step_of[g]) for g, sc in sorted(sweep.items())},
        holds=holds,
        probe=dict(mean_change=mean_change, suggested_gate_at=suggested_gate_at, summary=summary),
        thresholds={str(t): v for t, v in thresholds.items()},
    )
    (args.out / "results.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
