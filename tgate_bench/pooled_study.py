"""Which pooled text vector should the one branch after the gate carry? The joint study's second
model (tgate_testkit.trained_joint, `pooled=True`: a pooled vector in every block's modulation, as
Flux's, SD3's, Mochi's and HiDream's) answers it; plan and rule, fixed before training:
docs/joint/PLAN.md, addendum 2.

    COMFYUI_PATH=/path/to/ComfyUI python -m tgate_bench.pooled_study --out docs/joint

The joint study's prompts, seeds, sampler and checker (tgate_bench.joint_study): the baseline, the
control (text only after the gate) and, at gates 0.2 and 0.4, the positive's text frozen with one
branch after the gate carrying the positive's pooled vector (the pack's rule), the mean of both
branches' or the negative's. Writes pooled.md and pooled.json.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from tgate_bench import joint_study as study
from tgate_testkit.comfy_env import PACK_ROOT, comfyui_or_exit, import_comfyui

GATES = (0.2, 0.4)
MIN_BASELINE = 0.5  # below it the model has not learnt the task well enough to tell
BETTER_BY = 0.05  # the branch mean replaces the positive's pooled vector only if it beats it by more


def variants() -> dict[str, study.Variant]:
    out = {"baseline": study.variants()["baseline"], "text_after": study.variants()["text_after"]}
    for g in GATES:
        for pooled in ("cond", "mean", "uncond"):
            label = f"one branch after {g}, text frozen (cond), pooled vector: {pooled}"
            out[f"pooled_{pooled}_{g}"] = study.Variant(label, "frozen", "cond", g, pooled=pooled)
    return out


def decide(acc: dict[str, float]) -> tuple[str, str]:
    """PLAN.md's addendum 2, applied: (verdict, reason)."""
    base, control = acc["baseline"], acc["text_after"]
    if base < MIN_BASELINE or base - control < study.CONTROL_GAP:
        return "inconclusive", f"baseline {base:.3f} (needs {MIN_BASELINE}), control {control:.3f}"
    own, mean = acc[f"pooled_cond_{study.DEFAULT_GATE}"], acc[f"pooled_mean_{study.DEFAULT_GATE}"]
    if mean > own + BETTER_BY:
        return "branch mean", f"the mean's {mean:.3f} beats the positive's {own:.3f} by more than {BETTER_BY}"
    return "positive's own", f"the mean's {mean:.3f} against the positive's {own:.3f} (baseline {base:.3f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tgate_bench.pooled_study", description=__doc__)
    p.add_argument("--comfyui")
    p.add_argument("--seeds", default=",".join(map(str, study.SEEDS)), help="the plan's are 0,1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=PACK_ROOT / "docs" / "joint")
    args = p.parse_args(argv)
    seeds = tuple(int(v) for v in args.seeds.split(","))
    nodes = import_comfyui(comfyui_or_exit(args.comfyui, args.threads))
    import comfy.utils
    from safetensors import safe_open

    comfy.utils.set_progress_bar_enabled(False)
    from tgate_bench.trained_eval import environment
    from tgate_testkit import trained, trained_joint

    model = trained_joint.build(trained_joint.POOLED_WEIGHTS, pooled=True)
    with safe_open(str(trained_joint.POOLED_WEIGHTS), "pt") as f:
        trained_meta = f.metadata()
    conditioning = partial(trained_joint.conditioning, pooled=True)
    prompts = list(trained.PROMPTS)
    table = variants()
    results, gate_steps = {}, {}
    for name, variant in table.items():
        samples = []
        for seed in seeds:
            latents, gate_steps[name] = study.sample(nodes, model, variant, prompts, seed, conditioning=conditioning)
            samples.append(latents)
        results[name] = trained.score(torch.cat(samples), prompts * len(seeds))
        print(f"{name}: {results[name].row()}", flush=True)
    acc = {n: s.accuracy for n, s in results.items()}
    verdict, reason = decide(acc)
    setting = (
        f"{study.SAMPLER}/{study.SCHEDULER}, {study.STEPS} steps, cfg {study.CFG:g}, seeds {', '.join(map(str, seeds))}, "
        f"{len(prompts)} prompts"
    )
    lines = [
        f"Prompt-following of the joint study's second model, with a pooled text vector ({setting}; "
        f"{len(prompts) * len(seeds)} samples a row; chance {trained.CHANCE:.3f}). Weights: step {trained_meta.get('step')}, "
        f"seed {trained_meta.get('seed')}, {trained_meta.get('elapsed_s')} s of training.",
        "",
        *study.table_lines(results, table, gate_steps),
        "",
        f"**Verdict: {verdict}** ({reason}), by the rule of [PLAN.md](PLAN.md) (addendum 2).",
        "",
        environment(),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    data = dict(
        command="python -m tgate_bench.pooled_study",
        settings=setting,
        environment=environment(),
        weights=trained_meta,
        **study.scored(results, gate_steps, verdict, reason),
    )
    study.write_report(args.out / "pooled.md", lines, args.out / "pooled.json", data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
