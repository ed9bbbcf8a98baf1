"""The native backends (``cpu``: C++, ``cuda``: CUDA C++) of the optimizer updates.

The ops that ``resfast._C`` registers as ``torch.ops.resfast.*`` (sources in ``csrc/``) behind the
fused backends' front door (:mod:`resfast.kernels.fused_optim`): same signatures and semantics as
:mod:`resfast.kernels.reference_optim`, the same coefficient tables as the Triton backend. Importing
this module loads the extension; ``resfast.backends`` only routes here when it loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

import resfast._C  # noqa: F401  (registers torch.ops.resfast.*)
from resfast.kernels.fused_optim import FusedCall, FusedUpdates

__all__ = ["adagrad", "adam", "count_steps", "launch", "rmsprop", "sgd"]

_ops = torch.ops.resfast


def _register_fakes() -> None:
    """Fake (meta) implementations: the ops only mutate their inputs, so tracing needs nothing else."""
    for name in ("sgd_", "rmsprop_", "adagrad_", "adam_", "count_steps_"):
        torch.library.register_fake(f"resfast::{name}")(lambda *args, **kwargs: None)


_register_fakes()


def count_steps(steps: list[Tensor], found_inf: Tensor | None) -> None:
    """steps[i] += 1 for every one-element CPU step counter, unless found_inf (one element) is nonzero."""
    _ops.count_steps_(steps, found_inf)


def launch(call: FusedCall) -> None:
    """resfast.kernels.fused_optim's Launch: the native op `<op>_`, an absent state as an empty list,
    the options by name (the op schema's)."""
    # The optimizers never route these here (resfast.backends.choose is told the native kernels lack
    # them); a direct caller gets told too rather than a silently plain update.
    if call.master_params is not None or call.stochastic_seed is not None:
        raise NotImplementedError(
            "the native kernels have no master-weight or stochastic-rounding update yet; use the triton or "
            "reference backend"
        )
    lists = [[] if t is None else t for t in call.states]
    op = getattr(_ops, f"{call.spec.op}_")
    op(call.params, call.grads, *lists, call.coef, call.grad_scale, call.found_inf, **call.options)


# The four updates, with resfast.kernels.reference_optim's signatures.
_updates = FusedUpdates(launch)
sgd, rmsprop, adagrad, adam = _updates.sgd, _updates.rmsprop, _updates.adagrad, _updates.adam
