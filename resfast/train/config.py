"""Every setting of a training run, in one dataclass with units; overridable from TOML and the command line.

Precedence: the defaults below < a TOML file (``--config run.toml``, keys are the field names) < flags
(``--lr-schedule step``). Lengths are in **epochs** where the name says so, and in **samples** (over
all ranks) inside ``lr_args`` / ``batch_args``, where a string ``"2.5ep"`` means 2.5 epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from resfast import backends
from resfast.backends import BACKENDS

__all__ = [
    "CIFAR_DEPTHS",
    "OPTIMIZER_DEFAULTS",
    "TORCHVISION_MODELS",
    "Config",
    "batch_args_defaults",
    "load_toml",
    "lr_args_defaults",
    "parse_args",
]

PROG = "python -m resfast.train"
# CIFAR-style ResNets (resfast.nn.cifar, depth 6n + 2) and torchvision's ImageNet ResNets.
CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50")
MODELS = tuple(f"resnet{d}" for d in CIFAR_DEPTHS) + TORCHVISION_MODELS
LR_SCHEDULES = (
    "constant",
    "step",
    "multistep",
    "exponential",
    "polynomial",
    "inverse_time",
    "cosine",
    "onecycle",
    "loss_backoff",
    "plateau",
)
BATCH_SCHEDULES = ("constant", "step", "linear", "polynomial", "coupled", "noise")
# What --lr-args is merged over, per LR schedule, so that naming a schedule alone runs; lengths as
# percentages of the run, so the curve keeps its shape whatever --epochs is. (cosine, polynomial and
# onecycle need nothing more; loss_backoff gets max_lr = --lr, see lr_args_defaults.)
LR_ARGS_DEFAULTS: dict[str, dict[str, Any]] = {
    "step": {"every": "40%", "gamma": 0.1},  # two decays, at 40% and 80% of the run
    "multistep": {"milestones": ["50%", "75%"], "gamma": 0.1},  # He et al. 2016's CIFAR recipe
    "exponential": {"gamma": 0.01, "every": "100%"},  # down to 1/100 of --lr at the end
    "inverse_time": {"rate": 9, "every": "100%"},  # down to 1/10 of --lr at the end
}
# The ceiling of the growing batch schedules, in multiples of --batch-size: the default run's 32 -> 256.
BATCH_GROWTH = 8
# Per optimizer: the peak LR; for those with momentum, the momentum; for those with Nesterov momentum,
# whether it is on (when momentum > 0); and the LR schedule (with arguments merged under --lr-args)
# where it is not DEFAULT_LR_SCHEDULE. The LRs were measured on the default digits run
# (docs/train.md); adaptive methods take far smaller steps than SGD, and LARS's LR multiplies a trust
# ratio of ~trust_coefficient (0.001) times ||w|| / ||g||, so it is far larger. LARS follows MLPerf's
# ResNet recipe: plain momentum, a linear warmup and a polynomial decay of power 2.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.2, "momentum": 0.9, "nesterov": True},
    "rmsprop": {"lr": 0.003, "momentum": 0.9},
    "adagrad": {"lr": 0.1},
    "adam": {"lr": 0.01},
    "adamw": {"lr": 0.01},
    "lars": {
        "lr": 10.0,
        "momentum": 0.9,
        "nesterov": False,
        "lr_schedule": "polynomial",
        "lr_args": {"power": 2},
    },
}
DEFAULT_LR_SCHEDULE = "cosine"
_MOMENTUM_OPTIMIZERS = tuple(name for name, d in OPTIMIZER_DEFAULTS.items() if "momentum" in d)
_NESTEROV_OPTIMIZERS = tuple(name for name, d in OPTIMIZER_DEFAULTS.items() if "nesterov" in d)
WARMUP_EPOCHS = 2.0  # the default warmup, except for onecycle, which rises from its own low start


def _listing(names: typing.Iterable[str]) -> str:
    """``"a, b and c"``."""
    names = list(names)
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def lr_args_defaults(lr_schedule: str, lr: float, optimizer: str) -> dict[str, Any]:
    """What ``--lr-args`` is merged over for ``lr_schedule`` with peak LR ``lr`` under ``optimizer``.

    An optimizer's own default schedule brings its arguments, named or not: lars's polynomial has power 2.
    """
    if lr_schedule == "loss_backoff":
        return {"max_lr": lr}  # --lr is the peak: the LR may climb back to it after a backoff, not past it
    args = dict(LR_ARGS_DEFAULTS.get(lr_schedule, {}))
    own = OPTIMIZER_DEFAULTS[optimizer]
    if own.get("lr_schedule") == lr_schedule:
        args |= own.get("lr_args", {})
    return args


def batch_args_defaults(batch_schedule: str, batch_size: int) -> dict[str, Any]:
    """What ``--batch-args`` is merged over for ``batch_schedule`` starting at ``batch_size``."""
    cap = BATCH_GROWTH * batch_size
    defaults: dict[str, dict[str, Any]] = {
        "step": {"every": "2ep", "max_size": cap},
        "linear": {"end": cap},
        # The batch grows where the LR schedule would decay, and the LR holds (Smith et al. 2018): the
        # other mode, proportional, shrinks the batch with a decaying LR, down to 1 sample.
        "coupled": {"mode": "inverse", "max_size": cap},
        "noise": {"max_size": cap},
    }
    return defaults.get(batch_schedule, {})


def _args_help(what: str, defaults: dict[str, dict[str, Any]], extra: str) -> str:
    listed = "; ".join(f"{name}: {json.dumps(args)}" for name, args in defaults.items())
    return f"other arguments of the {what} schedule as JSON, merged over {listed}{extra}"


NESTEROV_HELP = (
    f"Nesterov momentum, for {_listing(_NESTEROV_OPTIMIZERS)} only (default: on when momentum > 0 for "
    f"{_listing(n for n in _NESTEROV_OPTIMIZERS if OPTIMIZER_DEFAULTS[n]['nesterov'])}; off for "
    f"{_listing(n for n in _NESTEROV_OPTIMIZERS if not OPTIMIZER_DEFAULTS[n]['nesterov'])}, as in MLPerf's "
    "LARS)"
)
LR_ARGS_HELP = _args_help(
    "LR",
    LR_ARGS_DEFAULTS,
    '; loss_backoff: {"max_lr": --lr}; '
    + "; ".join(
        f"{d['lr_schedule']} under --optimizer {name}: {json.dumps(d['lr_args'])}"
        for name, d in OPTIMIZER_DEFAULTS.items()
        if "lr_args" in d
    )
    + '. Lengths in samples, "<x>ep" for x epochs or "<x>%" of the run, '
    'e.g. \'{"every": "10ep", "gamma": 0.5}\' for step; \'total\' defaults to the whole run',
)
BATCH_ARGS_HELP = _args_help(
    "batch",
    {name: batch_args_defaults(name, 32) for name in ("step", "linear", "coupled", "noise")},
    f" (shown for --batch-size 32: the ceilings are {BATCH_GROWTH} x --batch-size; lengths as in --lr-args; "
    "'total' defaults to the whole run; noise also takes beta)",
)
# Settings a resumed run may change: where files go and how fast it runs, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {"out", "resume", "overwrite", "progress", "workers", "threads", "data_dir", "compile"}
)

Backend = Literal["auto", "triton", "cuda", "cpu", "reference"]
assert typing.get_args(Backend) == BACKENDS, "keep Backend in step with resfast.backends.BACKENDS"
# The fused BatchNorm's backends: those with kernels for it (resfast.backends.KERNELS), in
# resfast.backends' order, so a backend that gains BN kernels becomes a choice by itself.
BN_BACKENDS = ("auto", *backends.implementing("batch_norm_add_relu"))


@dataclass
class Config:
    """One training run. The defaults are the README's run: digits, ResNet-20, resfast SGD, warmup +
    cosine LR, a batch size doubling every 2 epochs from 32 to 256; >= 97% test accuracy in well under 3
    minutes on 2 CPU cores (docs/train.md has the measured figures)."""

    # --- data
    dataset: Annotated[
        Literal["digits", "cifar10", "imagefolder", "synthetic"],
        "digits: scikit-learn's 8x8 handwritten digits (no download); cifar10: the python-pickle files "
        "in --data-dir; imagefolder: --data-dir/train and --data-dir/val (or test) class folders; "
        "synthetic: random images and labels (for throughput)",
    ] = "digits"
    data_dir: Annotated[str, "folder of the cifar10 or imagefolder dataset"] = ""
    image_size: Annotated[
        int,
        "side of the square images the model sees, pixels; 0: the dataset's own (digits 8, cifar10 32, "
        "synthetic 32, imagefolder 224)",
    ] = 0
    train_samples: Annotated[int, "train on the first N training samples only; 0: all (synthetic: 10000)"] = 0
    test_samples: Annotated[int, "evaluate on the first N test samples only; 0: all (synthetic: 2000)"] = 0
    augment: Annotated[
        bool,
        "random crops (digits: shifts by up to 1 pixel; cifar10: 4-pixel padding) and, except for "
        "digits, horizontal flips",
    ] = True
    workers: Annotated[int, "DataLoader worker processes for imagefolder (the others are in memory)"] = 0
    # --- model
    model: Annotated[
        Literal[MODELS],  # type: ignore[valid-type]
        "resnet8..110: CIFAR-style ResNet (He et al. 2016); resnet18/34/50: torchvision's",
    ] = "resnet20"
    fuse_bn: Annotated[
        Literal["auto", "on", "off"],
        "fuse every BatchNorm (+ shortcut) + ReLU with resfast.nn.fuse_resnet; auto: on for --impl "
        "resfast on CUDA, and on the CPU where resfast's native CPU kernels are built (else off: the "
        "plain-PyTorch reference kernels are slower than PyTorch's BatchNorm)",
    ] = "auto"
    channels_last: Annotated[bool, "model and inputs in channels_last memory format"] = False
    compile: Annotated[bool, "torch.compile the model"] = False
    # --- optimizer
    optimizer: Annotated[
        Literal[tuple(OPTIMIZER_DEFAULTS)],  # type: ignore[valid-type]
        "the update rule; lars: resfast.optim.LARS (MLPerf's rule) over lars_param_groups (convolution and "
        "linear weights adapted and decayed, BatchNorm params and biases neither), --impl resfast only",
    ] = "sgd"
    impl: Annotated[
        Literal["resfast", "torch"],
        "resfast: resfast.optim (and fused BN); torch: torch.optim and nn.BatchNorm2d, for comparison "
        "(torch.optim has no LARS)",
    ] = "resfast"
    backend: Annotated[Backend, "resfast.optim kernel backend (see resfast.backends.info())"] = "auto"
    bn_backend: Annotated[
        Literal[BN_BACKENDS],  # type: ignore[valid-type]
        "kernel backend of the fused BatchNorm + add + ReLU (those that have its kernels)",
    ] = "auto"
    lr: Annotated[
        float | None,
        "peak learning rate (the LR schedule's base); with --lr-scaling, at --base-batch samples per "
        "step (default: per optimizer: "
        + ", ".join(f"{name} {d['lr']:g}" for name, d in OPTIMIZER_DEFAULTS.items())
        + ")",
    ] = None
    momentum: Annotated[
        float | None,
        "momentum, for "
        + _listing(_MOMENTUM_OPTIMIZERS)
        + " only (default: "
        + ", ".join(f"{name} {d['momentum']:g}" for name, d in OPTIMIZER_DEFAULTS.items() if "momentum" in d)
        + ")",
    ] = None
    nesterov: Annotated[bool | None, NESTEROV_HELP] = None
    weight_decay: Annotated[
        float, "L2 penalty (decoupled for adamw; lars: of the adapted weights only), per step"
    ] = 5e-4
    optimizer_args: Annotated[
        dict[str, Any],
        "other keyword arguments of the optimizer, as JSON, e.g. '{\"betas\": [0.9, 0.99]}' for adam, "
        '\'{"trust_coefficient": 0.002, "eps": 1e-9}\' for lars',
    ] = field(default_factory=dict)
    max_grad_norm: Annotated[
        float | None,
        "clip the gradients to this global L2 norm every step (resfast: the optimizers' max_grad_norm, "
        "inside the fused step; --impl torch: torch.nn.utils.clip_grad_norm_ after unscaling); default: "
        "no clipping",
    ] = None
    label_smoothing: Annotated[float, "label smoothing of the cross-entropy loss, in [0, 1)"] = 0.0
    # --- schedules (lengths in samples unless the name says epochs)
    epochs: Annotated[int, "length of the run, epochs (one epoch: every training sample once)"] = 16
    lr_schedule: Annotated[
        Literal[LR_SCHEDULES] | None,  # type: ignore[valid-type]
        "LR schedule of resfast.schedules; its first argument is --lr, and its 'total' (when it has "
        f"one) the whole run (default: {DEFAULT_LR_SCHEDULE}; "
        + ", ".join(
            f"{d['lr_schedule']} for {name}" for name, d in OPTIMIZER_DEFAULTS.items() if "lr_schedule" in d
        )
        + ")",
    ] = None
    lr_args: Annotated[dict[str, Any], LR_ARGS_HELP] = field(default_factory=dict)
    warmup_epochs: Annotated[
        float | None,
        f"linear LR warmup over the first N epochs (resfast.schedules.Warmup); 0: none (default: "
        f"{WARMUP_EPOCHS:g}, and 0 for onecycle, which rises from --lr / div_factor by itself)",
    ] = None
    warmup_start_factor: Annotated[float, "the warmup starts at this fraction of the scheduled LR"] = 0.1
    batch_size: Annotated[
        int,
        "global batch size (all ranks together), samples per step: the batch schedule's first "
        "argument (start, base or base_size)",
    ] = 32
    batch_schedule: Annotated[
        Literal[BATCH_SCHEDULES],  # type: ignore[valid-type]
        "batch-size schedule of resfast.schedules (step: StepBatch, linear: LinearBatch, coupled: "
        "CoupledBatch on the LR schedule, noise: NoiseScaleBatch, ...)",
    ] = "step"
    batch_args: Annotated[dict[str, Any], BATCH_ARGS_HELP] = field(default_factory=dict)
    lr_scaling: Annotated[
        Literal["none", "linear", "sqrt"],
        "scale the LR by (batch / base_batch) (linear) or its square root (sqrt)",
    ] = "none"
    base_batch: Annotated[int, "batch size at which --lr holds unscaled, samples; 0: --batch-size"] = 0
    eval_batch_size: Annotated[int, "batch size for evaluating the test set, samples per rank"] = 500
    # --- runtime
    amp: Annotated[Literal["none", "bf16", "fp16"], "autocast dtype; fp16 adds a GradScaler"] = "none"
    device: Annotated[Literal["auto", "cpu", "cuda"], "auto: cuda when available, else cpu"] = "auto"
    threads: Annotated[
        int,
        "CPU threads per process (torch.set_num_threads); 0: torch's default (the cores; under "
        "torchrun with several processes, its OMP_NUM_THREADS=1)",
    ] = 0
    seed: Annotated[int, "seed of the weights, the data order and the augmentation"] = 0
    out: Annotated[str, "output folder: metrics.jsonl, summary.json, curves.png, checkpoint.pt"] = (
        "runs/train"
    )
    resume: Annotated[bool, "continue from <out>/checkpoint.pt (written after every epoch)"] = False
    overwrite: Annotated[
        bool, "replace the run in --out, if any (without it, a run refuses to write over another)"
    ] = False
    progress: Annotated[
        bool, "show a progress bar per epoch on stderr (one line per epoch when stderr is not a terminal)"
    ] = True

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("image_size", "train_samples", "test_samples", "workers", "threads", "base_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.dataset in ("cifar10", "imagefolder") and not self.data_dir:
            raise ValueError(f"--dataset {self.dataset} needs --data-dir (the folder that holds it)")
        if self.impl == "torch" and self.fuse_bn == "on":
            raise ValueError("--fuse-bn on needs --impl resfast (--impl torch runs plain PyTorch)")
        if self.impl == "torch" and self.optimizer == "lars":
            raise ValueError(
                "--optimizer lars needs --impl resfast: torch.optim has no LARS (resfast.optim.LARS is "
                "resfast's own)"
            )
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one")
        ignored = [
            f"--{name} {getattr(self, name)}"
            for name, users in (("momentum", _MOMENTUM_OPTIMIZERS), ("nesterov", _NESTEROV_OPTIMIZERS))
            if getattr(self, name) is not None and self.optimizer not in users
        ]
        if ignored:
            warnings.warn(
                f"{' and '.join(ignored)}: ignored by --optimizer {self.optimizer}, which has no such "
                "option (set its own in --optimizer-args, e.g. betas for adam)",
                UserWarning,
                stacklevel=3,  # the caller of Config(...)
            )

    def resolved(self) -> Config:
        """These settings with every default that depends on others filled in (LR, momentum, Nesterov
        and LR schedule per optimizer, warmup per LR schedule), and the options the optimizer ignores
        cleared: what the run uses, its summary shows and its checkpoint records."""
        defaults = OPTIMIZER_DEFAULTS[self.optimizer]
        momentum = None
        if "momentum" in defaults:
            momentum = defaults["momentum"] if self.momentum is None else self.momentum
        nesterov = None
        if "nesterov" in defaults:
            nesterov = (defaults["nesterov"] and bool(momentum)) if self.nesterov is None else self.nesterov
        lr_schedule = self.lr_schedule or defaults.get("lr_schedule", DEFAULT_LR_SCHEDULE)
        warmup = self.warmup_epochs
        if warmup is None:
            warmup = 0.0 if lr_schedule == "onecycle" else WARMUP_EPOCHS
        return dataclasses.replace(
            self,
            lr=defaults["lr"] if self.lr is None else self.lr,
            momentum=momentum,
            nesterov=nesterov,
            lr_schedule=lr_schedule,
            warmup_epochs=warmup,
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings as a dict (checkpoints and the summary record these)."""
        return dataclasses.asdict(self.resolved())


def _optional(hint: Any) -> Any:
    """``X`` for a hint ``X | None``, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a value against a field's type; ints are accepted for floats (TOML writes 1 for 1.0)."""
    if (inner := _optional(hint)) is not None:
        if value is None:
            return None
        hint = inner
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{name} must be one of {', '.join(typing.get_args(hint))}; got {value!r}")
        return value
    origin = typing.get_origin(hint) or hint
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (origin is int and isinstance(value, bool)) or not isinstance(value, origin):
        raise TypeError(f"{name} must be {origin.__name__}, got {value!r} ({type(value).__name__})")
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML file (field names as keys, in any table nesting: tables are flattened).

    A relative ``data_dir`` is taken from the file's folder, so the file works from any directory.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise ImportError("TOML configs need Python >= 3.11 or `pip install tomli`") from e
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    hints = typing.get_type_hints(Config)
    names = [f.name for f in dataclasses.fields(Config)]
    flat: dict[str, Any] = {}

    def walk(table: dict[str, Any], where: str) -> None:
        for key, value in table.items():
            # A table is a section ([data], [optimizer], ...) unless it is the value of a dict setting.
            if isinstance(value, dict) and typing.get_origin(hints.get(key)) is not dict:
                walk(value, f"{where}{key}.")
            elif key in names:
                flat[key] = value
            else:
                raise ValueError(
                    f"config file {path}: unknown setting {where}{key!r}; settings are {', '.join(names)}"
                )

    walk(raw, "")
    if "data_dir" in flat and isinstance(flat["data_dir"], str) and flat["data_dir"]:
        flat["data_dir"] = str(Path(path).parent / Path(flat["data_dir"]).expanduser())
    return flat


def _parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"end\": 256}}': {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train a ResNet with resfast's fused optimizers, fused BatchNorm and sample-clock "
        "schedules. The last line on stdout is the run's summary as one JSON object.",
        argument_default=argparse.SUPPRESS,  # only the flags typed override the TOML file
    )
    parser.add_argument("--config", metavar="TOML", help="TOML file of settings (flags override it)")
    hints = typing.get_type_hints(Config, include_extras=True)
    defaults = Config()
    for f in dataclasses.fields(Config):
        hint, help = hints[f.name].__origin__, hints[f.name].__metadata__[0]
        default = getattr(defaults, f.name)
        hint = _optional(hint) or hint  # None: a default that depends on other settings, as help says
        kwargs: dict[str, Any] = {}
        if typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is dict:
            kwargs.update(type=_parse_json_object, metavar="JSON")
            default = json.dumps(default)  # shown as the user would type it
        else:
            kwargs["type"] = hint
        if default is not None:
            help = f"{help} (default: {default})"
        help = help.replace("%", "%%")  # argparse %-formats help strings
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, help=help, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """The Config of a command line: defaults, then the ``--config`` TOML file, then the flags given."""
    parser = _parser()
    given = vars(parser.parse_args(argv))
    toml_path = given.pop("config", None)
    try:
        settings = load_toml(toml_path) if toml_path else {}
        return Config(**(settings | given))
    except (OSError, TypeError, ValueError) as e:
        parser.error(str(e))
