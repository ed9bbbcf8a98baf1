"""resfast.train.config and build: defaults, TOML < flags, errors, schedules from names and epochs."""

import dataclasses

import pytest
import torch

import resfast.optim
from resfast import schedules
from resfast.train import Config, build, parse_args


def test_default_run_is_the_documented_one():
    cfg = Config()
    assert (cfg.dataset, cfg.model, cfg.impl, cfg.optimizer) == ("digits", "resnet20", "resfast", "sgd")
    model = torch.nn.Linear(2, 2)
    plan = build.make_plan(cfg, build.make_optimizer(cfg, model), epoch=1000)
    assert isinstance(plan.lr_schedule, schedules.Warmup) and isinstance(
        plan.lr_schedule.schedule, schedules.Cosine
    )
    assert plan.lr_schedule.schedule.total == cfg.epochs * 1000  # the cosine spans the whole run
    assert plan.batch_size_at(0) == 32 and plan.batch_size_at(cfg.epochs * 1000) == 256  # a ramp


def test_toml_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = 3\nmodel = "resnet8"\n[optimizer]\nlr = 1\nlr_args = { end = 0.01 }\n')
    cfg = parse_args(["--config", str(toml), "--model", "resnet32"])
    assert (cfg.epochs, cfg.model, cfg.lr, cfg.lr_args) == (3, "resnet32", 1.0, {"end": 0.01})
    assert isinstance(cfg.lr, float)  # TOML's 1 is accepted for a float setting
    # A flag given with the default's value still beats the file.
    assert parse_args(["--config", str(toml), "--lr", "0.2"]).lr == 0.2


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("learning_rate = 0.1", "unknown setting 'learning_rate'; settings are dataset, "),
        ('epochs = "ten"', "epochs must be int, got 'ten'"),
        ('optimizer = "lamb"', "optimizer must be one of sgd, rmsprop, adagrad, adam, adamw; got 'lamb'"),
        ("epochs = [", "is not valid TOML"),
    ],
)
def test_bad_toml_is_explained(tmp_path, capsys, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(path)])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "epochs must be >= 1, got 0"),
        (["--lr-args", "every=3"], "expected a JSON object"),
        (["--dataset", "cifar10"], "--dataset cifar10 needs --data-dir"),
        (["--impl", "torch", "--fuse-bn", "on"], "--fuse-bn on needs --impl resfast"),
        (["--config", "/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
    ],
)
def test_bad_flags_are_explained(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_help_lists_every_setting_with_units(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in text
    assert "samples per step" in text and "epochs" in text and "(default: 16)" in text


def test_lengths_in_epochs_become_samples():
    cfg = Config(
        lr_schedule="multistep",
        lr_args={"milestones": ["2ep", 150], "gamma": 0.5},
        warmup_epochs=0,
        batch_schedule="step",
        batch_args={"every": "0.5ep", "factor": 2},
    )
    plan = build.make_plan(cfg, build.make_optimizer(cfg, torch.nn.Linear(2, 2)), epoch=100)
    assert plan.lr_schedule.milestones == (150, 200.0)
    assert plan.batch_schedule.every == 50
    assert [plan.lr_at(t) for t in (149, 150, 200)] == [0.2, 0.1, 0.05]


def test_batch_args_merge_over_the_schedules_defaults():
    model = torch.nn.Linear(2, 2)

    def batch(argv):
        cfg = parse_args(argv)
        return build.make_plan(cfg, build.make_optimizer(cfg, model), epoch=100).batch_schedule

    assert batch(["--batch-schedule", "constant"]).size == 32  # naming a schedule alone is enough
    assert (batch(["--batch-schedule", "linear"]).end, batch(["--batch-schedule", "linear"]).total) == (
        256,
        1600,
    )
    step = batch(["--batch-args", '{"every": "1ep"}'])
    assert (step.every, step.max_size) == (100, 256)
    assert batch(["--batch-args", '{"max_size": null}']).max_size is None


def test_coupled_and_noise_batches():
    model = torch.nn.Linear(2, 2)
    cfg = Config(batch_schedule="coupled", batch_args={"mode": "inverse", "max_size": 64}, warmup_epochs=0)
    plan = build.make_plan(cfg, build.make_optimizer(cfg, model), epoch=100)
    assert plan.lr_at(1000) == plan.lr_at(0) == 0.2 and plan.batch_size_at(1000) > plan.batch_size_at(0)
    with pytest.raises(ValueError, match="takes no warmup"):
        build.make_plan(dataclasses.replace(cfg, warmup_epochs=1), build.make_optimizer(cfg, model), 100)
    cfg = Config(batch_schedule="noise", batch_args={"max_size": 512, "beta": 0.5})
    plan = build.make_plan(cfg, build.make_optimizer(cfg, model), epoch=100)
    assert plan.batch_schedule.estimator.beta == 0.5 and plan.batch_schedule.max_size == 512


def test_schedule_argument_errors_show_the_signature():
    cfg = Config(lr_schedule="step", lr_args={"evry": 10})
    with pytest.raises(TypeError, match=r"lr schedule Step\(base: 'float', every: 'float'.*evry"):
        build.make_plan(cfg, build.make_optimizer(cfg, torch.nn.Linear(2, 2)), epoch=100)


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adagrad", "adam", "adamw"])
def test_optimizers_by_name_and_impl(name):
    model = torch.nn.Linear(2, 2)
    for impl, module in (("resfast", resfast.optim), ("torch", torch.optim)):
        cfg = Config(
            optimizer=name,
            impl=impl,
            weight_decay=0.01,
            optimizer_args={"eps": 1e-6} if name != "sgd" else {},
        )
        opt = build.make_optimizer(cfg, model)
        assert type(opt) is getattr(module, build._OPTIMIZERS[name])
        assert opt.defaults["weight_decay"] == 0.01
        if name != "sgd":
            assert opt.defaults["eps"] == 1e-6
    assert build.make_optimizer(Config(), model).defaults["nesterov"] is True


def test_unavailable_backend_fails_before_training():
    cfg = Config(backend="triton")  # triton runs CUDA tensors (or CPU ones only under TRITON_INTERPRET)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        build.optimizer_backend(cfg, torch.device("meta"))
