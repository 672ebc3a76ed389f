"""Train a coloured-shapes text-to-image model on the CPU: the SD1.5-shaped UNet of
tgate_testkit.trained (`--model unet`) or the Flux-shaped joint-attention model of
tgate_testkit.trained_joint (`--model joint`; `--model joint-pooled`: its second model, with a pooled
text vector).

    COMFYUI_PATH=/path/to/ComfyUI python -m tgate_bench.train_shapes --steps 7000 --seed 0
    COMFYUI_PATH=/path/to/ComfyUI python -m tgate_bench.train_shapes --model joint --steps 2400 --max-minutes 60

Each model's own objective, the one ComfyUI's samplers assume for its model config (SD1.5's eps at
uniformly random timesteps; rectified flow for the joint model); captions are dropped to the empty
caption 10 % of the time so classifier-free guidance works.
AdamW, an exponential moving average of the weights (what is saved), one CPU thread by default.
Every `--save-every` steps the EMA weights are written (fp16 safetensors), so a run cut short still
leaves usable weights; the log prints the loss and the elapsed time. `--max-minutes` ends a run
early at a time limit, saving the weights of the last step done (its metadata says which).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from tgate_testkit.comfy_env import comfyui_or_exit, import_comfyui


def save(module: torch.nn.Module, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tgate_bench.train_shapes", description=__doc__)
    p.add_argument("--comfyui")
    p.add_argument("--model", choices=("unet", "joint", "joint-pooled"), default="unet")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout: the share of empty captions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="weights file (default: the model's file in tgate_testkit/weights/)")
    args = p.parse_args(argv)
    comfy_path = comfyui_or_exit(args.comfyui, args.threads)
    import_comfyui(comfy_path)
    from tgate_testkit import trained, trained_joint

    kit = {"unet": trained, "joint": trained_joint, "joint-pooled": trained_joint.POOLED}[args.model]
    out = args.out or kit.WEIGHTS
    torch.manual_seed(args.seed)
    model = kit.build(None, device=torch.device("cpu"))
    net = model.model.diffusion_model
    net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_of = kit.objective(model.model.model_sampling)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    data = torch.Generator().manual_seed(args.seed + 1)
    params = sum(v.numel() for v in net.parameters())
    print(f"{params} weights; {args}", flush=True)
    start, running = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        x0, prompts = trained.batch(args.batch, data)
        drop = torch.rand(args.batch, generator=data) < args.drop
        context = trained.encode([None if d else pr for d, pr in zip(drop.tolist(), prompts, strict=True)])
        loss = loss_of(net, x0, context, data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, w in zip(ema.parameters(), net.parameters(), strict=True):
                e.lerp_(w, 1 - decay)
        running += loss.item()
        if step % args.log_every == 0:
            print(f"step {step} loss {running / args.log_every:.4f} elapsed {time.perf_counter() - start:.0f}s", flush=True)
            running = 0.0
        out_of_time = args.max_minutes is not None and time.perf_counter() - start > 60 * args.max_minutes
        if step % args.save_every == 0 or step == args.steps or out_of_time:
            meta = dict(model=args.model, step=step, seed=args.seed, batch=args.batch, lr=args.lr, ema=args.ema, drop=args.drop)
            meta["elapsed_s"] = round(time.perf_counter() - start)
            save(ema, out, meta)
        if out_of_time:
            break
    print(f"done: {step} steps in {time.perf_counter() - start:.0f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
