"""Checkpoints a step would misread, refused by ``load_state_dict`` before anything changes."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from resfast.kernels.optim_spec import OptimizerSpec

__all__ = ["check_loaded_state"]


def check_loaded_state(
    state: dict[Any, Any], param_groups: list[dict[str, Any]], defaults: dict[str, Any], spec: OptimizerSpec
) -> None:
    """Refuse a loaded state that a step would silently misread.

    torch loads such a state (or raises halfway, with its state already replaced) and fails or
    broadcasts at the next step, after updating the params before the bad one. resfast refuses it
    here, before anything changes: a state with a step counter must be complete (a `step` or moment
    restarted from zero would skew the bias corrections), `step` must be torch's 0-d tensor or a
    number, and every tensor the kernel updates must have its param's shape. SGD's momentum buffer
    may be absent or None: it then starts from the next gradient, as in torch."""
    params = [(group, p) for group in param_groups for p in group["params"]]
    for index, (group, p) in enumerate(params):
        saved = state.get(p)
        if not saved:
            continue
        where = f"loaded state of parameter {index} (shape {tuple(p.shape)})"
        # An option that a very old checkpoint's group lacks: this optimizer's own default.
        keys = spec.state_keys({**defaults, **group})
        if spec.has_step:
            missing = [key for key in ("step", *keys) if saved.get(key) is None]
            if missing:
                raise ValueError(
                    f"{where} lacks {missing} but has {sorted(saved)}; was it saved by another optimizer "
                    "or with other options?"
                )
            step = saved["step"]
            if isinstance(step, Tensor) and step.dim() != 0:
                raise ValueError(f"{where}: 'step' must be a 0-d tensor, got shape {tuple(step.shape)}")
        for key in keys:
            value = saved.get(key)
            if value is not None and (not isinstance(value, Tensor) or value.shape != p.shape):
                got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{where}: {key!r} has {got}, expected a tensor of the parameter's shape; "
                    "does the checkpoint come from another model?"
                )
