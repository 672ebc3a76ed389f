"""The T-GATE probe on the trained joint-attention model (tgate_testkit.trained_joint), at the joint
study's settings: where its cond/uncond distance suggests the gate at several thresholds, and whether
the positive's text frozen there (the study's `frozen_cond` variant, the pack's rule) keeps
prompt-following within the study's margin of the baseline. Chooses probe_node.JOINT_THRESHOLD.

    COMFYUI_PATH=/path/to/ComfyUI python -m tgate_bench.joint_probe --out docs/joint
    COMFYUI_PATH=/path/to/ComfyUI python -m tgate_bench.joint_probe --cfg 1 --out docs/joint

With --cfg 1 (the distilled case, docs/joint/PLAN.md's addendum) the probe evaluates the negative for
the distance only, the frozen runs and the baseline are the study's cfg-1 ones (`cfg1_frozen`,
`cfg1_live`), and it writes probe-cfg1.json and probe-cfg1.png; there is no recorded run to compare
the distances with.

The probe's recording run is the TGateProbe node's own (probe_node.record_run), seed 0, the 48 prompts
in one batch, as the study's baseline run that recorded `cond_uncond_distance` in results.json; the
distances are compared with those. Sampling and scoring are the study's (joint_study.sample, its
seeds). Writes probe.json and probe.png (the node's plot) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from tgate_testkit.comfy_env import PACK_ROOT, comfyui_or_exit

THRESHOLDS = (0.1, 0.07, 0.05, 0.03)  # steps 5, 6, 8 and 11 (the default gate) on this model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tgate_bench.joint_probe", description=__doc__)
    p.add_argument("--comfyui")
    p.add_argument("--seeds", default="0,1", help="seeds of the frozen-cond runs (the study's: 0,1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cfg", type=float, default=None, help="the probe's and the frozen runs' CFG (default: the study's)")
    p.add_argument("--out", type=Path, default=PACK_ROOT / "docs" / "joint")
    args = p.parse_args(argv)
    comfy_path = comfyui_or_exit(args.comfyui, args.threads)
    from tgate_testkit.runtime import ComfyRuntime

    nodes = ComfyRuntime.load(comfy_path, PACK_ROOT).nodes
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    from tgate.probe import gate_at_for_step, suggest_gate_from_distance
    from tgate_bench import joint_study as study
    from tgate_bench.trained_eval import environment, save_image
    from tgate_testkit import trained, trained_joint

    probe_module = sys.modules[nodes.NODE_CLASS_MAPPINGS["TGateProbe"].__module__]
    model = trained_joint.build()
    prompts = list(trained.PROMPTS)
    seeds = tuple(int(v) for v in args.seeds.split(","))
    latent = {"samples": torch.zeros(len(prompts), trained.CHANNELS, trained.SIDE, trained.SIDE)}
    positive, negative = trained_joint.conditioning(prompts), trained_joint.conditioning([None] * len(prompts))
    cfg = study.CFG if args.cfg is None else args.cfg
    cfg_one = math.isclose(cfg, 1.0)
    if not (cfg_one or math.isclose(cfg, study.CFG)):
        p.error(f"--cfg {cfg:g}: the study ran its baselines at cfg {study.CFG:g} and 1; use one of those")
    run = (model, study.SEEDS[0], study.STEPS, cfg, study.SAMPLER, study.SCHEDULER, positive, negative, latent)
    _, result, family = probe_module.record_run(*run)
    distance = result.cond_uncond_distance()
    print(f"distance per step: {study.numbers(distance)}")
    worst = None
    if math.isclose(cfg, study.CFG):  # the study's baseline run recorded the same distances
        recorded = json.loads((PACK_ROOT / "docs" / "joint" / "results.json").read_text())["cond_uncond_distance"]
        worst = max(abs(a - b) / b for a, b in zip(distance, recorded, strict=True))
        print(f"against results.json: largest relative difference {worst:.2e}")

    percent_to_sigma = model.get_model_object("model_sampling").percent_to_sigma
    settings = f"{study.SAMPLER}, {study.SCHEDULER}, cfg {cfg:g}"
    threshold = probe_module.JOINT_THRESHOLD
    _, summary, image = probe_module.report(result, family, model, threshold, study.SAMPLER, study.SCHEDULER, cfg)
    name = "probe-cfg1" if cfg_one else "probe"
    save_image(image, args.out / f"{name}.png")
    print(summary, flush=True)

    def accuracy(gate_at: float | None) -> float:
        if gate_at is None:
            variant = study.variants()["cfg1_live" if cfg_one else "baseline"]
        else:
            variant = study.Variant("frozen cond", "frozen", "cond", gate_at, cfg=cfg)
        samples = [study.sample(nodes, model, variant, prompts, seed)[0] for seed in seeds]
        return trained.score(torch.cat(samples), prompts * len(seeds)).accuracy

    baseline = accuracy(None)
    rows, by_step = {}, {}
    for threshold in THRESHOLDS:
        step = suggest_gate_from_distance(distance, threshold)
        gate_at = gate_at_for_step(result.sigmas, step, percent_to_sigma)
        if step not in by_step:
            by_step[step] = accuracy(gate_at) if gate_at < 1.0 else baseline
        rows[threshold] = dict(step=step, gate_at=gate_at, accuracy=by_step[step], holds=by_step[step] >= baseline - study.HOLDS)
        print(f"threshold {threshold:g}: step {step}, gate_at {gate_at:.3g}, frozen-cond {by_step[step]:.3f}", flush=True)
    data = dict(
        command="python -m tgate_bench.joint_probe" + (f" --cfg {cfg:g}" if args.cfg is not None else ""),
        settings=f"{settings}, {study.STEPS} steps, probe seed {study.SEEDS[0]}, accuracy over seeds {args.seeds}, "
        f"{len(prompts)} prompts",
        environment=environment(),
        cond_uncond_distance=distance,
        largest_relative_difference_from_results_json=worst,
        text_stream_mean_change=[None if math.isnan(v) else v for v in result.mean_change()],
        baseline_accuracy=baseline,
        thresholds={str(k): v for k, v in rows.items()},
        summary=summary,
    )
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
