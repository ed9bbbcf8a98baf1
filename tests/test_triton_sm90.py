"""The Triton kernels as an H100/H200 would run them, checked without a GPU.

tests/triton_sm90.py compiles, for sm_90, every kernel specialisation that the launchers produce for
a representative set of calls (every optimizer case in every dtype, GradScaler, master weights and
stochastic rounding, LARS's two passes; the BN passes in both layouts, all dtypes, odd and even
spatial sizes, training and eval), in a subprocess, and reports each one's registers, stack bytes
and PTX. The CPU interpreter CI runs the kernels in cannot show any of this: it computes `/` and
`sqrt` exactly where the GPU approximates them, and it has no registers to spill. Compiled kernels are
cached by Triton (~/.triton/cache, or TRITON_CACHE_DIR), so a second run takes seconds instead of
about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZER_KERNELS = {
    "_sgd_kernel",
    "_rmsprop_kernel",
    "_adagrad_kernel",
    "_adam_kernel",
    "_lars_norms_kernel",
    "_lars_kernel",
}
BN_KERNELS = {
    "_stats_partial_kernel",
    "_stats_finalize_kernel",
    "_forward_apply_kernel",
    "_grad_partial_kernel",
    "_grad_finalize_kernel",
    "_grad_input_kernel",
}
# The only kernels allowed an approximate instruction, and which: the Welford fold of the BN
# statistics divides once per element with `div.full.f32` (why: resfast/kernels/triton_bn.py,
# _welford_combine). Everything else rounds division and square root as IEEE, as torch does.
ALLOWED_APPROXIMATE = {"_stats_partial_kernel": {"div.full.f32"}, "_stats_finalize_kernel": {"div.full.f32"}}


def _why_not_sm90() -> str | None:
    """None if this Triton can compile for sm_90 here; else why not."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 32))
        tools = [triton.knobs.nvidia.ptxas.path, triton.knobs.nvidia.cuobjdump.path]
    except Exception as e:
        return (
            f"the installed Triton ({triton.__version__}) cannot target sm_90 here: {type(e).__name__}: {e}"
        )
    missing = [tool for tool in tools if not os.path.exists(tool)]
    return f"Triton's CUDA tools are missing: {missing}" if missing else None


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if (why := _why_not_sm90()) is not None:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("sm90") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions
    done = subprocess.run(
        [sys.executable, "-m", "tests.triton_sm90", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def _describe(entry: dict) -> str:
    return f"{entry['kernel']} {entry['pointers']} {entry['constexprs']} num_warps={entry['num_warps']}"


def test_every_specialisation_compiles_for_sm90(kernels: list[dict]) -> None:
    names = {entry["kernel"] for entry in kernels}
    assert names == OPTIMIZER_KERNELS | BN_KERNELS, names
    # Every optimizer case of tests/optim_cases.py in three dtypes, the AMP and low-precision modes,
    # the BN passes: well over a hundred specialisations (255 when written).
    assert len(kernels) > 150
    failed = [f"{_describe(e)}: {e['error']}" for e in kernels if "error" in e]
    assert not failed, "\n".join(failed)


def test_no_kernel_spills_registers(kernels: list[dict]) -> None:
    """Spills and local arrays live on the stack: a stack frame means local-memory traffic."""
    spilled = [f"{_describe(e)}: {e['registers']} registers, {e['stack']} stack bytes" for e in kernels
               if e.get("stack", 0) or e.get("local", 0)]  # fmt: skip
    assert not spilled, "\n".join(spilled)
    assert all(0 < e["registers"] <= 255 for e in kernels if "error" not in e)


def test_division_and_square_root_round_as_ieee(kernels: list[dict]) -> None:
    """No `div.full.f32`, `sqrt.approx` or `rsqrt.approx` (nor flushed denormals that come with them)
    in the optimizer kernels, as in torch's fused CUDA optimizers; in the BN kernels only where
    ALLOWED_APPROXIMATE says."""
    wrong = [
        f"{_describe(e)}: {e['approximate']}"
        for e in kernels
        if set(e.get("approximate", ())) - ALLOWED_APPROXIMATE.get(e["kernel"], set())
    ]
    assert not wrong, "\n".join(wrong)
    assert not [e for e in kernels if e["kernel"] in OPTIMIZER_KERNELS and e.get("ftz")]
