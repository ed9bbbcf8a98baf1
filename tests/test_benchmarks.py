"""The benchmark scripts: each runs end to end in --smoke mode on the CPU; bytes are counted as
documented; unknown names are rejected with the list of choices; and a path whose result differs from
the reference is reported WRONG and never timed."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import resfast.optim
from benchmarks import bench_bn, bench_optim, bench_train, run_all
from benchmarks.common import cli, context, correctness, paths, reliability, results, table, timing
from benchmarks.common.env import Env, device_slug
from benchmarks.common.rows import add_speedups

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
    return results.read_csv(out / device_slug(CPU) / f"{name}.csv")


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
    # torch.optim has no LARS: its torch rows say so; every other optimizer has torch's eager paths.
    lars = [r for r in rows if r["optimizer"] == "LARS" and r["path"] in ("torch-forloop", "torch-foreach")]
    assert lars and all(r["status"] == "SKIP" and "torch.optim has no LARS" in r["note"] for r in lars)
    _assert_run_ok(result, [r for r in rows if r["optimizer"] != "LARS"], ("torch-forloop", "torch-foreach"))
    fused = [r for r in rows if r["path"] == "torch-fused" and r["optimizer"] != "LARS"]
    assert all(r["status"] == "ok" or "has no fused" in r["note"] for r in fused)
    assert {r["optimizer"] for r in fused if r["status"] == "SKIP"} <= {"RMSprop"}
    assert {r["optimizer"] for r in rows} == {s.label for s in bench_optim.OPTIMIZERS.values()}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    # resfast's spec and its Triton kernels (interpreted) both agree with the reference and are timed.
    for path in ("resfast-reference", "resfast-triton"):
        assert all(r["status"] == "ok" and float(r["gbps"]) > 0 for r in rows if r["path"] == path), path
    # torch.compile is skipped on the CPU, and the row says why.
    assert all(r["status"] == "SKIP" and "compile" in r["note"] for r in rows if r["path"] == "torch-compile")
    assert (tmp_path / device_slug(CPU) / "optim.png").stat().st_size > 1000
    # The host-time table: torch's foreach and fused steps and resfast's backends for every
    # optimizer, each checked and timed; RMSprop's fused row is torch's fused Adagrad and says so.
    host = _rows(tmp_path, "optim_host")
    assert {r["optimizer"] for r in host} == {s.label for s in bench_optim.OPTIMIZERS.values()}
    assert {r["path"] for r in host} == set(bench_optim.HOST_PATHS) - {"resfast-cuda"}
    assert all(r["n_tensors"] == r["numel"] == "5" and r["dtype"] == "fp32" for r in host)
    for r in host:
        torch_has_none = r["optimizer"] == "LARS" and r["path"] == "torch-foreach"
        assert r["status"] == "ok" or (
            (r["path"] == "resfast-cpu" or torch_has_none) and r["status"] == "SKIP"
        ), r
        assert r["status"] != "ok" or (float(r["ms"]) > 0 and r["reliable"] and r["load"]), r
    rmsprop_fused = next(r for r in host if (r["optimizer"], r["path"]) == ("RMSprop", "torch-fused"))
    assert "Adagrad" in rmsprop_fused["note"]
    lars_fused = next(r for r in host if (r["optimizer"], r["path"]) == ("LARS", "torch-fused"))
    assert lars_fused["status"] == "ok" and "SGD" in lars_fused["note"]
    assert "| optimizer | torch-foreach | torch-fused | resfast-triton |" in result.stdout
    assert result.stdout.rindex("best resfast vs best torch") > result.stdout.rindex("µs (p20-p80)")
    # run_all --report prints both tables of the run.
    assert run_all.report(tmp_path, ["optim"]) == 2


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


def test_fused_bn_ab_smoke():
    """One row per dtype x layout with both models' throughput and the ratio of their medians."""
    argv = ["--device", "cpu", "--model", "resnet8", "--batch", "4", "--image", "8", "--rounds", "2"]
    result = _run("fused_bn_ab.py", *argv, "--warmup", "0", "--dtype", "fp32,bf16", "--layout", "nchw")
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| resnet8 ")]
    assert [cells[3].strip() for cells in rows] == ["fp32", "bf16"]
    for cells in rows:
        unfused, fused, speedup = (float(cells[i].split()[0].rstrip("x")) for i in (5, 6, 7))
        assert unfused > 0 and fused > 0 and speedup > 0


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
    rows = results.read_csv(tmp_path / device_slug(CPU) / "bn-t1.csv")
    assert {r["layout"] for r in rows} == {"nchw"}
    assert sorted(p.name for p in (tmp_path / device_slug(CPU)).iterdir()) == [
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
    (bench_optim, ["--optimizer", "adamm"], ["adamm", "sgd, rmsprop, adagrad, adam, adamw, lars, sgd-clip"]),
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
    assert cli.parse_choices("Adam,adam,SGD", ("sgd", "adam"), "x") == ["adam", "sgd"]
    assert cli.parse_choices("all", ("a", "b"), "x") == ["a", "b"]
    assert cli.parse_choices("bf16,fp32", tuple(cli.DTYPES), "dtype", cli.DTYPE_ALIASES) == [
        "bfloat16",
        "float32",
    ]
    with pytest.raises(ValueError, match="choose from: a, b"):
        cli.parse_choices("", ("a", "b"), "x")


def test_smoke_results_never_default_to_the_committed_folder():
    assert bench_optim.parse_args(["--smoke", "--device", "cpu"]).out != cli.RESULTS
    assert bench_optim.parse_args(["--device", "cpu"]).out == cli.RESULTS


# ----------------------------------------------------------------------------------------------------
# Byte counting and parameter lists
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "per_param"),
    # LARS: SGD-momentum's bytes and one more read of param and grad (the norms); clipping: one more
    # read of the grad (the global norm).
    [
        ("sgd", 20),
        ("rmsprop", 20),
        ("adagrad", 20),
        ("adam", 28),
        ("adamw", 28),
        ("lars", 28),
        ("sgd-clip", 24),
        ("adam-clip", 32),
    ],
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
    # LARS is not in torch.optim: resfast's keeps the state torch's SGD would.
    opt = getattr(torch.optim if spec.cls != "LARS" else resfast.optim, spec.cls)([p], **spec.kwargs)
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
    assert timing.gbps(2_000_000_000, 1000.0) == pytest.approx(2.0)  # 2e9 bytes in one second
    assert timing.gbps(3_000_000, 1.0) == pytest.approx(3.0)
    assert timing.elementwise_bytes(10, 4, reads=3, writes=2) == 200


def test_parameter_lists():
    tv = pytest.importorskip("torchvision")
    r50 = bench_optim.PARAM_SETS["resnet50"]()
    assert len(r50.shapes) == bench_optim.RESNET50_TENSORS == 161
    assert sum(math.prod(s) for s in r50.shapes) == bench_optim.RESNET50_NUMEL == 25_557_032
    assert bench_optim.PARAM_SETS["flat"]().shapes == [(bench_optim.RESNET50_NUMEL,)]
    r18 = bench_optim.PARAM_SETS["resnet18"]()
    assert r18.shapes == [tuple(p.shape) for p in tv.models.resnet18().parameters()]
    r20 = bench_optim.PARAM_SETS["cifar-resnet20"]().shapes
    assert (len(r20), sum(math.prod(s) for s in r20)) == (59, 269_722)  # He et al. 2016: 0.27M


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

    budget = timing.Budget(warmup_calls=2, cpu_seconds=0.0, cpu_min_reps=7, cpu_flush_bytes=1 << 20)
    t = timing.bench(fn, CPU, budget, grad_to_none=[x])
    assert len(calls) == 2 + 7
    assert 2.0 <= t.p20 <= t.ms <= t.p80 < 200


def test_host_timing_times_batches_of_calls():
    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.001)

    budget = timing.Budget(warmup_calls=1, cpu_seconds=0.0, cpu_min_reps=4, host_calls=3)
    t = timing.bench(fn, CPU, budget)
    assert len(calls) == 1 + 4 * 3
    assert 1.0 <= t.p20 <= t.ms <= t.p80 < 100  # per call, not per batch of 3


def test_copy_bandwidth_is_positive_and_counts_read_plus_write():
    gbps, spread = timing.copy_bandwidth(CPU, smoke=True)
    assert gbps > 0 and spread >= 0


def test_errors_never_pass_nan_or_a_shape_mismatch():
    a = torch.ones(4)
    assert correctness.max_rel_err(a, a) == correctness.l2_rel_err(a, a) == 0.0
    assert correctness.max_rel_err(a * 1.01, a) == pytest.approx(0.01, rel=1e-3)
    nan = a.clone()
    nan[1] = float("nan")
    for err in (correctness.max_rel_err, correctness.l2_rel_err):
        assert err(nan, a) == math.inf and err(a, nan) == math.inf and err(a[:3], a) == math.inf
    assert correctness.failures({"y": math.inf}, {"y": 1.0}) is not None
    assert correctness.failures({"y": 0.5}, {"y": 1.0}) is None


def test_speedups_are_over_the_fastest_correct_pytorch_path():
    rows = [
        {"path": "torch-a", "status": "ok", "ms": 2.0},
        {"path": "torch-b", "status": "ok", "ms": 3.0},
        {"path": "torch-c", "status": "WRONG"},
        {"path": "resfast-x", "status": "ok", "ms": 0.5},
        {"path": "resfast-y", "status": "WRONG"},
    ]
    add_speedups(rows, {"torch-a", "torch-b", "torch-c"})
    assert [r.get("speedup") for r in rows] == [1.0, 2.0 / 3.0, None, 4.0, None]
    assert rows[3]["best_torch"] == "torch-a"
    text = table.summary_table(rows, table.Summary(("path",), table.ms_pct_cell))
    assert "WRONG" in text and "4.00x (resfast-x vs torch-a)" in text


# ----------------------------------------------------------------------------------------------------
# Reliability: which figures are shown (synthetic timings)
# ----------------------------------------------------------------------------------------------------


def _timed(path: str, ms: float, p20: float, p80: float, load: float = 0.5) -> dict:
    return {"path": path, "status": "ok", "ms": ms, "ms_p20": p20, "ms_p80": p80, "load": load}


def _marked(rows: list[dict], ncores: int = 2) -> list[dict]:
    add_speedups(rows, {"torch-a", "torch-b"})
    reliability.mark(rows, ncores)
    return rows


def test_a_quiet_narrow_row_is_reliable_and_a_wide_or_loaded_one_is_not():
    limit = reliability.SPREAD_LIMIT
    quiet, wide, loaded, failed = _marked(
        [
            _timed("torch-a", 1.0, 1.0 - limit / 2, 1.0 + limit / 2),  # exactly at the limit
            _timed("torch-b", 4.27, 2.45, 92.2),  # seen on a busy 2-core machine
            _timed("resfast-x", 1.0, 0.99, 1.01, load=2.6),
            {"path": "resfast-y", "status": "WRONG"},
        ]
    )
    assert quiet["reliable"] == "yes"
    assert wide["reliable"] == "no: spread 2102% > 30%"
    assert loaded["reliable"] == "no: load 2.60 > 2.5 (2 cores + 0.5)"
    # The benchmark's own threads load every core: up to the margin above that is still quiet.
    assert _marked([_timed("resfast-x", 1.0, 0.99, 1.01, load=2.5)])[0]["reliable"] == "yes"
    assert "reliable" not in failed  # never timed: nothing to judge


def test_a_speedup_over_a_wide_baseline_is_unreliable():
    baseline, fast = _marked([_timed("torch-a", 4.27, 2.45, 92.2), _timed("resfast-x", 0.136, 0.13, 0.14)])
    assert fast["speedup"] == pytest.approx(31.4, rel=1e-2)
    assert fast["reliable"] == "no: baseline torch-a spread 2102% > 30%"
    summary = table.summary_table([baseline, fast], table.Summary(("path",), table.ms_pct_cell))
    assert "31.4" not in summary and "unreliable (resfast-x: baseline torch-a spread" in summary
    assert "2 of 2 timed rows unreliable" in summary
    # A slower reliable resfast row does not stand in for the fastest one, which is unreliable.
    steady = _timed("resfast-y", 2.0, 1.9, 2.1)
    rows = _marked([_timed("torch-a", 1.0, 0.95, 1.05), _timed("resfast-x", 0.1, 0.05, 0.2), steady])
    summary = table.summary_table(rows, table.Summary(("dtype",), table.ms_pct_cell))  # one case
    assert "unreliable (resfast-x: spread 150% > 30%)" in summary
    assert "10.00x" not in summary and "0.50x" not in summary
    cells = table.format_table([fast], [table.speedup_column(), table.ms_column()])
    assert "| ? | 0.136 (0.13-0.14) |" in cells  # the measurement stays, the speed-up does not


def test_reliable_rows_show_speedup_and_pct_copy_unless_the_copy_was_noisy():
    rows = _marked([_timed("torch-a", 2.0, 1.9, 2.1), _timed("resfast-x", 0.5, 0.49, 0.51)])
    for r in rows:
        r["pct_copy"], r["copy_spread"] = 50.0, 0.1
    summary = table.summary_table(rows, table.Summary(("path",), table.ms_pct_cell))
    assert "4.00x (resfast-x vs torch-a)" in summary and "0.5 ms (50%)" in summary
    assert "unreliable" not in summary and "not shown" not in summary
    for r in rows:
        r["copy_spread"] = 0.6  # 11-21 GB/s within one run
    summary = table.summary_table(rows, table.Summary(("path",), table.ms_pct_cell))
    assert "4.00x (resfast-x vs torch-a)" in summary and "(50%)" not in summary
    assert "% copy not shown" in summary
    assert table.format_table(rows[1:], [table.pct_copy_column()]).endswith("| ? |")


def test_rows_from_older_csvs_without_a_verdict_are_shown_as_before():
    row = {"path": "resfast-x", "status": "ok", "ms": "0.5", "speedup": "2", "best_torch": "torch-a"}
    assert reliability.trusted(row) and reliability.copy_trusted(row)


def test_every_path_is_written_to_the_csv_as_it_finishes(tmp_path, monkeypatch):
    monkeypatch.setattr(reliability, "current_load", lambda: 0.5)  # read as each path finishes
    env = Env(CPU, "cpu", "cpu-x", "t", "tr", "c", "d", "0.1", copy_gbps=10.0, copy_spread=0.0)
    report = results.Report("x", env, tmp_path, ("case",))
    csv_path = tmp_path / "cpu-x" / "x.csv"
    seen = []

    def case_rows():
        for i, path in enumerate(("torch-a", "resfast-x", "resfast-y")):
            seen.append([r["path"] for r in results.read_csv(csv_path)])  # before path i is produced
            yield {"case": "c", **_timed(path, 1.0 + i, 0.9 + i, 1.1 + i)}

    report.add(case_rows(), {"torch-a"})
    assert seen == [[], ["torch-a"], ["torch-a", "resfast-x"]]
    written = results.read_csv(csv_path)
    assert [r["speedup"] for r in written] == ["1", "0.5", "0.333333"]
    assert all((r["reliable"], r["load"], r["copy_gbps"]) == ("yes", "0.5", "10") for r in written)
    assert not list(tmp_path.glob("*/*.partial"))


def test_a_killed_bench_prints_what_it_finished_and_keeps_its_rows(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        str(BENCH / "bench_optim.py"),
        "--smoke",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in bench.stdout:  # wait until a path has finished
        lines.append(line)
        if " ok " in line:
            break
    bench.send_signal(signal.SIGTERM)
    out = "".join(lines) + bench.stdout.read()
    assert bench.wait(timeout=120) == results.EXIT_INTERRUPTED
    assert "interrupted" in out and out.rindex("best resfast vs best torch") > out.rindex("interrupted")
    rows = _rows(tmp_path, "optim")
    assert rows and len(rows) == sum(" ok " in line or " SKIP " in line for line in out.splitlines())
    assert not (tmp_path / device_slug(CPU) / "optim_host.csv").exists()  # stopped before it


def test_evaluate_outcomes():
    def trial(check_result=None, raises=None):
        def build():
            if raises:
                raise raises
            return paths.Trial(step=lambda: pytest.fail("a wrong path was timed"), check=lambda: check_result)

        return paths.evaluate(build, CPU, timing.Budget().smoke())

    assert trial(raises=paths.Skip("not here")).status == "SKIP"
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
        return timing.Timing(1.0, 0.9, 1.1)

    monkeypatch.setattr(timing, "bench", fake_bench)
    return timed


def _status(rows: list[dict], path: str) -> dict:
    return next(r for r in rows if r["path"] == path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optim_wrong_paths_are_reported_and_not_timed(dtype, monkeypatch):
    timed = _timed_paths(monkeypatch)
    adam = bench_optim.OPTIMIZERS["adam"]
    case = bench_optim.make_case(adam, "tiny", bench_optim.PARAM_SETS["tiny"](), dtype, CPU)
    ctx = context.Context(CPU, smoke=True, compile_skip="off")

    def lr_off(spec, params, ctx):  # a plausible kernel bug: the learning rate 20% off
        return bench_optim._torch(spec, params, ctx, foreach=False, lr=spec.kwargs["lr"] * 1.2)

    def no_second_moment(spec, params, ctx):  # AdamW's update with Adam's state missing a tensor
        return bench_optim.BUILDERS["torch-forloop"](bench_optim.OPTIMIZERS["sgd"], params, ctx)

    builders = {
        "torch-forloop": bench_optim.BUILDERS["torch-forloop"],
        "lr-off": lr_off,
        "sgd": no_second_moment,
    }
    rows = list(bench_optim.run_case(case, builders, ctx, timing.Budget().smoke(), copy_gbps=1.0))
    assert _status(rows, "torch-forloop")["status"] == "ok"
    for name in ("lr-off", "sgd"):
        row = _status(rows, name)
        assert row["status"] == "WRONG" and "ms" not in row and "differ" in row["note"], row
    assert len(timed) == 1


def test_bn_wrong_paths_are_reported_and_not_timed(monkeypatch):
    timed = _timed_paths(monkeypatch)
    ctx = context.Context(CPU, smoke=True, compile_skip="off")

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
        rows = list(bench_bn.run_case(case, builders, ctx, timing.Budget().smoke(), copy_gbps=1.0))
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

    def model(spec, weights, device, fuse, bn_backend="auto"):
        built = real_model(spec, weights, device, fuse=False)
        return built.eval() if fuse else built  # a model bug: BN uses running stats in training

    monkeypatch.setattr(bench_train, "new_optimizer", optimizer)
    monkeypatch.setattr(bench_train, "build_model", model)
    specs = {"torch": bench_train.PATHS["torch"], "bad-sgd": bench_train.PATHS["resfast-sgd"]}
    specs["bad-model"] = bench_train.PathSpec(fuse=True, optimizer="torch", compile=False)
    ctx = context.Context(CPU, smoke=True, compile_skip="off")
    rows = list(bench_train.run_case(case, specs, ctx, timing.Budget().smoke(), copy_gbps=1.0))
    assert _status(rows, "torch")["status"] == "ok"
    assert _status(rows, "bad-sgd")["status"] == "WRONG" and "update" in _status(rows, "bad-sgd")["note"]
    assert _status(rows, "bad-model")["status"] == "WRONG" and "logits" in _status(rows, "bad-model")["note"]
    assert len(timed) == 1
