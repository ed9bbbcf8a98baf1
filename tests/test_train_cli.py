"""The command line as a user meets it: one-line errors, runs that are not overwritten, progress in
logs, and compile time kept apart from training time."""

import json
import time

import pytest
import torch
from torch import nn

from resfast.train import Config, main, run
from resfast.train.errors import SettingError

from .test_train_run import TINY, _flags


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of the command line run in this process."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizer-args", '{"betaz": 1}'], "unexpected keyword argument 'betaz'"),
        (["--optimizer", "adam", "--optimizer-args", '{"betas": [2, 0.9]}'], "Invalid beta parameter"),
        (["--lr-schedule", "step", "--lr-args", '{"evry": 1}'], "unexpected keyword argument 'evry'"),
        (["--batch-schedule", "linear", "--batch-args", '{"end": 0}'], "end must be an int >= 1"),
        (["--backend", "cuda"], "--backend: backend 'cuda' cannot run"),
        (
            ["--optimizer", "lars", "--optimizer-args", '{"trust_coefficient": -1}'],
            "'trust_coefficient': -1, 'backend': 'auto'}: Invalid trust_coefficient value: -1",
        ),
        (["--dataset", "cifar10", "--data-dir", "{tmp}"], "missing: data_batch_1, "),
        (["--resume"], "--resume: no checkpoint at"),
    ],
    ids=[
        "optimizer-keyword",
        "optimizer-value",
        "lr-args",
        "batch-args",
        "backend",
        "lars-args",
        "data",
        "checkpoint",
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = _main([*_flags(TINY), "--out", str(tmp_path / "out"), *argv], capsys)
    assert code == 2
    (line,) = err.splitlines()  # no traceback
    assert line.startswith("python -m resfast.train: error: ") and message in line


def test_resfast_backend_variable_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESFAST_BACKEND", "gpu")
    code, err = _main([*_flags(TINY), "--out", str(tmp_path)], capsys)
    assert code == 2 and "--backend: " in err and "RESFAST_BACKEND='gpu'" in err
    assert len(err.splitlines()) == 1


def test_bugs_keep_their_traceback(tmp_path, monkeypatch):
    # Only errors in what the user asked for become one line: anything else is a bug to report.
    monkeypatch.setattr("resfast.train.loop._evaluate", lambda run: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main([*_flags(TINY), "--out", str(tmp_path)])


def test_a_finished_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    run(Config(out=str(out), **TINY))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = _main([*_flags(TINY | dict(epochs=1)), "--out", str(out)], capsys)
    assert code == 2 and "holds another run (checkpoint.pt, metrics.jsonl, summary.json, curves.png)" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="give one"):
        Config(out=str(out), resume=True, overwrite=True)
    # --overwrite replaces it: the new run's one epoch, not the old run's two.
    summary = run(Config(out=str(out), overwrite=True, **(TINY | dict(epochs=1))))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and summary["epochs"] == 1
    # A folder holding other files only is not a run.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("mine")
    run(Config(out=str(tmp_path / "notes"), **(TINY | dict(epochs=1))))
    assert (tmp_path / "notes" / "README").read_text() == "mine"


def test_unwritable_out_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SettingError, match=r"--out .*file/run: cannot create it"):
        run(Config(out=str(tmp_path / "file" / "run"), **TINY))


def test_progress_in_a_log_is_one_line_per_epoch(tmp_path, capsys):
    # Under pytest stderr is not a terminal, as when it is redirected to a log file.
    run(Config(out=str(tmp_path), **(TINY | dict(progress=True))))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "256/256 img" in lines[0] and "img/s" in lines[0] and "batch=64" in lines[0]


class _SlowToCompile(nn.Module):
    """Stands in for torch.compile: the first call at each batch size takes an extra second."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.sizes = net, set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) not in self.sizes:
            self.sizes.add(len(x))
            time.sleep(1.0)
        return self.net(x)


def test_compile_time_is_reported_apart_from_training(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", _SlowToCompile)
    summary = run(Config(out=str(tmp_path), compile=True, **TINY))
    # Batches of 32 in epoch 1, of 64 in epoch 2: two sizes, two compilations.
    assert summary["compile_time_s"] >= 2.0
    assert summary["train_time_s"] < 1.5  # ~0.3 s: without the compiling steps
    compiled = 32 + 64  # the samples of the compiling steps count neither
    assert summary["img_per_s"] == pytest.approx((512 - compiled) / summary["train_time_s"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["compile_time_s"] >= 1.0 for r in lines] == [True, True]
    assert all(r["epoch_time_s"] < 1.0 for r in lines)
