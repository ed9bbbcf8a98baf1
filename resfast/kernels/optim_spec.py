"""The contract of each fused optimizer update, declared once: which state tensors it updates (in the
order every kernel takes them), which per-tensor coefficients it reads (in the order of the
coefficient table's columns), and whether it keeps a step counter.

Everything else derives from this: the optimizers' state keys (:mod:`resfast.optim`), the coefficient
tables (:mod:`resfast.kernels.optim_coef`), the tensor lists and flags every fused backend receives
(:mod:`resfast.kernels.fused_optim`), the column offsets the Triton kernels read
(:mod:`resfast.kernels.triton_optim`). The native kernels declare the same columns in C++
(``csrc/optim_math.h``, each maths' ``Column`` enum and ``kColumnNames``), exported as
``resfast._C.COEF_COLUMNS``, and the native ops' schemas name the same state lists and options;
``tests/test_optim_spec.py`` checks that both sides agree, so adding a column to one and not the
other fails a test instead of making a kernel read the wrong row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ADAM_WEIGHT_DECAY", "SPECS", "OptimizerSpec", "StateTensor"]


def _always(group: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class StateTensor:
    """A per-parameter state tensor the update reads and writes (torch's state key), present when
    `present(group)` holds for a param group's options."""

    key: str
    present: Callable[[Mapping[str, Any]], bool] = _always
    # For an optional state: the kernel flag that says it is there (a Triton constexpr; the native ops
    # see an empty list instead).
    flag: str | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    op: str  # the update's name: the function of every kernel module, the native op `<op>_`
    states: tuple[StateTensor, ...]  # after param and grad, in kernel order
    columns: tuple[str, ...]  # the coefficient table's columns, in order
    has_step: bool  # whether the state holds torch's `step` counter
    options: tuple[str, ...]  # the kernels' flags, in the native op's argument order

    def state_keys(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        """The state tensors a group with these options updates, in kernel order."""
        return tuple(s.key for s in self.states if s.present(group))

    def column(self, name: str) -> int:
        """The index of coefficient column `name`."""
        return self.columns.index(name)


SPECS: dict[str, OptimizerSpec] = {
    spec.op: spec
    for spec in (
        OptimizerSpec(
            op="sgd",
            states=(StateTensor("momentum_buffer", lambda g: g["momentum"] != 0, "has_momentum"),),
            # fresh: 1.0 on a momentum buffer's first step, which starts as the gradient itself
            columns=("lr", "weight_decay", "momentum", "one_minus_dampening", "fresh"),
            has_step=False,
            options=("has_wd", "nesterov", "maximize"),
        ),
        OptimizerSpec(
            op="rmsprop",
            states=(
                StateTensor("square_avg"),
                StateTensor("grad_avg", lambda g: g["centered"], "centered"),
                StateTensor("momentum_buffer", lambda g: g["momentum"] > 0, "has_momentum"),
            ),
            columns=("lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum"),
            has_step=True,
            options=("has_wd", "maximize"),
        ),
        OptimizerSpec(
            op="adagrad",
            states=(StateTensor("sum"),),
            # clr = lr / (1 + (step - 1) * lr_decay)
            columns=("clr", "weight_decay", "eps"),
            has_step=True,
            options=("has_wd", "maximize"),
        ),
        OptimizerSpec(
            op="adam",
            states=(
                StateTensor("exp_avg"),
                StateTensor("exp_avg_sq"),
                StateTensor("max_exp_avg_sq", lambda g: g["amsgrad"], "amsgrad"),
            ),
            # step_size = lr / (1 - beta1^step), sqrt_bias_correction2 = sqrt(1 - beta2^step);
            # weight_decay_term: the decay (ADAM_WEIGHT_DECAY["l2"]) or 1 - lr * decay ("decoupled")
            columns=(
                "step_size",
                "sqrt_bias_correction2",
                "one_minus_beta1",
                "beta2",
                "one_minus_beta2",
                "eps",
                "weight_decay_term",
            ),
            has_step=True,
            options=("wd_mode", "maximize"),  # wd_mode: ADAM_WEIGHT_DECAY's values
        ),
        OptimizerSpec(
            op="lars",
            # Zeros before the first step (the buffer holds lr-scaled updates, so no "fresh" start).
            states=(StateTensor("momentum_buffer"),),
            # The trust ratio is not a column: it comes from each tensor's norms, computed on the device
            # at every step (by a norm pass before the update, where the backend has one).
            columns=("lr", "momentum", "weight_decay", "trust_coefficient", "eps"),
            has_step=False,
            options=("has_wd", "lars_adaptation", "nesterov", "maximize"),
        ),
    )
}

# How Adam's kernels apply weight decay (their `wd_mode` argument); csrc/optim_math.h's AdamMath has the
# same values (exported as resfast._C.ADAM_WEIGHT_DECAY).
ADAM_WEIGHT_DECAY = {"none": 0, "l2": 1, "decoupled": 2}
