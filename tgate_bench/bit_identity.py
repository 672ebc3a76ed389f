"""Sample tiny real ComfyUI models with the T-GATE nodes and keep the results, to check that a
change of the engine's code leaves them bit for bit.

    python -m tgate_bench.bit_identity --save before.pt      # on the code before the change
    python -m tgate_bench.bit_identity --compare before.pt   # on the code after it

Each case is the simple TGate node (the advanced one for V2 and DeepCache) on a tiny random-weight
SD1.5 or SDXL model built from ComfyUI's own classes, sampled as KSampler does with the sampler,
scheduler and settings the case names; PAG and SAG cases apply ComfyUI's own nodes. `--compare`
prints one line per case and exits 1 when any result differs in any bit (or a case is missing).
Run it in the same environment (torch, ComfyUI, threads) before and after: the check is of the
pack's code, not of torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tgate_testkit.comfy_env import PACK_ROOT, comfyui_or_exit

STEPS = 10  # gate_at 0.4 gates after 4 of 10 normal steps


def _pag(model):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    return PerturbedAttentionGuidance.execute(model, 3.0).result[0]


def _sag(model):
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    return SelfAttentionGuidance.execute(model, 0.5, 2.0).result[0]


# name: (family, node settings, sampling settings, add-on); node settings with `warm_up` use the advanced node.
CASES = {
    "sd15 euler": ("sd15", {}, {}, None),
    "sd15 heun karras": ("sd15", {}, {"sampler": "heun", "scheduler": "karras"}, None),
    "sd15 dpmpp_2m": ("sd15", {}, {"sampler": "dpmpp_2m"}, None),
    "sd15 uni_pc": ("sd15", {}, {"sampler": "uni_pc"}, None),
    "sd15 cfg 1": ("sd15", {}, {"cfg": 1.0}, None),
    "sd15 batch 2": ("sd15", {}, {"batch": 2}, None),
    "sd15 cond branch": ("sd15", {"fidelity_branch": "cond"}, {}, None),
    "sd15 gate_at 0": ("sd15", {"gate_at": 0.0}, {}, None),
    "sd15 gate_at 1": ("sd15", {"gate_at": 1.0}, {}, None),
    "sd15 cache cpu": ("sd15", {"cache_device": "cpu"}, {}, None),
    "sd15 v2": ("sd15", {"warm_up": 1, "sp_interval": 2, "fi_interval": 2}, {}, None),
    "sd15 deepcache": ("sd15", {"warm_up": 0, "sp_interval": 1, "fi_interval": 1, "deepcache_interval": 3}, {}, None),
    "sd15 pag": ("sd15", {}, {}, _pag),
    "sd15 sag": ("sd15", {}, {}, _sag),
    "sdxl euler": ("sdxl", {"fidelity_branch": "auto"}, {}, None),
    "sdxl dpmpp_sde": ("sdxl", {"fidelity_branch": "auto"}, {"sampler": "dpmpp_sde"}, None),
    "sdxl cond branch": ("sdxl", {"fidelity_branch": "cond"}, {}, None),
    "sdxl v2": ("sdxl", {"fidelity_branch": "auto", "warm_up": 1, "sp_interval": 2, "fi_interval": 1}, {}, None),
    "sdxl pag": ("sdxl", {"fidelity_branch": "auto"}, {}, _pag),
    "sdxl sag": ("sdxl", {"fidelity_branch": "auto"}, {}, _sag),
}


def sample_cases(comfy) -> dict[str, torch.Tensor]:
    models = {"sd15": comfy.sd15(seed=3), "sdxl": comfy.sdxl(seed=3)}
    results = {}
    for name, (family, node, settings, addon) in CASES.items():
        pooled = family == "sdxl"
        positive, negative = comfy.cond(1, pooled=pooled), comfy.cond(2, pooled=pooled)
        model = comfy.tgate_advanced(models[family], **node) if "warm_up" in node else comfy.tgate(models[family], **node)
        if addon is not None:
            model = addon(model)
        results[name] = comfy.sample(model, positive, negative, steps=STEPS, size=32, seed=5, **settings).cpu()
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tgate_bench.bit_identity", description=__doc__.split("\n\n")[0])
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, help="write the results to this file")
    action.add_argument("--compare", type=Path, help="compare the results with those saved in this file")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, else two folders above the pack)")
    args = p.parse_args(argv)
    comfy_path = comfyui_or_exit(args.comfyui)
    from tgate_testkit.runtime import ComfyRuntime

    torch.manual_seed(0)
    results = sample_cases(ComfyRuntime.load(comfy_path, PACK_ROOT))
    if args.save:
        torch.save(results, args.save)
        print(f"{len(results)} cases saved to {args.save}")
        return 0
    saved = torch.load(args.compare)
    differ = 0
    for name, got in results.items():
        before = saved.get(name)
        same = before is not None and before.dtype == got.dtype and torch.equal(before, got)
        differ += not same
        detail = "missing" if before is None else f"max abs diff {(got - before).abs().max().item():.3g}"
        print(f"{'identical' if same else 'DIFFERS  '}  {name}" + ("" if same else f"  ({detail})"))
    print(f"{len(results) - differ} of {len(results)} cases bit-identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
