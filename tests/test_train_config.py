"""resfast.train.config and build: defaults, TOML < flags, errors, schedules from names and epochs."""

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

import resfast.optim
from resfast import backends, schedules
from resfast.backends import BACKENDS
from resfast.nn import functional
from resfast.train import Config, build, parse_args
from resfast.train.config import LR_SCHEDULES, OPTIMIZER_DEFAULTS
from resfast.train.errors import SettingError


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
        (
            'optimizer = "lamb"',
            "optimizer must be one of sgd, rmsprop, adagrad, adam, adamw, lars; got 'lamb'",
        ),
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
        (
            ["--optimizer", "lars", "--impl", "torch"],
            "--optimizer lars needs --impl resfast: torch.optim has no LARS",
        ),
        (["--config", "/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
        (["--max-grad-norm", "0"], "max_grad_norm must be a finite number > 0, got 0.0"),
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
    cfg = Config(batch_schedule="noise", batch_args={"max_size": 512, "beta": 0.5})
    plan = build.make_plan(cfg, build.make_optimizer(cfg, model), epoch=100)
    assert plan.batch_schedule.estimator.beta == 0.5 and plan.batch_schedule.max_size == 512


def test_coupled_alone_grows_the_batch_and_holds_the_warmed_up_lr():
    # Named alone, coupled grows the batch where the cosine would decay the LR (32 -> 8 x 32), and the
    # LR warms up as usual, then holds; proportional coupling shrank the batch to 1 sample instead.
    cfg = Config(batch_schedule="coupled")
    plan = build.make_plan(cfg, build.make_optimizer(cfg, torch.nn.Linear(2, 2)), epoch=100)
    run = cfg.epochs * 100
    sizes = [plan.batch_size_at(t) for t in range(0, run + 1, 10)]
    assert sizes[0] == 32 and sizes[-1] == 256 and sizes == sorted(sizes)
    assert plan.lr_at(0) == pytest.approx(0.02)  # the warmup's start: 0.1 of the LR
    assert [plan.lr_at(t) for t in (200, 800, run)] == [0.2, 0.2, 0.2]


def test_schedule_argument_errors_show_the_signature():
    cfg = Config(lr_schedule="step", lr_args={"evry": 10})
    with pytest.raises(SettingError, match=r"--lr-schedule Step\(base: 'float', every: 'float'.*evry"):
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
    with pytest.raises(SettingError, match="--backend: backend 'triton' cannot run"):
        build.optimizer_backend(cfg, torch.device("meta"))


def _plan(**settings) -> schedules.Plan:
    cfg = Config(**settings)
    return build.make_plan(cfg, build.make_optimizer(cfg, torch.nn.Linear(2, 2)), epoch=100)


@pytest.mark.parametrize("name", LR_SCHEDULES)
def test_every_lr_schedule_runs_by_name_and_peaks_at_lr(name):
    plan = _plan(lr_schedule=name, warmup_epochs=0)
    run = 16 * 100
    lrs = [plan.lr_at(t) for t in range(0, run + 1, 10)]
    assert max(lrs) == pytest.approx(0.2)  # --lr is the peak
    if name in ("step", "multistep", "exponential", "inverse_time"):
        assert lrs[-1] < 0.2 / 5  # the default arguments decay it over the run


def test_default_lr_args_scale_with_the_run():
    run = 16 * 100
    assert _plan(lr_schedule="multistep").lr_schedule.schedule.milestones == (0.5 * run, 0.75 * run)
    step = _plan(lr_schedule="step", warmup_epochs=0)
    assert [step.lr_at(t) for t in (0.39 * run, 0.41 * run, 0.81 * run)] == pytest.approx([0.2, 0.02, 0.002])
    assert _plan(lr_schedule="exponential", warmup_epochs=0).lr_at(run) == pytest.approx(0.002)
    assert _plan(lr_schedule="inverse_time", warmup_epochs=0).lr_at(run) == pytest.approx(0.02)
    # "<x>%" works in any length argument, and flags merge over the defaults.
    plan = _plan(lr_schedule="step", lr_args={"every": "25%"}, warmup_epochs=0)
    assert (plan.lr_schedule.every, plan.lr_schedule.gamma) == (0.25 * run, 0.1)


def test_onecycle_warms_up_by_itself():
    plan = _plan(lr_schedule="onecycle")
    assert isinstance(plan.lr_schedule, schedules.OneCycle)  # no Warmup wrapped around its own rise
    assert plan.lr_at(0) == pytest.approx(0.2 / 25)
    assert isinstance(_plan(lr_schedule="onecycle", warmup_epochs=1).lr_schedule, schedules.Warmup)
    assert isinstance(_plan(lr_schedule="cosine").lr_schedule, schedules.Warmup)


def test_loss_backoff_never_climbs_past_lr():
    plan = _plan(lr_schedule="loss_backoff", warmup_epochs=0)
    for loss in (2.0, 1.0, 0.5, 0.25, 0.5, 0.1):  # the loss halving would double the LR each time
        plan.observe(loss)
        assert plan.lr <= 0.2
    assert plan.lr == 0.2
    plan.observe(0.2)  # a rise backs off from the peak
    assert plan.lr == pytest.approx(0.1)


@pytest.mark.parametrize("schedule", ["step", "linear", "noise", "coupled"])
def test_batch_ceiling_follows_the_batch_size(schedule):
    plan = _plan(batch_size=512, batch_schedule=schedule)
    assert plan.batch_size_at(0) == 512
    assert max(plan.batch_size_at(t) for t in range(0, 1601, 100)) <= 8 * 512
    if schedule in ("step", "linear", "coupled"):
        assert plan.batch_size_at(1600) == 8 * 512


@pytest.mark.parametrize("name", list(OPTIMIZER_DEFAULTS))
def test_each_optimizer_has_its_own_default_lr(name, recwarn):
    opt = build.make_optimizer(Config(optimizer=name), torch.nn.Linear(2, 2))
    assert opt.defaults["lr"] == OPTIMIZER_DEFAULTS[name]["lr"] == Config(optimizer=name).resolved().lr
    if name in ("rmsprop", "adagrad", "adam", "adamw"):
        assert opt.defaults["lr"] <= 0.1  # adaptive steps: at SGD's 0.2, rmsprop reached 12.8%
    if name == "lars":
        assert opt.defaults["lr"] >= 1  # times a trust ratio of ~0.001 * ||w|| / ||g||
    assert opt.defaults.get("momentum", 0.0) == OPTIMIZER_DEFAULTS[name].get("momentum", 0.0)
    assert not recwarn.list  # defaults warn about nothing
    assert build.make_optimizer(Config(optimizer=name, lr=0.5), torch.nn.Linear(2, 2)).defaults["lr"] == 0.5


def test_options_the_optimizer_ignores_are_warned_about_and_cleared():
    with pytest.warns(UserWarning, match=r"--momentum 0.5 and --nesterov True: ignored by --optimizer adam"):
        cfg = Config(optimizer="adam", momentum=0.5, nesterov=True)
    assert (cfg.resolved().momentum, cfg.resolved().nesterov) == (None, None)
    with pytest.warns(UserWarning, match=r"--nesterov False: ignored by --optimizer rmsprop"):
        Config(optimizer="rmsprop", momentum=0.5, nesterov=False)


def test_help_shows_the_per_optimizer_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "sgd 0.2, rmsprop 0.003, adagrad 0.1, adam 0.01, adamw 0.01, "
        f"lars {OPTIMIZER_DEFAULTS['lars']['lr']:g})"
        in text
        and "momentum, for sgd, rmsprop and lars only" in text
        and "Nesterov momentum, for sgd and lars only (default: on when momentum > 0 for sgd; off for lars"
        in text
        and "(default: cosine; polynomial for lars)" in text
    )


def test_toml_data_dir_is_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    toml = tmp_path / "configs" / "run.toml"
    toml.write_text('dataset = "cifar10"\ndata_dir = "data/cifar"\n')
    (tmp_path / "elsewhere").mkdir()  # run from anywhere but the file's folder
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = parse_args(["--config", str(toml)])
    assert Path(cfg.data_dir).resolve() == (tmp_path / "configs" / "data" / "cifar").resolve()
    assert parse_args(["--config", str(toml), "--data-dir", "here"]).data_dir == "here"  # a flag: as typed


def test_bn_backend_offers_only_backends_with_bn_kernels():
    x = torch.randn(2, 3, 4, 4)
    args = dict(running_mean=torch.zeros(3), running_var=torch.ones(3), weight=None, bias=None)
    args |= dict(training=True, momentum=0.1, eps=1e-5)
    offered = typing.get_args(typing.get_type_hints(Config)["bn_backend"])
    for backend in BACKENDS[1:]:
        try:
            functional.batch_norm_add_relu(x, None, **args, backend=backend)
            has_kernels = True
        except backends.BackendUnavailable as e:
            has_kernels = "no batch_norm_add_relu kernels" not in str(e)
        assert (backend in offered) == has_kernels, backend
    # Every backend has BN kernels (the native cuda one for CUDA tensors): all are offered.
    assert set(offered) == set(BACKENDS)
    assert parse_args(["--bn-backend", "cuda"]).bn_backend == "cuda"


def _bn_net() -> torch.nn.Module:
    """Convolution (no bias), BatchNorm, linear (with bias): the three kinds of param LARS tells apart."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )


def test_lars_resolves_to_mlperfs_recipe(recwarn):
    cfg = Config(optimizer="lars").resolved()
    assert (cfg.lr, cfg.momentum, cfg.nesterov) == (OPTIMIZER_DEFAULTS["lars"]["lr"], 0.9, False)
    assert (cfg.lr_schedule, cfg.warmup_epochs) == ("polynomial", 2.0)
    assert not recwarn.list  # momentum and nesterov are LARS's own options: nothing is ignored
    plan = _plan(optimizer="lars", warmup_epochs=0)
    assert isinstance(plan.lr_schedule, schedules.Polynomial) and plan.lr_schedule.power == 2
    lr, run = OPTIMIZER_DEFAULTS["lars"]["lr"], 16 * 100
    assert [plan.lr_at(t) for t in (0, run / 2, run)] == pytest.approx([lr, lr / 4, 0.0])  # (1 - t/T)^2
    # The warmup wraps it as every other schedule: 0.1 of the LR at the start, linear over 2 epochs.
    warm = _plan(optimizer="lars")
    assert isinstance(warm.lr_schedule, schedules.Warmup) and warm.lr_schedule.samples == 200
    assert warm.lr_at(0) == pytest.approx(0.1 * lr)
    # The power belongs to LARS's schedule whether named or defaulted, and to no other optimizer's;
    # --lr-args overrides it, and another schedule replaces the whole default.
    assert _plan(optimizer="lars", lr_schedule="polynomial").lr_schedule.schedule.power == 2
    assert _plan(optimizer="sgd", lr_schedule="polynomial").lr_schedule.schedule.power == 1
    assert _plan(optimizer="lars", lr_args={"power": 1}).lr_schedule.schedule.power == 1
    assert isinstance(_plan(optimizer="lars", lr_schedule="cosine").lr_schedule.schedule, schedules.Cosine)
    assert isinstance(_plan().lr_schedule.schedule, schedules.Cosine)  # sgd keeps the cosine
    # --nesterov applies to LARS, and is on by default only for SGD.
    assert Config(optimizer="lars", nesterov=True).resolved().nesterov is True
    assert Config(optimizer="lars", momentum=0.0).resolved().nesterov is False
    assert Config(optimizer="sgd", momentum=0.0).resolved().nesterov is False


def test_lars_gets_mlperfs_param_groups():
    model = _bn_net()
    conv, bn, linear = model[0], model[1], model[3]
    cfg = Config(
        optimizer="lars",
        weight_decay=0.01,
        momentum=0.8,
        nesterov=True,
        optimizer_args={"trust_coefficient": 0.002, "eps": 1e-9},
    )
    opt = build.make_optimizer(cfg, model)
    assert type(opt) is resfast.optim.LARS
    adapted, plain = opt.param_groups
    # Convolution and linear weights adapted and decayed; BatchNorm's weight and bias, and the linear
    # bias, neither.
    assert [id(p) for p in adapted["params"]] == [id(conv.weight), id(linear.weight)]
    assert (adapted["weight_decay"], adapted["lars_adaptation"]) == (0.01, True)
    assert {id(p) for p in plain["params"]} == {id(bn.weight), id(bn.bias), id(linear.bias)}
    assert (plain["weight_decay"], plain["lars_adaptation"]) == (0.0, False)
    for group in opt.param_groups:
        assert (group["momentum"], group["nesterov"]) == (0.8, True)
        assert (group["trust_coefficient"], group["eps"]) == (0.002, 1e-9)
    # The plan drives both groups' LR (the same: the groups carry no LR of their own).
    plan = build.make_plan(cfg, opt, epoch=100)
    assert [g["lr"] for g in opt.param_groups] == [plan.lr_at(0)] * 2
    # --optimizer-args' weight_decay replaces --weight-decay, as for the other optimizers; still only
    # where MLPerf decays.
    groups = build.make_optimizer(Config(optimizer="lars", optimizer_args={"weight_decay": 0.1}), model)
    assert [g["weight_decay"] for g in groups.param_groups] == [0.1, 0.0]


def test_lars_backend_and_bad_lars_settings():
    cpu = torch.device("cpu")
    # auto: the native kernels on the CPU when built (LARS has them as the others do), else the reference.
    native = backends.native_runs("cpu")
    assert build.optimizer_backend(Config(optimizer="lars"), cpu) == ("cpu" if native else "reference")
    with pytest.raises(SettingError, match=r"--backend: backend 'cuda' cannot run"):
        build.optimizer_backend(Config(optimizer="lars", backend="cuda"), cpu)
    with pytest.raises(SettingError, match=r"--optimizer lars .*'trust_coefficient': 0.*Invalid trust_coeff"):
        build.make_optimizer(Config(optimizer="lars", optimizer_args={"trust_coefficient": 0}), _bn_net())
    with pytest.raises(ValueError, match=r"torch\.optim has no LARS"):
        Config(optimizer="lars", impl="torch")


@pytest.mark.parametrize("name", ["sgd", "adam", "lars"])
def test_max_grad_norm_reaches_resfasts_optimizer(name):
    """resfast's optimizers clip inside their step; torch's have no such option (the loop clips)."""
    opt = build.make_optimizer(Config(optimizer=name, max_grad_norm=2.5), _bn_net())
    assert opt.max_grad_norm == 2.5
    assert build.make_optimizer(Config(optimizer=name), _bn_net()).max_grad_norm is None
    if name != "lars":
        torch_opt = build.make_optimizer(Config(optimizer=name, impl="torch", max_grad_norm=2.5), _bn_net())
        assert not hasattr(torch_opt, "max_grad_norm")


@pytest.mark.parametrize("native", [True, False], ids=["native-cpu", "no-extension"])
def test_fuse_bn_auto_fuses_on_the_cpu_only_with_the_native_kernels(native, monkeypatch):
    """auto: fused on CUDA, and on the CPU where the native kernels run (measured faster end to end,
    docs/train.md); without them the CPU's only BN kernel is the slow reference: not fused. --impl torch
    never fuses; on and off are obeyed."""
    monkeypatch.setattr(backends, "native_runs", lambda device_type: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert build.uses_fused_bn(Config(), cpu) is native
    assert build.uses_fused_bn(Config(), cuda)
    assert not build.uses_fused_bn(Config(impl="torch"), cpu)
    assert not build.uses_fused_bn(Config(impl="torch"), cuda)
    assert build.uses_fused_bn(Config(fuse_bn="on"), cpu)
    assert not build.uses_fused_bn(Config(fuse_bn="off"), cuda)
