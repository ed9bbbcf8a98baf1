"""The training run: build everything from a Config, train epoch by epoch, evaluate, checkpoint, report.

Every step's loss is the *sum* over this rank's samples times ``world_size / global batch``: with DDP
averaging gradients over ranks, that is exactly the gradient of the mean loss over the global batch,
also for the last batch of an epoch, whose shares differ by one sample between ranks.
"""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from resfast.schedules import NoiseScaleBatch, Plan
from resfast.train import build, checkpoint, distributed, report
from resfast.train.config import Config
from resfast.train.data import Data, InMemory, load
from resfast.train.errors import SettingError

__all__ = ["run"]

_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MASK32 = 0xFFFFFFFF
# What a run writes into --out: another run's files there are refused, or removed by --overwrite.
OUTPUTS = ("checkpoint.pt", "metrics.jsonl", "summary.json", "curves.png")


def augment_seed(seed: int, samples: int, world_size: int, rank: int) -> int:
    """The augmentation seed of the batch that starts at ``samples`` on ``rank``.

    A function of the clock, so a resumed run augments as the interrupted one did, with no state to
    save. It has 32 bits, all that torch's CPU generator keeps of a seed: ``samples * world_size +
    rank`` is unique per batch and rank below 2**32 (~4e9 samples times ranks), and adding the
    scrambled seed keeps that map one-to-one.
    """
    return (samples * world_size + rank + seed * 0x9E3779B1) & _MASK32


@dataclass
class Run:
    """What one epoch needs, built once."""

    cfg: Config
    dist: distributed.Dist
    device: torch.device
    data: Data
    model: nn.Module  # the module itself: evaluation and checkpoints use it
    net: nn.Module  # what training calls: the model, wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    plan: Plan
    scaler: torch.amp.GradScaler
    train_loader: DataLoader[Any]
    test_loader: DataLoader[Any]
    # This rank's batch sizes stepped so far: under --compile, a new one is a step that compiles.
    batch_sizes: set[int] = field(default_factory=set)

    def batches(self, loader: DataLoader[Any]) -> Any:
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def prepare(self, images: Tensor, seed: int | None) -> Tensor:
        x = self.data.transform(images, augment_seed=seed)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def forward(self, net: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(summed loss in fp32, number of correct predictions), under autocast when --amp asks."""
        dtype = _AMP[self.cfg.amp]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=self.cfg.label_smoothing)
        return loss, (logits.argmax(1) == y).sum()


class _Totals:
    """Summed loss and correct predictions, kept on the device (no sync per step), and a count."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, loss_sum: Tensor, correct: Tensor, count: int) -> None:
        self.loss_sum += loss_sum.detach()
        self.correct += correct
        self.count += count

    def means(self, dist: distributed.Dist) -> tuple[float, float]:
        """(mean loss, accuracy) over every rank's samples."""
        count = torch.full((), self.count, dtype=torch.float64, device=self.loss_sum.device)
        loss_sum, correct, count = dist.sum(torch.stack([self.loss_sum, self.correct, count])).tolist()
        return loss_sum / count, correct / count


def _train_step(run: Run, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One optimizer step on this rank's share of a global batch; returns (summed loss, correct)."""
    ws = run.dist.world_size
    global_n: Tensor | int = len(y)
    if ws > 1:  # torch.full launches a fill: no host-to-device copy, which would wait for the GPU
        global_n = run.dist.sum(torch.full((), len(y), device=run.device))
    noise = run.plan.batch_schedule if isinstance(run.plan.batch_schedule, NoiseScaleBatch) else None
    # NoiseScaleBatch needs the gradient's norm at two batch sizes: the step then runs as two
    # accumulated halves, measured after the first (this rank's half) and after both (global batch).
    halves = noise is not None and int(global_n) >= 2 * ws
    cut = len(y) // 2 if halves else len(y)
    chunks = [(x[:cut], y[:cut]), (x[cut:], y[cut:])] if halves else [(x, y)]
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, correct = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    for i, (xc, yc) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or ws == 1 else run.net.no_sync()  # type: ignore[operator]
        with sync:
            loss, right = run.forward(run.net, xc, yc)
            run.scaler.scale(loss * ws / global_n).backward()
        loss_sum, correct = loss_sum + loss.detach(), correct + right
        if halves:
            unscale = 1.0 / run.scaler.get_scale()
            if not last:  # grads of this half's summed loss times ws / global_n: rescale to its mean
                small = _grad_sq_norm(run.model) * (unscale * int(global_n) / (ws * cut)) ** 2
                small = float(run.dist.sum(small)) / ws  # every rank's estimate, averaged: all agree
            else:
                big = float(_grad_sq_norm(run.model)) * unscale**2
                noise.estimator.update(small, cut, big, int(global_n))  # type: ignore[union-attr]
    if run.cfg.max_grad_norm is not None and run.cfg.impl == "torch":
        # torch's way; resfast's optimizers clip inside their step (max_grad_norm), unscaled there too.
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss_sum, correct


def _grad_sq_norm(model: nn.Module) -> Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).float() ** 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the GPU's queued work belongs to the time measured


def _train_epoch(run: Run, progress: checkpoint.Progress) -> dict[str, float]:
    """Train one epoch; ``progress`` gets its steps' trace and its compile time and samples."""
    cfg, plan, dist = run.cfg, run.plan, run.dist
    run.net.train()
    totals = _Totals(run.device)
    bar = report.Bar(cfg.progress and dist.main, progress.epoch + 1, cfg.epochs, len(run.data.train))  # type: ignore[arg-type]
    # Reading the loss for the bar waits for the GPU: there, only every 20 steps.
    refresh = 1 if run.device.type == "cpu" else 20
    shown: dict[str, Any] = {}
    compile_seconds = 0.0
    start_time = time.perf_counter()
    for step, (images, labels) in enumerate(run.batches(run.train_loader), 1):
        start, lr = plan.samples, plan.lr
        seed = augment_seed(cfg.seed, start, dist.world_size, dist.rank) if cfg.augment else None
        x = run.prepare(images, seed)
        # torch.compile compiles for the first batch shape and again for the second (then with a
        # dynamic batch size): a step at a new size is timed apart, as compilation, not training.
        # (Later new sizes reuse the dynamic graph; counting their one step each costs little.)
        compiles = cfg.compile and len(labels) not in run.batch_sizes
        if compiles:
            run.batch_sizes.add(len(labels))
            _sync(run.device)
            compile_start = time.perf_counter()
        loss, correct = _train_step(run, x, labels)
        plan.step()
        batch = plan.samples - start  # the global batch just trained (the sampler told the plan)
        if compiles:
            _sync(run.device)
            compile_seconds += time.perf_counter() - compile_start
            progress.compile_samples += batch
        progress.trace.append([start, lr, batch])
        totals.add(loss, correct, len(labels))
        if step % refresh == 0:
            shown |= {"loss": f"{totals.loss_sum.item() / totals.count:.4f}"}
            shown |= {"acc": f"{totals.correct.item() / totals.count:.2%}"}
        bar.update(batch, **(shown | {"lr": f"{plan.lr:.4g}", "batch": batch}))
    _sync(run.device)
    seconds = time.perf_counter() - start_time - compile_seconds
    loss, acc = totals.means(dist)
    # The bar's last word matches the epoch's metrics.jsonl line (not the epoch's partial last batch).
    bar.close(loss=f"{loss:.4f}", acc=f"{acc:.2%}", lr=f"{plan.lr:.4g}", batch=plan.batch_size)
    return {"train_loss": loss, "train_acc": acc, "epoch_time_s": seconds, "compile_time_s": compile_seconds}


@torch.no_grad()
def _evaluate(run: Run) -> dict[str, float]:
    run.model.eval()
    totals = _Totals(run.device)
    for images, labels in run.batches(run.test_loader):
        totals.add(*run.forward(run.model, run.prepare(images, None), labels), len(labels))
    loss, acc = totals.means(run.dist)
    return {"test_loss": loss, "test_acc": acc}


def _loaders(cfg: Config, data: Data, plan: Plan, dist: distributed.Dist) -> tuple[DataLoader, DataLoader]:
    # In-memory data is gathered a batch at a time on the device already: worker processes would only
    # add copies (and cannot share GPU tensors).
    workers = 0 if isinstance(data.train, InMemory) else cfg.workers
    sampler = plan.batch_sampler(len(data.train), seed=cfg.seed, rank=dist.rank, world_size=dist.world_size)
    # Workers are not kept across epochs: new ones take their seeds from torch's RNG at each epoch,
    # which a checkpoint restores, so an augmenting imagefolder run resumes exactly too.
    common: dict[str, Any] = {"num_workers": workers, "collate_fn": data.collate}
    train = DataLoader(data.train, batch_sampler=sampler, **common)
    # Each rank evaluates every world_size-th test sample; the sums are then added over ranks.
    shard = range(dist.rank, len(data.test), dist.world_size)  # type: ignore[arg-type]
    test = DataLoader(data.test, sampler=shard, batch_size=cfg.eval_batch_size, **common)
    return train, test


def _wrap(cfg: Config, model: nn.Module, dist: distributed.Dist, device: torch.device) -> nn.Module:
    net = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    return torch.compile(net) if cfg.compile else net  # type: ignore[return-value]


def _summary(run: Run, progress: checkpoint.Progress, wall: float) -> dict[str, Any]:
    cfg, device, last = run.cfg, run.device, progress.history[-1]
    return {
        "test_acc": last["test_acc"],
        "test_loss": last["test_loss"],
        "train_acc": last["train_acc"],
        "train_loss": last["train_loss"],
        "train_time_s": progress.train_time_s,
        "compile_time_s": progress.compile_time_s,
        "wall_time_s": wall,
        "img_per_s": (run.plan.samples - progress.compile_samples) / progress.train_time_s,
        "epochs": progress.epoch,
        "samples": run.plan.samples,
        "steps": run.plan.steps,
        "optimizer": cfg.optimizer,
        "impl": cfg.impl,
        "backend": build.optimizer_backend(cfg, device),
        "fuse_bn": build.uses_fused_bn(cfg, device),
        "bn_backend": build.bn_backend(cfg, device),
        "model": cfg.model,
        "dataset": cfg.dataset,
        "amp": cfg.amp,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "world_size": run.dist.world_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "out": cfg.out,
        "config": cfg.to_dict(),
    }


def run(cfg: Config) -> dict[str, Any] | None:
    """Train as ``cfg`` says. Rank 0 writes <out>/summary.json and returns the summary; others None.

    What the user asked for and cannot be done (settings, data, checkpoint, --out, backend) raises a
    `resfast.train.errors.UserError` before training starts.
    """
    cfg = cfg.resolved()
    dist, device = distributed.setup(cfg.device)
    try:
        summary = _run(cfg, dist, device)
        # Rank 0 writes the report after training: tearing the group down under it has aborted gloo
        # on the other ranks ("terminate called without an active exception"). Not after an error:
        # a rank waiting here for a failed one would hang instead of letting torchrun stop the run.
        dist.barrier()
        return summary
    finally:
        dist.close()


def _run(cfg: Config, dist: distributed.Dist, device: torch.device) -> dict[str, Any] | None:
    wall_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions once
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    # Check what needs no work first: a bad checkpoint, --out or backend stops the run untouched.
    ckpt = checkpoint.load(ckpt_path, cfg) if cfg.resume else None
    if not cfg.resume and not cfg.overwrite and (found := [n for n in OUTPUTS if (out / n).exists()]):
        raise SettingError(
            f"--out {out} holds another run ({', '.join(found)}); continue it with --resume, replace it "
            "with --overwrite, or choose another --out"
        )
    build.optimizer_backend(cfg, device)
    build.bn_backend(cfg, device)
    torch.manual_seed(cfg.seed)
    data = load(cfg).to(device)
    model = build.make_model(cfg, data.num_classes, device)
    optimizer = build.make_optimizer(cfg, model)
    plan = build.make_plan(cfg, optimizer, len(data.train))  # type: ignore[arg-type]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    progress = checkpoint.restore(ckpt, model, optimizer, plan, scaler) if ckpt else checkpoint.Progress()
    train_loader, test_loader = _loaders(cfg, data, plan, dist)
    net = _wrap(cfg, model, dist, device)
    run = Run(cfg, dist, device, data, model, net, optimizer, plan, scaler, train_loader, test_loader)
    if dist.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SettingError(f"--out {out}: cannot create it ({e})") from None
        if cfg.overwrite:  # the old run goes only now that the new one is ready to write its own
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)
    while progress.epoch < cfg.epochs:
        record = _train_epoch(run, progress)
        progress.train_time_s += record["epoch_time_s"]
        progress.compile_time_s += record["compile_time_s"]
        record |= _evaluate(run)
        # Loss-driven schedules (plateau, loss_backoff) see the epoch's training loss: the test set
        # stays out of every decision.
        plan.observe(record["train_loss"])
        progress.epoch += 1
        progress.history.append(
            {"epoch": progress.epoch, "samples": plan.samples, "steps": plan.steps}
            | record
            | {"lr": plan.lr, "batch_size": plan.batch_size, "train_time_s": progress.train_time_s}
        )
        if dist.main:
            checkpoint.save(ckpt_path, cfg, model, optimizer, plan, scaler, progress)
            report.write_metrics(out / "metrics.jsonl", progress.history)
    if not dist.main:
        return None
    summary = _summary(run, progress, time.perf_counter() - wall_start)
    report.plot_curves(out / "curves.png", progress.history, progress.trace)
    report.write_json(out / "summary.json", summary)
    return summary
