"""Can a joint-attention model ignore its text after the gate? The study of issue #20 on the trained
Flux-shaped shapes model (tgate_testkit.trained_joint); its plan and rule, fixed before any result,
are docs/joint/PLAN.md.

    COMFYUI_PATH=/path/to/ComfyUI python -m tgate_bench.joint_study --out docs/joint

Every prompt sampled by ComfyUI's KSampler node with the same noise, as is (baseline) and with the
text treated as the variants say; the checker of tgate_testkit.trained scores what was generated.
The text stream is frozen by forward hooks on the text-token modules (each double-stream block's
`txt_attn.qkv`, the text rows of each single-stream block's `linear1`) and "one branch" by a model
function wrapper that evaluates one branch and hands its prediction to both: a measurement of what
the images become, not of speed (the frozen modules still compute here).

Writes table.md, results.json, curves.png (the text's change per block and the cond/uncond distance
per step) and grid.png (prompts in rows, variants in columns).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tgate_testkit.comfy_env import PACK_ROOT, comfyui_or_exit, import_comfyui

STEPS, CFG, SAMPLER, SCHEDULER, SEEDS = 25, 5.0, "euler", "simple", (0, 1)
GATES = (0.2, 0.4, 0.6)
DEFAULT_GATE = 0.4
HOLDS = 0.05  # a variant holds within this of the baseline's accuracy
CONTROL_GAP = 0.3  # the control must fall at least this far below the baseline, or the task cannot tell
COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond labels


@dataclass(frozen=True)
class Variant:
    label: str
    after_gate: str = "live"  # "live", "truncated" (one live branch) or "frozen"
    kept: str = "cond"  # whose kept text a frozen branch sees: "cond", "uncond" or "mean"
    gate_at: float | None = None
    cfg: float = CFG
    text: str = "all"  # the positive: "all", "after" (only after gate_at: the control) or "none"
    # The pooled vector the one branch after the gate carries (the second model: PLAN.md, addendum 2):
    # its own ("cond"), the two branches' mean ("mean") or the negative's ("uncond").
    pooled: str = "cond"


def variants() -> dict[str, Variant]:
    out = {"baseline": Variant("baseline (CFG, live text)")}
    for g in GATES:
        out[f"truncated_{g}"] = Variant(f"one branch after {g}, text live (guidance truncated)", "truncated", gate_at=g)
        for kept in ("cond", "uncond", "mean"):
            out[f"frozen_{kept}_{g}"] = Variant(f"one branch after {g}, text frozen ({kept})", "frozen", kept, g)
    out["cfg1_live"] = Variant("cfg 1, live text (the distilled case)", cfg=1.0)
    for g in GATES:
        out[f"cfg1_frozen_{g}"] = Variant(f"cfg 1, text frozen after {g}", "frozen", "cond", g, cfg=1.0)
    out["text_after"] = Variant(f"text only after the gate ({DEFAULT_GATE}): the control", gate_at=DEFAULT_GATE, text="after")
    out["no_text"] = Variant("no text (empty prompt): the floor", text="none")
    return out


class TextStream:
    """Forward hooks on the modules whose rows hold the text tokens' queries, keys and values: each
    double-stream block's `txt_attn.qkv` (all its rows are text) and each single-stream block's
    `linear1` (text rows first, as Flux joins [txt; img]). Modes: "live" (pass; with `record`, the
    cond branch's text keys and values are appended per call), "keep" (remember each branch's text
    rows: the last call before the gate wins) and "frozen" (the text rows are the kept ones)."""

    def __init__(self, net, tokens: int):
        self.tokens, self.hidden = tokens, net.hidden_size
        self.mode, self.kept_from = "live", "cond"
        self.branches: list[int] = []  # the current call's cond_or_uncond
        self.kept: dict[str, dict[int, torch.Tensor]] = {}
        self.record: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        modules = {f"double_blocks.{i}": b.txt_attn.qkv for i, b in enumerate(net.double_blocks)}
        modules |= {f"single_blocks.{i}": b.linear1 for i, b in enumerate(net.single_blocks)}
        self.names = list(modules)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _frozen_rows(self, name: str) -> torch.Tensor:
        kept = self.kept[name]
        if self.kept_from == "mean":
            return (kept[COND] + kept[UNCOND]) / 2
        return kept[COND if self.kept_from == "cond" else UNCOND]

    def _hook(self, name: str):
        def hook(module, args, output):
            text = output[:, : self.tokens]
            if self.mode == "keep" or self.record is not None:
                chunks = dict(zip(self.branches, text.detach().chunk(len(self.branches)), strict=True))
                if self.mode == "keep":
                    self.kept.setdefault(name, {}).update({b: c.clone() for b, c in chunks.items()})
                if self.record is not None and COND in chunks:
                    rows = chunks[COND]
                    keys, values = rows[..., self.hidden : 2 * self.hidden], rows[..., 2 * self.hidden : 3 * self.hidden]
                    self.record.setdefault(name, []).append((keys.clone(), values.clone()))
            if self.mode == "frozen":
                frozen = self._frozen_rows(name)
                frozen = frozen.expand(output.shape[0] // frozen.shape[0], *frozen.shape).reshape(-1, *frozen.shape[1:])
                return torch.cat((frozen.to(output), output[:, self.tokens :]), dim=1)
            return output

        return hook


def slice_batch(c: dict, total: int, chunks: int, index: int) -> dict:
    """The model call's conditioning for one of its `chunks` equal parts (tensors with `total` rows)."""
    return {k: v.chunk(chunks)[index] if torch.is_tensor(v) and v.shape[:1] == (total,) else v for k, v in c.items()}


class StudyRun:
    """One variant's sampling: a model function wrapper that knows the step from the sigma, sets the
    text stream's mode, and after the gate runs one branch for both where the variant says so."""

    def __init__(self, stream: TextStream, variant: Variant, sigmas: list[float], gate_step: int | None, distances=None):
        self.stream, self.variant, self.sigmas, self.gate_step = stream, variant, sigmas, gate_step
        self.distances = distances  # per step: the mean ||c - u|| / ||c|| of the denoised predictions
        self.one: tuple[int, torch.Tensor] | None = None  # the step and prediction of the last one-branch call
        self.predictions: dict[int, dict[int, torch.Tensor]] = {}  # per step, per branch, until both are in

    def step_of(self, sigma: float) -> int:
        return min(range(len(self.sigmas) - 1), key=lambda i: abs(self.sigmas[i] - sigma))

    def __call__(self, apply_model, args):
        x, t, c, branches = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        step = self.step_of(float(t[0]))
        after = self.gate_step is not None and step >= self.gate_step and self.variant.after_gate != "live"
        self.stream.branches = list(branches)
        self.stream.kept_from = self.variant.kept
        if not after:
            self.stream.mode = "keep" if self.variant.after_gate == "frozen" else "live"
            out = apply_model(x, t, **c)
            if self.distances is not None:
                # cond and uncond may come in one call or in two: measure once both are in
                seen = self.predictions.setdefault(step, {})
                seen.update(zip(branches, out.detach().chunk(len(branches)), strict=True))
                if COND in seen and UNCOND in seen:
                    cond, uncond = seen.pop(COND), seen.pop(UNCOND)
                    per_sample = (cond - uncond).flatten(1).norm(dim=1) / cond.flatten(1).norm(dim=1)
                    self.distances.setdefault(step, []).append(float(per_sample.mean()))
            return out
        # After the gate: one branch, the cond's inputs (with a frozen stream its text is not read).
        # Where ComfyUI runs cond and uncond as separate calls, the uncond's call returns the cond's
        # prediction of the same step.
        n = len(branches)
        if COND not in branches:
            if self.one is None or self.one[0] != step:
                raise RuntimeError("the study expects the cond branch evaluated before the uncond after the gate")
            return torch.cat([self.one[1]] * n)
        self.stream.mode = "frozen" if self.variant.after_gate == "frozen" else "live"
        i = branches.index(COND)
        x_one, t_one = x.chunk(n)[i], t.chunk(n)[i]
        self.stream.branches = [COND]
        c_one = slice_batch(c, x.shape[0], n, i)
        if self.variant.pooled != "cond":
            if UNCOND not in branches:
                raise RuntimeError("the study's pooled variants expect cond and uncond in one model call")
            vectors = c["y"].chunk(n)
            cond, uncond = vectors[i], vectors[branches.index(UNCOND)]
            c_one["y"] = (cond + uncond) / 2 if self.variant.pooled == "mean" else uncond
        one = apply_model(x_one, t_one, **c_one)
        self.one = (step, one)
        return torch.cat([one] * n)


def sample(nodes, model, variant: Variant, prompts, seed: int, record=None, distances=None, conditioning=None):
    """KSampler (the node) on the variant; the output latents [len(prompts), 4, 32, 32].
    `conditioning`: the model's CONDITIONING of a list of prompts (default trained_joint.conditioning)."""
    import comfy.samplers

    from tgate.probe import gate_step_of
    from tgate_bench.trained_eval import positive_for
    from tgate_testkit import trained, trained_joint

    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, SCHEDULER, STEPS).tolist()
    gate_step = None if variant.gate_at is None else gate_step_of(sigmas, variant.gate_at, sampling.percent_to_sigma)
    net = model.model.diffusion_model
    stream = TextStream(net, trained.TOKENS)
    stream.record = record
    patched = model.clone()
    patched.set_model_unet_function_wrapper(StudyRun(stream, variant, sigmas, gate_step, distances))
    conditioning = conditioning or trained_joint.conditioning
    try:
        positive = positive_for(nodes, prompts, variant.text, variant.gate_at, conditioning)
        negative = conditioning([None] * len(prompts))
        latent = {"samples": torch.zeros(len(prompts), trained.CHANNELS, trained.SIDE, trained.SIDE)}
        args = (patched, seed, STEPS, variant.cfg, SAMPLER, SCHEDULER, positive, negative, latent)
        return nodes.KSampler().sample(*args, denoise=1.0)[0]["samples"], gate_step
    finally:
        stream.remove()


def relative_changes(series: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[float], list[float]]:
    """Step-to-step ||x_t - x_{t-1}|| / ||x_{t-1}|| of the recorded keys and values (step 0: nan)."""

    def change(a, b):
        return float(((b - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).mean())

    keys = [float("nan")] + [change(series[i - 1][0], series[i][0]) for i in range(1, len(series))]
    values = [float("nan")] + [change(series[i - 1][1], series[i][1]) for i in range(1, len(series))]
    return keys, values


def plot_curves(changes: dict, distances: list[float], gate_step: int, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for name, (keys, values) in changes.items():
        (line,) = left.plot(range(len(keys)), keys, label=f"{name} keys")
        left.plot(range(len(values)), values, "--", color=line.get_color(), label=f"{name} values")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_title("text tokens: relative change from the step before", fontsize=9)
    left.legend(fontsize=7)
    right.plot(range(len(distances)), distances, "o-")
    right.set_xlabel("step")
    right.set_title("||cond - uncond|| / ||cond|| (denoised predictions)", fontsize=9)
    for ax in (left, right):
        ax.axvline(gate_step, color="grey", linestyle=":", label=f"gate {DEFAULT_GATE} (step {gate_step})")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# The variants the rule reads (decide, and the distilled case): the rest of the table is context.
RULE_VARIANTS = (
    "baseline",
    "text_after",
    f"truncated_{DEFAULT_GATE}",
    *(f"frozen_{k}_{DEFAULT_GATE}" for k in ("cond", "uncond", "mean")),
    "cfg1_live",
    f"cfg1_frozen_{DEFAULT_GATE}",
)


def table_lines(results: dict, chosen: dict[str, Variant], gate_steps: dict) -> list[str]:
    """The markdown table of scored variants: gate step, the checker's row, and the difference from
    the baseline's accuracy."""
    base = results["baseline"].accuracy if "baseline" in results else float("nan")
    return [
        "| variant | gate step (of 25) | all three right | colour | shape | position | vs baseline |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| `{n}`: {chosen[n].label} | {gate_steps[n] if gate_steps[n] is not None else '-'} | {s.row()} | "
            f"{s.accuracy - base:+.3f} |"
            for n, s in results.items()
        ),
    ]


def scored(results: dict, gate_steps: dict, verdict: str, reason: str) -> dict:
    """The scores, gate steps and verdict of a study's variants, as its results JSON holds them."""
    return dict(
        results={n: dict(s.__dict__, gate_step=gate_steps[n]) for n, s in results.items()}, verdict=verdict, reason=reason
    )


def write_report(table: Path, lines: list[str], results: Path, data: dict) -> None:
    """Write a study's table (markdown) and results (JSON), and print the table."""
    table.write_text("\n".join(lines) + "\n")
    results.write_text(json.dumps(data, indent=1, default=float) + "\n")
    print("\n".join(lines))


def numbers(values) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


def decide(acc: dict[str, float]) -> tuple[str, str]:
    """The rule of docs/joint/PLAN.md, applied: (verdict, reason)."""
    base = acc["baseline"]
    if base - acc["text_after"] < CONTROL_GAP:
        control = acc["text_after"]
        return "inconclusive", f"the control (text only after the gate) is {control:.3f}, not {CONTROL_GAP} below {base:.3f}"
    frozen = [k for k in ("mean", "cond", "uncond") if acc[f"frozen_{k}_{DEFAULT_GATE}"] >= base - HOLDS]
    if frozen:
        best = max(frozen, key=lambda k: acc[f"frozen_{k}_{DEFAULT_GATE}"])  # max keeps the first of ties
        return "go", f"frozen text ({best}) at {DEFAULT_GATE}: {acc[f'frozen_{best}_{DEFAULT_GATE}']:.3f} against {base:.3f}"
    if acc[f"truncated_{DEFAULT_GATE}"] >= base - HOLDS:
        return "live-text single branch only", f"truncated {acc[f'truncated_{DEFAULT_GATE}']:.3f} holds, no frozen variant does"
    return "no-go", f"no variant at {DEFAULT_GATE} within {HOLDS} of {base:.3f}"


def collect(nodes, model, names, prompts, seeds) -> dict:
    """Sample the named variants at every seed: their latents, gate steps, and the baseline's
    recorded text keys and values and cond/uncond distances."""
    from tgate_testkit import trained

    table = variants()
    runs, gate_steps, record, distances = {}, {}, {}, {}
    for name in names:
        runs[name] = []
        for seed in seeds:
            recording = name == "baseline" and seed == seeds[0]
            samples, gate_steps[name] = sample(
                nodes, model, table[name], prompts, seed, record if recording else None, distances if recording else None
            )
            runs[name].append(samples)
        print(f"{name}: {trained.score(torch.cat(runs[name]), prompts * len(seeds)).row()}", flush=True)
    return dict(runs=runs, gate_steps=gate_steps, record=record, distances=distances)


def merge(parts: list[dict]) -> dict:
    """The parts of a study run side by side (--part), as one collect() would give them."""
    out = dict(runs={}, gate_steps={}, record={}, distances={})
    for part in parts:
        for key in out:
            out[key].update(part[key])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tgate_bench.joint_study", description=__doc__)
    p.add_argument("--comfyui")
    p.add_argument("--weights", type=Path, default=None, help="default: tgate_testkit/weights/shapes-joint.safetensors")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="the plan's are 0,1; fewer only to try the script")
    p.add_argument("--part", default="", help="K/N: sample every N-th variant from the K-th (with --save)")
    p.add_argument("--save", type=Path, default=None, help="save the sampled variants here instead of reporting")
    p.add_argument("--merge", default="", help="comma-separated files of --save: report them as one run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=PACK_ROOT / "docs" / "joint")
    args = p.parse_args(argv)
    seeds = tuple(int(v) for v in args.seeds.split(","))
    comfy_path = comfyui_or_exit(args.comfyui, args.threads)
    nodes = import_comfyui(comfy_path)
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    from tgate_bench.trained_eval import environment, picture_grid
    from tgate_testkit import trained, trained_joint

    weights = args.weights or trained_joint.WEIGHTS
    model = trained_joint.build(weights)
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        trained_meta = f.metadata()
    prompts = list(trained.PROMPTS)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        collected = merge([torch.load(path, weights_only=False) for path in args.merge.split(",")])
    else:
        names = [k for k in variants() if not args.only or k in args.only.split(",")]
        if args.part:
            k, n = (int(v) for v in args.part.split("/"))
            names = names[k::n]
        collected = collect(nodes, model, names, prompts, seeds)
        if args.save:
            torch.save(collected, args.save)
            return 0
    chosen = {k: v for k, v in variants().items() if k in collected["runs"]}
    record, distances, gate_steps = collected["record"], collected["distances"], collected["gate_steps"]
    first_seed = {name: runs[0] for name, runs in collected["runs"].items()}
    results = {name: trained.score(torch.cat(collected["runs"][name]), prompts * len(seeds)) for name in chosen}
    acc = {n: s.accuracy for n, s in results.items()}
    setting = f"{SAMPLER}/{SCHEDULER}, {STEPS} steps, cfg {CFG:g}, seeds {', '.join(map(str, seeds))}, {len(prompts)} prompts"
    verdict, reason = decide(acc) if set(RULE_VARIANTS) <= set(acc) else ("partial", "not every variant of the rule ran")
    changes = {n: relative_changes(s) for n, s in record.items()}
    distance = [sum(distances[s]) / len(distances[s]) for s in sorted(distances)]
    gate_default = gate_steps.get(f"frozen_mean_{DEFAULT_GATE}") or gate_steps.get("text_after") or 0
    if changes:
        title = f"python -m tgate_bench.joint_study; baseline run, seed {seeds[0]}; {setting}\n{environment()}"
        plot_curves(changes, distance, gate_default, args.out / "curves.png", title)
    shown = ("baseline", f"truncated_{DEFAULT_GATE}", f"frozen_mean_{DEFAULT_GATE}", "text_after")
    columns = [c for c in shown if c in first_seed]
    if columns:
        picks = [prompts[i] for i in torch.linspace(0, len(prompts) - 1, 6).round().long().tolist()]
        rgb = {c: trained.to_rgb(first_seed[c]) for c in columns}
        rows = [(trained.caption(p), [rgb[c][prompts.index(p)] for c in columns]) for p in picks]
        picture_grid(rows, columns, args.out / "grid.png", f"python -m tgate_bench.joint_study; seed {seeds[0]}\n{environment()}")

    lines = [
        f"Prompt-following of the Flux-shaped shapes model ({setting}; {len(prompts) * len(seeds)} samples a row; "
        f"chance {trained.CHANCE:.3f}). Weights: step {trained_meta.get('step')}, seed {trained_meta.get('seed')}, "
        f"{trained_meta.get('elapsed_s')} s of training.",
        "",
        *table_lines(results, chosen, gate_steps),
        "",
        f"**Verdict: {verdict}** ({reason}), by the rule of [PLAN.md](PLAN.md).",
        "",
        "Text tokens' keys / values, relative change per step (baseline, cond branch; steps 1..):",
        "",
        *(f"- {n}: keys {numbers(keys[1:])}; values {numbers(values[1:])}" for n, (keys, values) in changes.items()),
        "",
        "||cond - uncond|| / ||cond|| per step (denoised predictions): " + numbers(distance),
        "",
        environment(),
    ]
    data = dict(
        settings=setting,
        environment=environment(),
        weights=trained_meta,
        **scored(results, gate_steps, verdict, reason),
        text_change={n: dict(keys=k, values=v) for n, (k, v) in changes.items()},
        cond_uncond_distance=distance,
    )
    write_report(args.out / "table.md", lines, args.out / "results.json", data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
