"""The step machinery shared by resfast's optimizers.

Each resfast optimizer subclasses torch.optim's own class of the same name, so construction (every
argument, default and validation error), param groups, hooks, lr schedulers and the state_dict
format are torch's by construction. Only ``step`` is replaced (by :class:`FusedStep`, mixed in
first): per param group it gathers the params that have grads, buckets them by (device, dtype,
backend) and runs ONE kernel call per bucket.

A step runs in two phases so that bad input raises before anything changes: ``_plan`` validates every
group and chooses backends without touching state (or the step cache hands back the group's kernel
calls of the last step, ``_step_cache.py``); then ``_batches`` creates missing state and splits each
bucket into kernel calls, and ``_launch`` runs them. The layout rule is ``_layout.py``, checkpoint
validation ``_checkpoint.py``, each update's contract ``resfast.kernels.optim_spec``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from resfast import backends
from resfast.kernels.optim_spec import OptimizerSpec
from resfast.optim._checkpoint import check_loaded_state
from resfast.optim._layout import PLAIN_TENSOR_TYPES, kernel_view, layouts_fit
from resfast.optim._step_cache import Batch, StepCache


def reject_differentiable(differentiable: bool) -> None:
    if differentiable:
        raise NotImplementedError(
            "resfast optimizers do not support differentiable=True (their fused update is not "
            "differentiable); use torch.optim with differentiable=True for that"
        )


def _count_steps(steps: list[Tensor], found_inf: Tensor | None, kept: dict[str, Any] | None) -> None:
    """Every step counter += 1, except on a step GradScaler skips; on the device, without a host sync.
    `kept`: the store of the kept kernel call the counters belong to (None: a call not kept)."""
    device = steps[0].device
    if (
        not torch.compiler.is_compiling()  # first: dynamo warns about tracing native_runs' cache
        and backends.native_runs(device.type)
        and (found_inf is None or found_inf.device == device)
    ):
        # One native call: torch's foreach add is a loop of dispatched adds on the CPU (~1.3 us per
        # counter), and with found_inf two launches on CUDA.
        backends.kernel_module("optimizer", device.type).count_steps(steps, found_inf, kept)
        return
    torch._foreach_add_(steps, 1)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf.to(device)] * len(steps))


def _grads_norm(param_groups: list[dict[str, Any]]) -> tuple[bool, Tensor | None]:
    """Whether any param of the groups has a grad and, when they are all plain CPU tensors, their L2 norm
    as clip_grad_norm_ computes it, in one native call that reads the grads itself (torch's CPU foreach
    norm is a loop of per-tensor norms, ~3 us each, and a Python walk over the grads ~1 us per grad).
    Else (False or None): the grads take torch's get_total_norm."""
    if torch.compiler.is_compiling() or not backends.native_runs("cpu"):  # first: dynamo warns on the cache
        return True, None
    return backends.kernel_module("optimizer", "cpu").grads_norm([group["params"] for group in param_groups])


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor  # only asked of unusual tensor types: import it late

    return isinstance(t, DTensor)


# Low-precision params (beyond torch): how a bucket's bf16/fp16 params are stored after the update.
MASTER, STOCHASTIC = "master-weight", "stochastic-rounding"


@dataclass
class _Bucket:
    backend: str
    mode: str | None = None  # MASTER, STOCHASTIC or None (plain update)
    params: list[Tensor] = field(default_factory=list)


class FusedStep:
    """Mixin that replaces torch.optim's step with resfast's fused one.

    Subclasses define:
    - ``_spec``: the update's :class:`~resfast.kernels.optim_spec.OptimizerSpec` (its kernel, state
      tensors and step counter);
    - ``_new_state(group, param, key)``: a fresh state tensor, as torch would create it;
    - ``_sparse_grad_error``: torch's message for sparse grads (None: sparse grads are supported, as
      by torch's SGD and Adagrad, and run on the reference backend);
    - ``_update(fn, group, batch, extra)``: call kernel `fn` on a :class:`Batch`, with the keywords
      `extra` (grad_scale, found_inf, grad_clip, master_params, stochastic_seed).
    """

    _sparse_grad_error: str | None = None
    param_groups: list[dict[str, Any]]
    state: dict[Tensor, dict[str, Any]]
    defaults: dict[str, Any]

    def _init_backend(
        self,
        backend: str,
        master_weights: bool = False,
        bf16_stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        """resfast's own options. master_weights: keep an fp32 copy of every bf16/fp16 param in its state
        ("master_param"), update it and store the param rounded from it. bf16_stochastic_rounding:
        no copy; round every updated bf16 param stochastically (unbiased). At most one of the two.
        max_grad_norm: clip the grads inside the update (see :meth:`_grad_clip`)."""
        if master_weights and bf16_stochastic_rounding:
            raise ValueError(
                "master_weights and bf16_stochastic_rounding are alternatives (stochastic rounding replaces "
                "the master copy); choose one"
            )
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool)
            or not isinstance(max_grad_norm, (int, float))
            or not 0 < max_grad_norm < math.inf
        ):
            raise ValueError(
                f"Invalid max_grad_norm value: {max_grad_norm!r} (a finite number > 0, or None: no clipping)"
            )
        self.backend = backends.validate(backend)
        self.master_weights = bool(master_weights)
        self.bf16_stochastic_rounding = bool(bf16_stochastic_rounding)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        # What the last step measured (see grad_norm). A dict, mutated in place: torch.compile replays
        # a traced step's dict writes, while it drops attribute assignments on an optimizer.
        self._measured: dict[str, Tensor | None] = {"grad_norm": None}
        # GradScaler hands us grad_scale/found_inf instead of unscaling and syncing itself.
        self._step_supports_amp_scaling = True

    @property
    def grad_norm(self) -> Tensor | None:
        """The total L2 norm of the grads at the last step that clipped (max_grad_norm), unscaled under
        GradScaler: a device tensor, read without a host sync. None before such a step with grads."""
        return self._measured["grad_norm"]

    def _options(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "master_weights": self.master_weights,
            "bf16_stochastic_rounding": self.bf16_stochastic_rounding,
            "max_grad_norm": self.max_grad_norm,
        }

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults/state/param_groups; resfast's options travel too.
        return {**super().__getstate__(), "resfast_options": self._options()}  # type: ignore[misc]

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "resfast_options" not in state:
            # load_state_dict lands here, after its pre-hooks and casts, with the state keyed by our
            # params: the last point before anything changes (torch's own __setstate__ would already
            # replace the state before it finds, say, a missing `step`).
            check_loaded_state(state["state"], state["param_groups"], self.defaults, self._spec)
        super().__setstate__(state)  # type: ignore[misc]
        self._step_cache().clear()  # the states (and, unpickled, the params) are other tensors now
        # Unpickling brings the options; load_state_dict also lands here, without them: keep ours.
        self._init_backend(**(state.get("resfast_options") or self._options()))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, except that master copies stay fp32 (torch casts every floating
        state to its param's dtype, which would round a master copy to bf16)."""
        masters = {i: s["master_param"] for i, s in state_dict["state"].items() if "master_param" in s}
        super().load_state_dict(state_dict)  # type: ignore[misc]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, master in masters.items():
            p = params[index]
            self.state[p]["master_param"] = master.to(device=p.device, dtype=torch.float32, copy=True)

    # -- phase 1: validate and plan, no side effects -----------------------------------------------

    def _plan(self, group: dict[str, Any]) -> list[_Bucket]:
        # Params of one kind (device, dtype, sparse grad or not) share their bucket: the checks and the
        # backend choice run once per kind, not once per param.
        buckets: dict[tuple, _Bucket] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            kind = (p.device, p.dtype, grad.is_sparse)
            bucket = buckets.get(kind)
            if bucket is None:
                bucket = buckets[kind] = self._new_bucket(group, p, sparse=kind[2])
            bucket.params.append(p)
        return list(buckets.values())

    def _new_bucket(self, group: dict[str, Any], p: Tensor, sparse: bool) -> _Bucket:
        if sparse:
            if self._sparse_grad_error is not None:
                raise RuntimeError(self._sparse_grad_error)
            if group["weight_decay"] != 0:
                # torch's Adagrad raises this once it has counted the step, and its SGD fails on
                # add(sparse, dense); refused here, before anything changes.
                raise RuntimeError("weight_decay option is not compatible with sparse gradients")
            return _Bucket("reference", self._low_precision_mode(p))
        self._check_capturable(group, p)
        return _Bucket(self._choose_backend(p), self._low_precision_mode(p))

    def _low_precision_mode(self, p: Tensor) -> str | None:
        if self.master_weights and p.dtype in (torch.bfloat16, torch.float16):
            return MASTER
        if self.bf16_stochastic_rounding and p.dtype == torch.bfloat16:
            return STOCHASTIC
        return None

    def _choose_backend(self, p: Tensor) -> str:
        mode = self._low_precision_mode(p)
        if mode is None:
            return backends.choose(p.device, kernel_view(p).dtype, self.backend)
        return backends.choose(
            p.device,
            kernel_view(p).dtype,
            self.backend,
            implemented=backends.LOW_PRECISION_BACKENDS,
            op=f"{mode} update",
        )

    def _check_capturable(self, group: dict[str, Any], p: Tensor) -> None:
        # torch raises this for capturable params on devices that cannot be captured (e.g. CPU); not
        # while compiling, where dynamo sets every group's capturable flag (torch skips it too).
        if group.get("capturable") and p.device.type != "cuda" and not torch.compiler.is_compiling():
            raise AssertionError(
                f"If capturable=True, params and state_steps must be on supported devices: ['cuda'], "
                f"got {p.device.type}"
            )

    # -- phase 2: state and update ----------------------------------------------------------------

    def _init_state(
        self,
        group: dict[str, Any],
        p: Tensor,
        state: dict[str, Any],
        keys: tuple[str, ...],
        master: bool,
        step_device: torch.device,
    ) -> bool:
        """Give p's state every tensor the kernel needs (`keys`, and the fp32 copy if `master`), created
        as torch creates them; return whether one was created in this call (SGD starts its momentum).
        `step_device`: where the step counter lives, which the caller knows for the whole bucket."""
        created = False
        if self._has_step:
            step = state.get("step")
            if step is None:
                state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
            elif step.device != step_device:
                # Checkpoints from torch's non-fused optimizers keep `step` on the CPU; resfast, like
                # torch's fused optimizers, keeps it beside the param so no step needs a host sync.
                state["step"] = step.to(step_device)
        for key in keys:
            # None is torch's "no buffer yet" too (torch 1.x SGD saved momentum_buffer=None).
            if state.get(key) is None:
                state[key] = self._new_state(group, p, key)
                created = True
        if master and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)  # same strides as p
        return created

    def _batches(self, group: dict[str, Any], bucket: _Bucket) -> list[Batch]:
        """Create missing state, then split the bucket into kernel calls: its params on its backend,
        except those whose layout a flat kernel cannot take (see fast_layout), which go to the
        reference."""
        keys = self._state_keys(group)
        master = bucket.mode == MASTER
        # SGD without momentum: torch keeps no state at all, not even an empty entry per param.
        stateful = self._has_step or bool(keys) or master
        device, is_complex = bucket.params[0].device, bucket.params[0].dtype.is_complex
        # A meta param has no values (it only carries shapes): its step count stays on the CPU, as torch
        # keeps it, where the reference's bias corrections can read it.
        step_device = device if device.type != "meta" else torch.device("cpu")
        rows, states, fresh = [], [], []
        for p in bucket.params:
            state = self.state[p] if stateful else {}
            fresh.append(self._init_state(group, p, state, keys, master, step_device) if stateful else False)
            states.append(state)
            row = [p, p.grad, *(state[k] for k in keys)]
            plain = not is_complex and type(p) in PLAIN_TENSOR_TYPES
            rows.append(row if plain else [kernel_view(t) for t in row])
        fits = layouts_fit(rows) if bucket.backend != "reference" else [False] * len(rows)
        if master:
            # The fp32 master differs from the param in dtype only: it must share its shape and strides.
            for i, p in enumerate(bucket.params):
                m = states[i]["master_param"]
                fits[i] = fits[i] and m.shape == p.shape and m.stride() == p.stride()
        batches = []
        for backend, wanted in ((bucket.backend, True), ("reference", False)):
            picked = [i for i, fit in enumerate(fits) if fit == wanted]
            if not picked:
                continue
            picked_states = [states[i] for i in picked]
            batches.append(
                Batch(
                    backend=backend,
                    mode=bucket.mode,
                    owners=[bucket.params[i] for i in picked],
                    state_dicts=picked_states,
                    params=[rows[i][0] for i in picked],
                    grads=[rows[i][1] for i in picked],
                    states={k: [rows[i][2 + j] for i in picked] for j, k in enumerate(keys)},
                    steps=[s["step"] for s in picked_states] if self._has_step else [],
                    masters=[kernel_view(s["master_param"]) for s in picked_states] if master else None,
                    fresh=[fresh[i] for i in picked],
                )
            )
        return batches

    def _launch(
        self,
        group: dict[str, Any],
        batch: Batch,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        seed: int | None,
        grad_clip: Tensor | None,
    ) -> None:
        # A call the step cache may keep carries its store (while compiling, the traced graph is the reuse).
        kept = batch.kept if batch.backend != "reference" and not torch.compiler.is_compiling() else None
        if batch.steps:
            _count_steps(batch.steps, found_inf, kept)
        extra = {
            "grad_scale": grad_scale,
            "found_inf": found_inf,
            "grad_clip": grad_clip,
            "master_params": batch.masters,
            "stochastic_seed": seed if batch.mode == STOCHASTIC else None,
        }
        if kept is not None:
            extra["kept"] = kept
        kernels = backends.kernel_module("optimizer", batch.backend)
        self._update(getattr(kernels, self._spec.op), group, batch, extra)

    _spec: OptimizerSpec

    @property
    def _has_step(self) -> bool:
        return self._spec.has_step

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The per-param state tensors the kernel updates, in kernel order."""
        return self._spec.state_keys(group)

    _new_state: Callable[[dict[str, Any], Tensor, str], Tensor]
    _update: Callable[[Callable[..., None], dict[str, Any], Batch, dict[str, Any]], None]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every param with a grad; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if "capturable" in self.defaults:
            # Raises if a CUDA graph is being captured without capturable=True (renamed in torch 2.12).
            check = getattr(self, "_accelerator_graph_capture_health_check", None)
            (check or self._cuda_graph_capture_health_check)()  # type: ignore[attr-defined]
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Phase 1, before anything changes: each group's kernel calls of its last step when they still
        # hold (resfast/optim/_step_cache.py), else its plan, which validates the group.
        # Nothing is cached while torch.compile traces the step: the traced graph is the reuse there.
        cache = None if torch.compiler.is_compiling() else self._step_cache()
        plans: list[list[Batch] | list[_Bucket]] = []
        try:
            for group in self.param_groups:
                batches = None
                if cache is not None:
                    batches = cache.calls(group, self._state_keys(group), self.state)
                plans.append(batches if batches is not None else self._plan(group))
        except BaseException:
            if cache is not None:
                cache.unload()
            raise
        # One seed per step for stochastic rounding, from torch's CPU generator (so torch.manual_seed
        # makes runs repeatable; no device sync). A CUDA graph would replay the captured seed.
        seed = int(torch.randint(0, 2**30, ()).item()) if self.bf16_stochastic_rounding else None
        # The clip factor is computed after every group was validated: it changes nothing but grad_norm.
        grad_clip = self._grad_clip(grad_scale) if self.max_grad_norm is not None else None
        update = self._update_all
        if torch.compiler.is_compiling() and any(b.backend == "triton" for plan in plans for b in plan):
            # The Triton launchers build their work table on the host and cannot be traced: the whole
            # update then runs eagerly, behind one graph break here. A break inside the update's loops
            # would make dynamo compile every function the update calls as a frame of its own (per
            # parameter: warnings, then its recompile limit).
            update = torch.compiler.disable(update)
        update(plans, cache, grad_scale, found_inf, seed, grad_clip)
        return loss

    def _grad_clip(self, grad_scale: Tensor | None) -> Tensor | None:
        """``min(1, max_grad_norm / (norm + 1e-6))`` for the L2 norm of every group's (unscaled) grads, as
        torch.nn.utils.clip_grad_norm_ computes it, as a one-element fp32 tensor that the update kernels
        multiply each grad by: no host sync, and the grads are not written. None without grads."""
        any_grad, norm = _grads_norm(self.param_groups)
        if norm is None and any_grad:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if any(type(g) not in PLAIN_TENSOR_TYPES and _is_dtensor(g) for g in grads):
                # A sharded grad's norm needs its shards' collective reduction: torch's clipping knows
                # how, the fused update does not.
                raise NotImplementedError(
                    "max_grad_norm does not support DTensor grads (e.g. FSDP2's shards); leave"
                    " max_grad_norm=None and call torch.nn.utils.clip_grad_norm_(params, max_norm) before"
                    " step() instead"
                )
            norm = torch.nn.utils.get_total_norm(grads, 2.0) if grads else None
        if norm is None:
            self._measured["grad_norm"] = None
            return None
        if grad_scale is not None:
            norm = norm / grad_scale.to(norm.device)  # GradScaler's scale is a power of two: exact
        self._measured["grad_norm"] = norm
        return (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0).float()

    def _update_all(
        self,
        plans: list[list[Batch] | list[_Bucket]],
        cache: StepCache | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        seed: int | None,
        grad_clip: Tensor | None = None,
    ) -> None:
        clips = {}  # grad_clip on each batch's device, moved once per device
        for group, plan in zip(self.param_groups, plans, strict=True):
            planned = bool(plan) and isinstance(plan[0], _Bucket)
            batches = [b for bucket in plan for b in self._batches(group, bucket)] if planned else plan
            for batch in batches:
                clip = None
                if grad_clip is not None:
                    device = batch.params[0].device
                    clip = clips.get(device)
                    if clip is None:
                        clip = clips[device] = grad_clip.to(device)
                self._launch(group, batch, grad_scale, found_inf, seed, clip)
            if planned and cache is not None:
                cache.keep(group, self._state_keys(group), self.state, batches)

    def _step_cache(self) -> StepCache:
        # Created on first use: torch's __init__ adds the param groups before resfast's options exist.
        cache = self.__dict__.get("_steps")
        if cache is None:
            cache = self.__dict__["_steps"] = StepCache()
        return cache

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        self._step_cache().clear()
