"""The benchmark scripts: each runs end to end in --smoke mode on the CPU; bytes are counted as
documented; unknown names are rejected with the list of choices; and a path whose result differs from
the reference is reported WRONG and never timed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import bench_bn, bench_optim, bench_train, common, run_all

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
CPU = torch.device("cpu")


def _run(script: str, *args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The optimizer smoke run also checks resfast's Triton kernels (interpreted); the others skip
    # them, which keeps them quick (BN kernels under the interpreter take ~0.2 s a call).
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, str(BENCH / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)


def _rows(out: Path, name: str) -> list[dict[str, str]]:
    return common.read_csv(out / common.device_slug(CPU) / f"{name}.csv")


# ----------------------------------------------------------------------------------------------------
# Whole scripts, as CI runs them
# ----------------------------------------------------------------------------------------------------


def _assert_run_ok(result: subprocess.CompletedProcess, rows: list[dict[str, str]], eager_paths) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert rows, "no rows written"
    bad = [(r["path"], r["status"], r["note"]) for r in rows if r["status"] in ("WRONG", "ERROR")]
    assert not bad, bad
    for r in rows:
        assert r["device"] and r["torch"] == torch.__version__ and r["date"], r
        assert float(r["copy_gbps"]) > 0
        if r["path"] in eager_paths:
            # PyTorch's eager baselines exist on every device: they were checked and timed.
            assert r["status"] == "ok" and float(r["ms"]) > 0, r
        if r["status"] == "ok":
            assert float(r["ms_p20"]) <= float(r["ms"]) <= float(r["ms_p80"]), r
    # The summary table is printed after the full one.
    assert result.stdout.rindex("best resfast vs best torch") > result.stdout.rindex("ms (p20-p80)")


def _assert_resfast_rows(rows: list[dict[str, str]], path: str, stdout: str) -> None:
    """resfast's rows ran and passed the check, or resfast.nn is absent and the run says so."""
    mine = [r for r in rows if r["path"] == path]
    assert mine
    if all(r["status"] == "ok" for r in mine):
        return
    assert "resfast.nn not available" in stdout
    assert all(r["status"] == "SKIP" and "resfast.nn not available" in r["note"] for r in mine)


def test_bench_optim_smoke(tmp_path):
    result = _run("bench_optim.py", "--smoke", "--device", "cpu", "--out", str(tmp_path), interpret=True)
    rows = _rows(tmp_path, "optim")
    _assert_run_ok(result, rows, ("torch-forloop", "torch-foreach"))
    fused = [r for r in rows if r["path"] == "torch-fused"]
    assert all(r["status"] == "ok" or "has no fused" in r["note"] for r in fused)
    assert {r["optimizer"] for r in fused if r["status"] == "SKIP"} <= {"RMSprop"}
    assert {r["optimizer"] for r in rows} == {s.label for s in bench_optim.OPTIMIZERS.values()}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    # resfast's spec and its Triton kernels (interpreted) both agree with the reference and are timed.
    for path in ("resfast-reference", "resfast-triton"):
        assert all(r["status"] == "ok" and float(r["gbps"]) > 0 for r in rows if r["path"] == path), path
    # torch.compile is skipped on the CPU, and the row says why.
    assert all(r["status"] == "SKIP" and "compile" in r["note"] for r in rows if r["path"] == "torch-compile")
    assert (tmp_path / common.device_slug(CPU) / "optim.png").stat().st_size > 1000


def test_bench_bn_smoke(tmp_path):
    result = _run("bench_bn.py", "--smoke", "--device", "cpu", "--out", str(tmp_path))
    rows = _rows(tmp_path, "bn")
    _assert_run_ok(result, rows, ("torch-eager",))
    assert {(r["layout"], r["dtype"], r["residual"], r["mode"]) for r in rows} == {
        (lay, dt, res, mode)
        for lay in bench_bn.LAYOUTS
        for dt in ("fp32", "bf16")
        for res in bench_bn.RESIDUALS
        for mode in bench_bn.MODES
    }
    _assert_resfast_rows(rows, "resfast-reference", result.stdout)


def test_bench_train_smoke(tmp_path):
    result = _run("bench_train.py", "--smoke", "--device", "cpu", "--out", str(tmp_path))
    rows = _rows(tmp_path, "train")
    _assert_run_ok(result, rows, ("torch",))
    torch_row = next(r for r in rows if r["path"] == "torch")
    assert math.isclose(
        float(torch_row["img_s"]), int(torch_row["batch"]) * 1e3 / float(torch_row["ms"]), rel_tol=1e-4
    )
    assert next(r for r in rows if r["path"] == "resfast-sgd")["status"] == "ok"
    _assert_resfast_rows(rows, "resfast", result.stdout)


def test_run_all_runs_a_bench_then_prints_its_tables(tmp_path):
    # Options run_all does not know (--tag, --layout) go to the scripts.
    args = [
        "--smoke",
        "--device",
        "cpu",
        "--bench",
        "bn",
        "--out",
        str(tmp_path),
        "--tag",
        "t1",
        "--layout",
        "nchw",
    ]
    result = _run("run_all.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = common.read_csv(tmp_path / common.device_slug(CPU) / "bn-t1.csv")
    assert {r["layout"] for r in rows} == {"nchw"}
    assert sorted(p.name for p in (tmp_path / common.device_slug(CPU)).iterdir()) == [
        "bn-t1.csv",
        "bn-t1.png",
    ]
    tail = result.stdout[result.stdout.rindex("## bn") :]
    assert "best resfast vs best torch" in tail and "bench_bn: ok" in tail
    # --report prints the same tables from the CSVs alone, and fails where there are none.
    report = _run("run_all.py", "--report", str(tmp_path))
    assert report.returncode == 0 and "## bn" in report.stdout and "torch-eager" in report.stdout
    assert _run("run_all.py", "--report", str(tmp_path / "empty")).returncode != 0


# ----------------------------------------------------------------------------------------------------
# Command line: unknown names list the choices
# ----------------------------------------------------------------------------------------------------

BAD_ARGS = [
    (bench_optim, ["--optimizer", "adamm"], ["adamm", "sgd, rmsprop, adagrad, adam, adamw"]),
    (bench_optim, ["--params", "resnet99"], ["resnet99", "resnet18", "resnet50", "cifar-resnet20", "flat"]),
    (bench_optim, ["--paths", "torch-fast"], ["torch-fast", "torch-forloop", "resfast-triton"]),
    (bench_optim, ["--device", "tpu"], ["tpu", "cpu, cuda, cuda:N"]),
    (bench_optim, ["--dtype", "fp8"], ["fp8", "float32, bfloat16, float16"]),
    (bench_bn, ["--shape", "1x2x3x4"], ["1x2x3x4", "256x256x56x56", "512x64x32x32"]),
    (bench_bn, ["--layout", "nhwc"], ["nhwc", "nchw, channels_last"]),
    (bench_bn, ["--mode", "bwd"], ["bwd", "fwd, fwd+bwd"]),
    (bench_bn, ["--tag", "a/b"], ["a/b", "letters, digits"]),
    (bench_train, ["--model", "vgg16"], ["vgg16", "resnet18, resnet50"]),
    (bench_train, ["--dtype", "fp16"], ["float16", "bfloat16, float32"]),
    (run_all, ["--bench", "nope"], ["nope", "optim, bn, train"]),
]


@pytest.mark.parametrize(
    ("module", "argv", "expected"), BAD_ARGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_unknown_names_list_the_choices(module, argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, (text, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit):
        bench_optim.parse_args(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_choices_are_case_insensitive_deduplicated_and_all():
    assert common.parse_choices("Adam,adam,SGD", ("sgd", "adam"), "x") == ["adam", "sgd"]
    assert common.parse_choices("all", ("a", "b"), "x") == ["a", "b"]
    assert common.parse_choices("bf16,fp32", tuple(common.DTYPES), "dtype", common.DTYPE_ALIASES) == [
        "bfloat16",
        "float32",
    ]
    with pytest.raises(ValueError, match="choose from: a, b"):
        common.parse_choices("", ("a", "b"), "x")


def test_smoke_results_never_default_to_the_committed_folder():
    assert bench_optim.parse_args(["--smoke", "--device", "cpu"]).out != common.RESULTS
    assert bench_optim.parse_args(["--device", "cpu"]).out == common.RESULTS


# ----------------------------------------------------------------------------------------------------
# Byte counting and parameter lists
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "per_param"), [("sgd", 20), ("rmsprop", 20), ("adagrad", 20), ("adam", 28), ("adamw", 28)]
)
def test_optimizer_bytes_per_param(name, per_param):
    spec = bench_optim.OPTIMIZERS[name]
    assert bench_optim.step_bytes(spec, 1000, torch.float32) == per_param * 1000
    assert bench_optim.step_bytes(spec, 1000, torch.bfloat16) == per_param * 1000 // 2


@pytest.mark.parametrize("name", list(bench_optim.OPTIMIZERS))
def test_counted_states_are_the_ones_torch_keeps(name):
    """The byte count relies on the `states` table: it must list exactly torch's per-element state."""
    spec = bench_optim.OPTIMIZERS[name]
    p = torch.ones(4, requires_grad=True)
    p.grad = torch.ones(4)
    opt = getattr(torch.optim, spec.cls)([p], **spec.kwargs)
    opt.step()
    per_element = {k for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.shape == p.shape}
    assert per_element == set(spec.states)


@pytest.mark.parametrize(
    ("residual", "backward", "passes"),
    [(True, False, 3), (False, False, 2), (True, True, 6), (False, True, 4)],
)
def test_bn_bytes(residual, backward, passes):
    assert bench_bn.bn_bytes(1000, torch.float32, residual, backward) == passes * 4000
    assert bench_bn.bn_bytes(1000, torch.bfloat16, residual, backward) == passes * 2000


def test_bandwidth_units():
    assert common.gbps(2_000_000_000, 1000.0) == pytest.approx(2.0)  # 2e9 bytes in one second
    assert common.gbps(3_000_000, 1.0) == pytest.approx(3.0)
    assert common.elementwise_bytes(10, 4, reads=3, writes=2) == 200


def test_parameter_lists():
    tv = pytest.importorskip("torchvision")
    r50 = bench_optim.PARAM_SETS["resnet50"]()
    assert len(r50.shapes) == 161
    assert sum(math.prod(s) for s in r50.shapes) == bench_optim.RESNET50_NUMEL == 25_557_032
    assert bench_optim.PARAM_SETS["flat"]().shapes == [(bench_optim.RESNET50_NUMEL,)]
    r18 = bench_optim.PARAM_SETS["resnet18"]()
    assert r18.shapes == [tuple(p.shape) for p in tv.models.resnet18().parameters()]
    local = bench_optim.resnet20_shapes()
    assert (len(local), sum(math.prod(s) for s in local)) == (59, 269_722)  # He et al.: 0.27M
    cifar, _ = common.optional_attr("resfast.nn.cifar", "resnet20")
    if cifar is not None:
        assert local == [tuple(p.shape) for p in cifar().parameters()]


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def test_cpu_timing_is_a_median_with_its_spread_and_resets_grads():
    x = torch.zeros(2, requires_grad=True)
    calls = []

    def fn() -> None:
        assert x.grad is None  # reset before every call, warm-up included
        x.grad = torch.ones(2)
        calls.append(1)
        time.sleep(0.002)

    budget = common.Budget(warmup_calls=2, cpu_seconds=0.0, cpu_min_reps=7, cpu_flush_bytes=1 << 20)
    t = common.bench(fn, CPU, budget, grad_to_none=[x])
    assert len(calls) == 2 + 7
    assert 2.0 <= t.p20 <= t.ms <= t.p80 < 200


def test_copy_bandwidth_is_positive_and_counts_read_plus_write():
    assert common.copy_bandwidth(CPU, smoke=True) > 0


def test_errors_never_pass_nan_or_a_shape_mismatch():
    a = torch.ones(4)
    assert common.max_rel_err(a, a) == common.l2_rel_err(a, a) == 0.0
    assert common.max_rel_err(a * 1.01, a) == pytest.approx(0.01, rel=1e-3)
    nan = a.clone()
    nan[1] = float("nan")
    for err in (common.max_rel_err, common.l2_rel_err):
        assert err(nan, a) == math.inf and err(a, nan) == math.inf and err(a[:3], a) == math.inf
    assert common.failures({"y": math.inf}, {"y": 1.0}) is not None
    assert common.failures({"y": 0.5}, {"y": 1.0}) is None


def test_speedups_are_over_the_fastest_correct_pytorch_path():
    rows = [
        {"path": "torch-a", "status": "ok", "ms": 2.0},
        {"path": "torch-b", "status": "ok", "ms": 3.0},
        {"path": "torch-c", "status": "WRONG"},
        {"path": "resfast-x", "status": "ok", "ms": 0.5},
        {"path": "resfast-y", "status": "WRONG"},
    ]
    common.add_speedups(rows, {"torch-a", "torch-b", "torch-c"})
    assert [r.get("speedup") for r in rows] == [1.0, 2.0 / 3.0, None, 4.0, None]
    assert rows[3]["best_torch"] == "torch-a"
    table = common.summary_table(rows, common.Summary(("path",), common.ms_pct_cell))
    assert "WRONG" in table and "4.00x (resfast-x vs torch-a)" in table


def test_evaluate_outcomes():
    def trial(check_result=None, raises=None):
        def build():
            if raises:
                raise raises
            return common.Trial(
                step=lambda: pytest.fail("a wrong path was timed"), check=lambda: check_result
            )

        return common.evaluate(build, CPU, common.Budget().smoke())

    assert trial(raises=common.Skip("not here")).status == "SKIP"
    assert trial(raises=NotImplementedError("no kernel")).status == "SKIP"
    errored = trial(raises=RuntimeError("boom"))
    assert errored.status == "ERROR" and "boom" in errored.note
    wrong = trial(check_result="y differs")
    assert (wrong.status, wrong.note, wrong.timing) == ("WRONG", "y differs", None)


# ----------------------------------------------------------------------------------------------------
# The check refuses wrong paths, in each benchmark
# ----------------------------------------------------------------------------------------------------


def _timed_paths(monkeypatch) -> list:
    """Record which steps get timed (and time nothing)."""
    timed: list = []

    def fake_bench(fn, device, budget, grad_to_none=()):
        timed.append(fn)
        return common.Timing(1.0, 0.9, 1.1)

    monkeypatch.setattr(common, "bench", fake_bench)
    return timed


def _status(rows: list[dict], path: str) -> dict:
    return next(r for r in rows if r["path"] == path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optim_wrong_paths_are_reported_and_not_timed(dtype, monkeypatch):
    timed = _timed_paths(monkeypatch)
    adam = bench_optim.OPTIMIZERS["adam"]
    case = bench_optim.make_case(adam, "tiny", bench_optim.PARAM_SETS["tiny"](), dtype, CPU)
    ctx = common.Context(CPU, smoke=True, compile_skip="off")

    def lr_off(spec, params, ctx):  # a plausible kernel bug: the learning rate 20% off
        return bench_optim._torch(spec, params, ctx, foreach=False, lr=spec.kwargs["lr"] * 1.2)

    def no_second_moment(spec, params, ctx):  # AdamW's update with Adam's state missing a tensor
        return bench_optim.BUILDERS["torch-forloop"](bench_optim.OPTIMIZERS["sgd"], params, ctx)

    builders = {
        "torch-forloop": bench_optim.BUILDERS["torch-forloop"],
        "lr-off": lr_off,
        "sgd": no_second_moment,
    }
    rows = bench_optim.run_case(case, builders, ctx, common.Budget().smoke(), copy_gbps=1.0)
    assert _status(rows, "torch-forloop")["status"] == "ok"
    for name in ("lr-off", "sgd"):
        row = _status(rows, name)
        assert row["status"] == "WRONG" and "ms" not in row and "differ" in row["note"], row
    assert len(timed) == 1


def test_bn_wrong_paths_are_reported_and_not_timed(monkeypatch):
    timed = _timed_paths(monkeypatch)
    ctx = common.Context(CPU, smoke=True, compile_skip="off")

    def no_residual(ctx, dtype):
        return (lambda x, r, rm, rv, w, b: bench_bn.eager(x, None, rm, rv, w, b)), lambda: ""

    def eval_stats(ctx, dtype):  # normalises with the running stats instead of the batch's
        op = lambda x, r, rm, rv, w, b: torch.relu(torch.nn.functional.batch_norm(x, rm, rv, w, b, False) + r)  # noqa: E731
        return op, lambda: ""

    builders = {
        "torch-eager": bench_bn.BUILDERS["torch-eager"],
        "no-residual": no_residual,
        "eval": eval_stats,
    }
    for case in bench_bn.make_cases("3x5x7x5", "channels_last", torch.bfloat16, True, bench_bn.MODES, CPU):
        rows = bench_bn.run_case(case, builders, ctx, common.Budget().smoke(), copy_gbps=1.0)
        assert _status(rows, "torch-eager")["status"] == "ok"
        assert _status(rows, "no-residual")["status"] == "WRONG"
        assert _status(rows, "eval")["status"] == "WRONG"
    assert len(timed) == 2  # eager, once per mode


def test_train_wrong_paths_are_reported_and_not_timed(monkeypatch):
    timed = _timed_paths(monkeypatch)
    case = bench_train.make_case("resnet18", 4, torch.bfloat16, CPU)
    real_optimizer, real_model = bench_train.new_optimizer, bench_train.build_model

    def optimizer(kind, model, foreach_reference=False):
        if kind == "resfast":  # an optimizer bug: momentum 0.88 instead of 0.9
            return torch.optim.SGD(model.parameters(), **{**bench_train.SGD_ARGS, "momentum": 0.88})
        return real_optimizer(kind, model, foreach_reference)

    def model(spec, weights, device, fuse):
        built = real_model(spec, weights, device, fuse=False)
        return built.eval() if fuse else built  # a model bug: BN uses running stats in training

    monkeypatch.setattr(bench_train, "new_optimizer", optimizer)
    monkeypatch.setattr(bench_train, "build_model", model)
    paths = {"torch": bench_train.PATHS["torch"], "bad-sgd": bench_train.PATHS["resfast-sgd"]}
    paths["bad-model"] = bench_train.PathSpec(fuse=True, optimizer="torch", compile=False)
    ctx = common.Context(CPU, smoke=True, compile_skip="off")
    rows = bench_train.run_case(case, paths, ctx, common.Budget().smoke(), copy_gbps=1.0)
    assert _status(rows, "torch")["status"] == "ok"
    assert _status(rows, "bad-sgd")["status"] == "WRONG" and "update" in _status(rows, "bad-sgd")["note"]
    assert _status(rows, "bad-model")["status"] == "WRONG" and "logits" in _status(rows, "bad-model")["note"]
    assert len(timed) == 1
