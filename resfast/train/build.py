"""From a Config to the objects a run trains: model, optimizer and the schedule `Plan`."""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import nn

import resfast.optim
from resfast import backends, schedules
from resfast.nn import cifar, fuse_resnet
from resfast.train.config import BN_BACKENDS, CIFAR_DEPTHS, Config, batch_args_defaults, lr_args_defaults
from resfast.train.errors import SettingError

__all__ = ["bn_backend", "make_model", "make_optimizer", "make_plan", "optimizer_backend", "uses_fused_bn"]

_OPTIMIZERS = {
    "sgd": "SGD",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "adam": "Adam",
    "adamw": "AdamW",
    "lars": "LARS",  # resfast's only: Config refuses it with --impl torch
}
_LR_SCHEDULES: dict[str, type[schedules.LRSchedule]] = {
    "constant": schedules.Constant,
    "step": schedules.Step,
    "multistep": schedules.MultiStep,
    "exponential": schedules.Exponential,
    "polynomial": schedules.Polynomial,
    "inverse_time": schedules.InverseTime,
    "cosine": schedules.Cosine,
    "onecycle": schedules.OneCycle,
    "loss_backoff": schedules.LossBackoff,
    "plateau": schedules.Plateau,
}
_BATCH_SCHEDULES: dict[str, type[schedules.BatchSchedule]] = {
    "constant": schedules.ConstantBatch,
    "step": schedules.StepBatch,
    "linear": schedules.LinearBatch,
    "polynomial": schedules.PolynomialBatch,
    "coupled": schedules.CoupledBatch,
    "noise": schedules.NoiseScaleBatch,
}
# A length written as "<x>ep" (x epochs) or "<x>%" (x percent of the run).
_LENGTH = re.compile(r"^\s*([0-9.eE+-]+)\s*(ep|%)\s*$")


def uses_fused_bn(cfg: Config, device: torch.device) -> bool:
    """Whether the run fuses BatchNorm + add + ReLU (see the fuse_bn help for 'auto')."""
    if cfg.fuse_bn == "auto":
        # On the CPU only with the native kernels: the reference alone is far slower than torch's BN.
        return cfg.impl == "resfast" and (device.type == "cuda" or backends.native_runs("cpu"))
    return cfg.fuse_bn == "on"


def make_model(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The model on ``device`` (weights from the global RNG: seed it first), fused if the run says so."""
    depth = int(cfg.model.removeprefix("resnet"))
    if depth in CIFAR_DEPTHS:
        model: nn.Module = cifar.CifarResNet(depth, num_classes)
    else:
        import torchvision

        model = getattr(torchvision.models, cfg.model)(weights=None, num_classes=num_classes)
    if uses_fused_bn(cfg, device):
        model = fuse_resnet(model, backend=cfg.bn_backend)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _choose(device: torch.device, requested: str, setting: str, **kwargs: Any) -> str:
    """``backends.choose`` with its refusal as a SettingError that names the setting behind it."""
    try:
        return backends.choose(device, torch.float32, requested, **kwargs)
    except (backends.BackendUnavailable, ValueError) as e:  # ValueError: an unknown name (RESFAST_BACKEND)
        raise SettingError(f"{setting}: {e}") from None


def optimizer_backend(cfg: Config, device: torch.device) -> str | None:
    """The resfast backend the optimizer runs on fp32 params of ``device`` (None for --impl torch).

    Asking here, before training, turns an unavailable ``--backend`` into an error that says why.
    """
    if cfg.impl == "torch":
        return None
    return _choose(device, cfg.backend, "--backend")


def bn_backend(cfg: Config, device: torch.device) -> str | None:
    """The backend the fused BatchNorms run on (None when the run does not fuse them)."""
    if not uses_fused_bn(cfg, device):
        return None
    return _choose(
        device, cfg.bn_backend, "--bn-backend", implemented=BN_BACKENDS[1:], op="batch_norm_add_relu"
    )


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg``'s optimizer over ``model``'s parameters; a setting it rejects raises SettingError.

    LARS gets MLPerf's param groups (``resfast.optim.lars_param_groups``), which carry the weight decay:
    convolution and linear weights adapted and decayed, BatchNorm params and biases neither.
    """
    cfg = cfg.resolved()
    module: Any = resfast.optim if cfg.impl == "resfast" else torch.optim
    cls = getattr(module, _OPTIMIZERS[cfg.optimizer])
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    for name in ("momentum", "nesterov"):  # None where the optimizer has no such option
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    kwargs |= cfg.optimizer_args
    if cfg.impl == "resfast":
        kwargs["backend"] = cfg.backend
        if cfg.max_grad_norm is not None:  # (--impl torch clips in the loop: torch.optim cannot)
            kwargs["max_grad_norm"] = cfg.max_grad_norm
    try:
        if cls is resfast.optim.LARS:
            # The groups set each param's decay: given to the constructor as well, it would only be a
            # default that no group uses.
            rest = {k: v for k, v in kwargs.items() if k != "weight_decay"}
            return cls(resfast.optim.lars_param_groups(model, kwargs["weight_decay"]), **rest)
        return cls(model.parameters(), **kwargs)
    except (TypeError, ValueError) as e:  # an unknown keyword, or a value the optimizer rejects
        raise SettingError(f"--optimizer {cfg.optimizer} (with --optimizer-args) {kwargs}: {e}") from None


def _samples(value: Any, epoch: int, run: int) -> Any:
    """A schedule argument with every "<x>ep" turned into x epochs of ``epoch`` samples, and every
    "<x>%" into x percent of the ``run``'s samples."""
    if isinstance(value, list):
        return [_samples(v, epoch, run) for v in value]
    if isinstance(value, str) and (match := _LENGTH.match(value)):
        number, unit = float(match.group(1)), match.group(2)
        return number * epoch if unit == "ep" else number / 100 * run
    return value


def _build(kind: str, cls: type, first: dict[str, Any], args: dict[str, Any], run: int, epoch: int) -> Any:
    """``cls(**first, **args)`` with lengths converted, and ``total`` defaulting to the whole run."""
    params = inspect.signature(cls).parameters
    kwargs = first | {k: _samples(v, epoch, run) for k, v in args.items()}
    if "total" in params and "total" not in kwargs:
        kwargs["total"] = run
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise SettingError(f"{kind} {cls.__name__}{inspect.signature(cls)} with {kwargs}: {e}") from None


def make_plan(cfg: Config, optimizer: torch.optim.Optimizer, epoch: int) -> schedules.Plan:
    """The LR and batch schedules of ``cfg`` on the sample clock; ``epoch`` is the training set's size.

    A schedule argument that does not fit raises SettingError.
    """
    cfg = cfg.resolved()
    run = cfg.epochs * epoch
    lr_cls = _LR_SCHEDULES[cfg.lr_schedule]
    first_param = next(iter(inspect.signature(lr_cls).parameters))  # base, value or max_lr
    lr_args = lr_args_defaults(cfg.lr_schedule, cfg.lr, cfg.optimizer) | cfg.lr_args
    main = _build("--lr-schedule", lr_cls, {first_param: cfg.lr}, lr_args, run, epoch)
    args = batch_args_defaults(cfg.batch_schedule, cfg.batch_size) | cfg.batch_args
    batch_cls = _BATCH_SCHEDULES[cfg.batch_schedule]
    held = main  # the LR schedule the optimizer follows, before its warmup
    if batch_cls is schedules.CoupledBatch:
        first = {"lr_schedule": main, "base_size": cfg.batch_size}
        if args.get("mode") == "inverse":
            # The batch grows where `main` would decay the LR, and the LR holds its start value; a
            # warmup then shapes only the held LR, not the batch.
            held = schedules.Constant(main(0))
    elif batch_cls is schedules.NoiseScaleBatch:
        estimator = schedules.GradientNoiseScale(**({"beta": args.pop("beta")} if "beta" in args else {}))
        first = {"base_size": cfg.batch_size, "estimator": estimator}
    else:
        first = {next(iter(inspect.signature(batch_cls).parameters)): cfg.batch_size}
    batch = _build("--batch-schedule", batch_cls, first, args, run, epoch)
    lr: schedules.LRSchedule = held
    if cfg.warmup_epochs > 0:
        lr = schedules.Warmup(held, cfg.warmup_epochs * epoch, cfg.warmup_start_factor)
    scaling = None if cfg.lr_scaling == "none" else cfg.lr_scaling
    try:
        return schedules.Plan(optimizer, lr, batch, lr_scaling=scaling, base_batch=cfg.base_batch or None)
    except ValueError as e:  # e.g. --lr-scaling with coupled, which ties LR and batch already
        raise SettingError(f"--lr-scaling, --batch-schedule {cfg.batch_schedule}: {e}") from None
