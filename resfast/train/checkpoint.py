"""Checkpoints: everything a run needs to continue bit-exactly, written atomically after every epoch.

A checkpoint holds the model, optimizer, plan (clock, stateful schedules, sampler position), GradScaler
and torch RNG states, plus the run's config and history. It is written to a temporary file that then
replaces the old one (``os.replace`` is atomic on POSIX), so a run killed at any moment leaves either
the previous checkpoint or the new one, never a torn file.

The run draws random numbers from torch's generators only (weights, DataLoader worker seeds,
torchvision transforms); in-memory data is augmented from seeds derived from the sample clock, which
the plan restores. So torch's CPU and CUDA generator states are the RNG state to keep.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resfast.schedules import Plan
from resfast.train.config import RESUMABLE_CHANGES, Config
from resfast.train.errors import SettingError, UserFileNotFoundError

__all__ = ["FORMAT", "Progress", "load", "restore", "save"]

FORMAT = "resfast.train checkpoint 1"


@dataclass
class Progress:
    """The run's own state besides the modules': what happened so far."""

    epoch: int = 0  # epochs finished
    train_time_s: float = 0.0  # seconds spent in training steps (no evaluation, no checkpointing)
    # Steps where torch.compile compiled (--compile), kept out of train_time_s and samples per second.
    compile_time_s: float = 0.0
    compile_samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics record per epoch
    trace: list[list[float]] = field(default_factory=list)  # per step: [samples at its start, lr, batch]


def save(
    path: Path,
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: Plan,
    scaler: torch.amp.GradScaler,
    progress: Progress,
) -> None:
    payload = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "plan": plan.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        },
        "progress": vars(progress),
    }
    tmp = path.with_name(path.name + ".tmp")  # a fixed name: a leftover from a kill is overwritten
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    os.replace(tmp, path)


def load(path: Path, cfg: Config) -> dict[str, Any]:
    """Read and check a checkpoint written by `save` for a run with the same settings as ``cfg``.

    Raises UserFileNotFoundError, or SettingError for an unreadable, foreign or mismatched file; reads
    only.
    """
    if not path.is_file():
        raise UserFileNotFoundError(
            f"--resume: no checkpoint at {path}; run without --resume to start, or set --out to the "
            "folder of the run to continue"
        )
    # torch.save writes a zip archive; one cut short (a copy interrupted, a full disk) has no
    # central directory at its end. torch.load would then fall back to unpickling and blame weights_only.
    why = None if zipfile.is_zipfile(path) else "not a complete zip archive, as torch.save writes: truncated?"
    if why is None:
        try:
            # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if why is not None:
        raise SettingError(
            f"--resume: {path} is not a readable checkpoint ({why}). It was left as it is; delete it to "
            "start over, or point --out at another run"
        )
    keys = ("format", "config", "model", "optimizer", "plan", "scaler", "rng", "progress")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or any(k not in ckpt for k in keys):
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SettingError(f"--resume: {path} is not a {FORMAT!r} file (found {found!r})")
    saved, now = ckpt["config"], cfg.to_dict()
    changed = {
        k: (saved.get(k), now[k]) for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]
    }
    if changed:
        diff = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise SettingError(
            f"--resume: {path} belongs to a run with other settings ({diff}). Resume with the same "
            f"settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or use another --out"
        )
    return ckpt


def restore(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: Plan,
    scaler: torch.amp.GradScaler,
) -> Progress:
    """Load a checkpoint from `load` into freshly built objects; returns the run's progress."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        plan.load_state_dict(ckpt["plan"])
        scaler.load_state_dict(ckpt["scaler"])
        progress = Progress(**ckpt["progress"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise SettingError(
            "--resume: the checkpoint does not fit this model, optimizer or schedule: "
            f"{type(e).__name__}: {e}"
        ) from None
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return progress
