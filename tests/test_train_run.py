"""Training runs end to end on CPU: accuracy, outputs, torch vs resfast, resume after SIGKILL, torchrun,
and checkpoints that must be refused without touching anything."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from resfast import backends
from resfast.train import Config, checkpoint, run
from resfast.train.config import OPTIMIZER_DEFAULTS

# A tiny run (~1 s on one core): 256 digits, ResNet-8, batch 32 doubling each epoch.
TINY = dict(
    model="resnet8",
    train_samples=256,
    epochs=2,
    warmup_epochs=0.5,
    batch_args={"every": "1ep", "max_size": 128},
    threads=1,  # deterministic and identical in-process and in subprocesses; frugal on shared CPUs
    progress=False,
)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # run() sets torch's thread count for its process: give the rest of the session its own back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _checkpoint(out) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "resfast.train", *args]


def _flags(settings: dict) -> list[str]:
    """Command-line flags for Config settings."""
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run: (out folder, summary)."""
    out = tmp_path_factory.mktemp("finished")
    summary = run(Config(out=str(out), **TINY))
    return out, summary


def test_short_digits_run_reaches_95_percent(tmp_path, capsys):
    # The whole digits training set, 4 epochs of ResNet-8 (~2 s): 96.4-97.5% over seeds 0-3 when measured.
    settings = TINY | dict(train_samples=0, epochs=4, progress=True)
    summary = run(Config(out=str(tmp_path), **settings))
    assert summary["test_acc"] >= 0.95
    bars = capsys.readouterr()
    assert bars.out == ""  # stdout is left to the summary line of the command
    for shown in ("epoch 1/4", "epoch 4/4", "1.44k/1.44k", "img/s", "loss=", "acc=", "lr=", "batch=128"):
        assert shown in bars.err
    assert summary["samples"] == 4 * 1437 and summary["epochs"] == 4
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert [r["samples"] for r in lines] == [1437, 2 * 1437, 3 * 1437, 4 * 1437]
    assert [r["batch_size"] for r in lines] == [64, 128, 128, 128]  # the ramp, capped at max_size
    assert lines[-1]["test_acc"] == summary["test_acc"] and lines[0]["train_loss"] > lines[-1]["train_loss"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("test_acc", "train_time_s", "epochs", "samples", "optimizer", "impl", "backend", "device"):
        assert key in summary
    auto = backends.choose(torch.device("cpu"), torch.float32, "auto")  # cpu once resfast._C is built
    assert (summary["optimizer"], summary["impl"], summary["backend"], summary["device"]) == (
        "sgd",
        "resfast",
        auto,
        "cpu",
    )


def test_short_lars_run_learns(tmp_path):
    # LARS with its defaults (MLPerf's groups, momentum, warmup + polynomial decay) on the whole digits
    # training set, 6 epochs of ResNet-8 (~2 s): 94.7-97.2% over seeds 0-3 when measured (84.7-93.6%
    # after 4 epochs, where SGD reaches 96.4-97.5%).
    summary = run(Config(out=str(tmp_path), optimizer="lars", **(TINY | dict(train_samples=0, epochs=6))))
    assert summary["test_acc"] >= 0.92
    # auto picks the native kernels on the CPU where they were built, as for the other optimizers.
    backend = "cpu" if backends.native_runs("cpu") else "reference"
    assert (summary["optimizer"], summary["impl"], summary["backend"]) == ("lars", "resfast", backend)
    assert summary["config"]["lr_schedule"] == "polynomial" and summary["config"]["nesterov"] is False
    # After the half-epoch warmup, each step's LR is the power-2 decay over the whole run.
    lr, run_samples = OPTIMIZER_DEFAULTS["lars"]["lr"], 6 * 1437
    trace = _checkpoint(tmp_path)["progress"]["trace"]
    late = [(t, step_lr) for t, step_lr, _ in trace if t >= 1437 / 2]
    assert len(late) > 50
    assert [step_lr for _, step_lr in late] == pytest.approx(
        [lr * (1 - t / run_samples) ** 2 for t, _ in late]
    )


class _Stop(Exception):
    """Ends a run right after a checkpoint, as a kill would."""


def test_lars_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    settings = TINY | dict(optimizer="lars", epochs=3)
    run(Config(out=str(tmp_path / "whole"), **settings))
    save = checkpoint.save

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise _Stop

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save", save_then_stop)
        with pytest.raises(_Stop):
            run(Config(out=str(tmp_path / "cut"), **settings))
    assert _checkpoint(tmp_path / "cut")["progress"]["epoch"] == 1
    run(Config(out=str(tmp_path / "cut"), resume=True, **settings))
    a, b = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "cut")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])

    # The resumed optimizer kept MLPerf's two groups (and the plan's LR) through the checkpoint.
    def groups(ckpt):
        return [(g["weight_decay"], g["lars_adaptation"], g["lr"]) for g in ckpt["optimizer"]["param_groups"]]

    assert groups(a) == groups(b)
    assert [g[:2] for g in groups(b)] == [(5e-4, True), (0.0, False)]
    assert [r["train_loss"] for r in a["progress"]["history"]] == [
        r["train_loss"] for r in b["progress"]["history"]
    ]


def test_impl_torch_and_resfast_reference_give_the_same_trajectory(tmp_path):
    runs = {}
    for impl, backend in (("torch", "auto"), ("resfast", "reference")):
        out = tmp_path / impl
        run(Config(out=str(out), impl=impl, backend=backend, **TINY))
        runs[impl] = _checkpoint(out)
    a, b = runs["torch"], runs["resfast"]
    assert a["progress"]["trace"] == b["progress"]["trace"]  # same steps, LRs and batch sizes
    # The reference orders its fp32 operations differently from torch.optim.SGD: each step rounds
    # differently at ~1e-7 (measured: weights within 5e-7 after these 12 steps).
    diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
    assert diff < 1e-5
    for ra, rb in zip(a["progress"]["history"], b["progress"]["history"], strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
    # The tolerance tells optimizers apart: another momentum moves the weights by far more.
    run(Config(out=str(tmp_path / "other"), impl="resfast", backend="reference", momentum=0.8, **TINY))
    c = _checkpoint(tmp_path / "other")
    assert max((c["model"][k].float() - b["model"][k].float()).abs().max().item() for k in b["model"]) > 1e-3


def test_max_grad_norm_clips_as_torch_clip_grad_norm_does(tmp_path):
    """--max-grad-norm: resfast's in-step clipping and --impl torch's clip_grad_norm_ follow one
    trajectory, and it is not the unclipped one."""
    weights = {}
    runs = (("torch", "torch", 0.2), ("resfast", "resfast", 0.2), ("plain", "resfast", None))
    for name, impl, clip in runs:
        out = tmp_path / name
        run(Config(out=str(out), impl=impl, backend="reference", max_grad_norm=clip, **TINY))
        weights[name] = _checkpoint(out)["model"]

    def diff(a: dict, b: dict) -> float:
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    assert diff(weights["torch"], weights["resfast"]) < 1e-5  # as in the unclipped comparison above
    assert diff(weights["plain"], weights["resfast"]) > 1e-3  # the clip took effect


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, finished):
    settings = TINY | dict(epochs=6)  # long enough that the kill lands mid-run
    whole = run(Config(out=str(tmp_path / "whole"), **settings))
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_flags(settings | dict(out=str(out)))), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    done = _checkpoint(out)["progress"]["epoch"]
    assert 1 <= done < 6 and not (out / "summary.json").exists()

    resumed = subprocess.run(
        _cli(*_flags(settings | dict(out=str(out), resume=True))), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])  # the last stdout line is the summary
    a, b = _checkpoint(tmp_path / "whole"), _checkpoint(out)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [r["train_loss"] for r in a["progress"]["history"]] == [
        r["train_loss"] for r in b["progress"]["history"]
    ]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert (summary["samples"], summary["steps"], summary["test_acc"]) == (
        whole["samples"],
        whole["steps"],
        whole["test_acc"],
    )
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6


def test_torchrun_two_processes_agree_with_one(tmp_path, finished):
    one = _checkpoint(finished[0])
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "resfast.train", *_flags(TINY | dict(out=str(out)))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    json_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1  # only rank 0 reports
    summary, two = json.loads(json_lines[0]), _checkpoint(out)
    assert summary["world_size"] == 2
    assert (summary["samples"], summary["steps"], summary["epochs"]) == (
        finished[1]["samples"],
        finished[1]["steps"],
        finished[1]["epochs"],
    )
    # Every global batch had the same size as in the one-process run, and each epoch saw every sample.
    assert [s[2] for s in two["progress"]["trace"]] == [s[2] for s in one["progress"]["trace"]]
    assert [r["samples"] for r in two["progress"]["history"]] == [256, 512]


def _snapshot(folder) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint_is_refused_untouched(tmp_path, finished, damage):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (out / name).write_bytes((finished[0] / name).read_bytes())
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(
        data[: len(data) // 2] if damage == "truncated" else b"\x00junk" * 100
    )
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"checkpoint.pt is not a readable checkpoint .*left as it is"):
        run(Config(out=str(out), resume=True, **TINY))
    assert _snapshot(out) == before


def test_mismatched_checkpoint_is_refused_untouched(tmp_path, finished):
    out, _ = finished
    before = _snapshot(out)
    with pytest.raises(
        ValueError,
        match=r"other settings \(model: checkpoint 'resnet8', now 'resnet14'; lr: checkpoint 0.2, now 0.1\)",
    ):
        run(Config(out=str(out), resume=True, **(TINY | dict(lr=0.1, model="resnet14"))))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"model": {}}, foreign / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"is not a 'resfast\.train checkpoint 1' file"):
        run(Config(out=str(foreign), resume=True, **TINY))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        run(Config(out=str(tmp_path / "empty"), resume=True, **TINY))
    assert _snapshot(out) == before


def test_resume_may_change_where_and_how_fast(tmp_path, finished):
    out = tmp_path / "moved"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes((finished[0] / "checkpoint.pt").read_bytes())
    summary = run(Config(out=str(out), resume=True, **(TINY | dict(threads=2))))
    assert summary["samples"] == finished[1]["samples"] and summary["test_acc"] == finished[1]["test_acc"]


# (settings, largest gap between each epoch's training loss and the fp32 run's; None: another run).
OPTIONS = [
    (dict(amp="bf16"), 0.1),  # bf16 keeps ~3 significant digits: losses agree to a few percent
    (dict(amp="fp16"), 0.1),
    # The same maths, rounded differently (the native CPU kernels sum in another order). Early training
    # amplifies any rounding difference about tenfold per step: the unfused model with its weights
    # perturbed by 1e-7 (relative) moves the losses by ~1e-3 within 8 steps, and this run's fused losses
    # differ from the unfused ones by 3.7e-3 (2026-12-04). A wrong BN moves them by far more than 1e-2.
    (dict(fuse_bn="on", channels_last=True), 1e-2),
    (dict(batch_schedule="noise", batch_args={"max_size": 128}), None),
    (dict(lr_schedule="plateau", lr_args={"patience": 0, "factor": 0.5}, epochs=3), None),
]


@pytest.mark.parametrize(
    ("settings", "gap"), OPTIONS, ids=["bf16", "fp16", "fused-channels-last", "noise-batch", "plateau"]
)
def test_run_options_train(tmp_path, finished, settings, gap):
    summary = run(Config(out=str(tmp_path), **(TINY | settings)))
    ckpt = _checkpoint(tmp_path)
    losses = [r["train_loss"] for r in ckpt["progress"]["history"]]
    assert losses[-1] < losses[0] - 0.2  # it learns
    if gap is not None:
        fp32 = [r["train_loss"] for r in _checkpoint(finished[0])["progress"]["history"]]
        assert max(abs(a - b) for a, b in zip(losses, fp32, strict=True)) < gap
    if settings.get("amp") == "fp16":
        assert ckpt["scaler"]["scale"] > 0  # the GradScaler ran and is saved for resume
    if "fuse_bn" in settings:
        # auto: the native CPU kernels where the extension is built, else the reference.
        assert summary["fuse_bn"] and summary["bn_backend"] == (
            "cpu" if backends.native_runs("cpu") else "reference"
        )
    if settings.get("batch_schedule") == "noise":
        (state,) = ckpt["plan"]["schedules"]["states"]
        assert state["count"] > 0  # the estimator measured the gradient noise
        sizes = [b for _, _, b in ckpt["progress"]["trace"]]
        assert max(sizes) <= 128 and len(set(sizes)) > 2  # it followed the estimate, within max_size
    if settings.get("lr_schedule") == "plateau":
        (state,) = ckpt["plan"]["schedules"]["states"]
        assert state["best"] == min(losses)  # it observed each epoch's training loss
