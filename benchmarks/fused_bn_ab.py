"""Whole training steps of one model unfused and fused (resfast.nn.fuse_resnet), interleaved: does the
fused BatchNorm + add + ReLU make training faster end to end? (What `--fuse-bn auto` is decided on.)

    python benchmarks/fused_bn_ab.py [--device cpu] [--model resnet20] [--batch 128] [--image 32]
        [--dtype fp32,bf16] [--layout nchw,channels_last] [--rounds 30]

Both models are built as the training script builds them, from the same weights, and train on the
same fixed synthetic batch with resfast's SGD (so only the BatchNorms differ); steps alternate
between them (ABBA order, each ended by reading the loss, which waits for the device), so that a
machine that speeds up or slows down during the run affects both alike. Reported:
images/s from each model's median step, the ratio of the medians, and the quartiles of the per-round
ratios (unfused step time / fused step time), whose spread says how far to trust the ratio. Before
timing, one step of each is compared: the losses must agree to 1e-2 of their size (the same maths,
rounded differently; a wrong BN is far off).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import resfast.optim
from resfast.train import Config, build

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def make_model(name: str, fused: bool, layout: str, device: torch.device) -> nn.Module:
    """The training script's model (same weights for both: seeded), fused or not."""
    torch.manual_seed(0)
    cfg = Config(model=name, fuse_bn="on" if fused else "off", channels_last=layout == "channels_last")
    return build.make_model(cfg, num_classes=10, device=device)


def trainer(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None
) -> Callable[[], float]:
    opt = resfast.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> float:
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step: Callable[[], float], device: torch.device) -> float:
    start = time.perf_counter()
    step()  # loss.item() syncs the device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(args: argparse.Namespace, dtype: str, layout: str, device: torch.device) -> str:
    memory_format = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.image, args.image, generator=gen).to(
        device, memory_format=memory_format
    )
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    plain, fused = (make_model(args.model, on, layout, device) for on in (False, True))
    steps = {"unfused": trainer(plain, x, y, DTYPES[dtype]), "fused": trainer(fused, x, y, DTYPES[dtype])}
    first = {name: step() for name, step in steps.items()}
    if abs(first["fused"] - first["unfused"]) > 1e-2 * abs(first["unfused"]):
        raise SystemExit(f"the fused model's first loss {first['fused']} differs from {first['unfused']}")
    for step in steps.values():  # warm-up
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.rounds):
        order = ("unfused", "fused") if i % 2 == 0 else ("fused", "unfused")
        for name in order:
            times[name].append(timed(steps[name], device))
    unfused, fused_ms = statistics.median(times["unfused"]), statistics.median(times["fused"])
    ratios = sorted(a / b for a, b in zip(times["unfused"], times["fused"], strict=True))
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    return (
        f"| {args.model} | {args.image} | {args.batch} | {dtype} | {layout} "
        f"| {args.batch / unfused:.0f} img/s | {args.batch / fused_ms:.0f} img/s "
        f"| {unfused / fused_ms:.2f}x | {q1:.2f}-{q3:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet20", help="as the training script's --model")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=32, help="input height and width")
    parser.add_argument(
        "--dtype", default="fp32,bf16", help="comma-separated: fp32 (no autocast), bf16, fp16"
    )
    parser.add_argument("--layout", default="nchw", help="comma-separated: nchw, channels_last")
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    print(f"device: {device}, torch {torch.__version__}, {threads} threads, {args.rounds} rounds")
    print("| model | image | batch | dtype | layout | unfused | fused | fused speed-up | per-round p25-p75 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtype.split(","):
        for layout in args.layout.split(","):
            print(compare(args, dtype, layout, device), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
