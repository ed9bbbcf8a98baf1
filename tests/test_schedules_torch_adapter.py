"""as_lr_scheduler: a torch LRScheduler over any resfast schedule, with torch's checkpoint behaviour."""

import io

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

import resfast.schedules as S


def make_optimizer(*lrs):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs])


def test_it_is_a_torch_scheduler_stepping_the_sample_clock():
    opt = make_optimizer(0.1, 0.01)
    schedule = S.Warmup(S.Cosine(0.1, 3000), 500, 0.2)
    scheduler = S.as_lr_scheduler(opt, schedule, samples_per_step=100)
    assert isinstance(scheduler, LRScheduler)
    for step in range(35):
        want = schedule(step * 100)
        assert scheduler.get_last_lr() == pytest.approx([want, want / 10], rel=1e-15)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([want, want / 10], rel=1e-15)
        opt.step()
        scheduler.step()


def test_equals_the_torch_scheduler_it_replaces():
    torch_opt, our_opt = make_optimizer(0.1), make_optimizer(0.1)
    theirs = CosineAnnealingLR(torch_opt, T_max=20, eta_min=0.001)
    ours = S.as_lr_scheduler(our_opt, S.Cosine(0.1, 20 * 64, 0.001), 64)
    for _ in range(21):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], rel=1e-12)
        torch_opt.step()
        our_opt.step()
        theirs.step()
        ours.step()


def test_state_dict_carries_the_schedule_state_as_plain_data():
    def make():
        opt = make_optimizer(0.1)
        schedule = S.Plateau(0.1, patience=0)
        return opt, schedule, S.as_lr_scheduler(opt, schedule, 32)

    opt, schedule, scheduler = make()
    for metric in (1.0, 2.0, 3.0):  # two bad epochs with patience 0: two reductions
        schedule.observe(metric)
        opt.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    _, resumed_schedule, resumed = make()
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 3 and resumed_schedule.lr == pytest.approx(0.001)
    assert resumed.get_last_lr() == scheduler.get_last_lr() == pytest.approx([0.001])


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got None"):
        S.as_lr_scheduler(None, S.Constant(0.1), 32)
    with pytest.raises(TypeError, match=r"schedule must be an LR schedule"):
        S.as_lr_scheduler(make_optimizer(0.1), lambda t: 0.1, 32)
    with pytest.raises(ValueError, match=r"samples_per_step must be > 0, got 0"):
        S.as_lr_scheduler(make_optimizer(0.1), S.Constant(0.1), 0)
    with pytest.raises(ValueError, match=r"first param group's initial lr must be > 0"):
        S.as_lr_scheduler(make_optimizer(0.0, 0.1), S.Constant(0.1), 32)
