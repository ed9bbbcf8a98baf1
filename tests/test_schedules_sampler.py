"""The plan's batch sampler: each index once per epoch whatever the sizes and world size, order fixed by
(seed, epoch), sizes exact under DataLoader prefetching, exact mid-epoch resume, bad input."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import resfast.schedules as S
from resfast.schedules.sampler import generator_seed


def make_plan(batch):
    return S.Plan(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 0.1, batch)


def lockstep_epoch(plans, samplers):
    """One epoch drawn on every rank side by side, each rank's plan stepped after each batch.

    Returns the global batches (the ranks' shares concatenated in rank order), the shares, and the
    clock before each step."""
    iterators = [iter(s) for s in samplers]
    global_batches, shares, clocks = [], [], []
    while True:
        batches = [next(it, None) for it in iterators]
        if all(b is None for b in batches):
            return global_batches, shares, clocks
        assert all(b is not None for b in batches), "ranks disagree on the number of steps"
        clocks.append(plans[0].samples)
        shares.append(batches)
        global_batches.append([i for b in batches for i in b])
        for plan in plans:
            plan.step()


SCHEDULES = st.one_of(
    st.builds(S.ConstantBatch, st.integers(4, 40)),
    st.builds(S.StepBatch, st.integers(4, 12), st.integers(10, 80), st.sampled_from([2, 3]), st.just(90)),
    st.builds(S.LinearBatch, st.integers(4, 50), st.integers(4, 50), st.integers(1, 200)),
    st.builds(S.PolynomialBatch, st.integers(4, 60), st.integers(20, 300), st.floats(0.5, 2.0), st.just(4)),
)


@settings(max_examples=40, deadline=None)
@given(
    schedule=SCHEDULES,
    num_samples=st.integers(4, 230),
    world_size=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**40),
)
def test_each_index_once_per_epoch_whatever_the_sizes_and_world_size(
    schedule, num_samples, world_size, drop_last, seed
):
    plans = [make_plan(schedule) for _ in range(world_size)]
    samplers = [
        p.batch_sampler(num_samples, seed=seed, rank=r, world_size=world_size, drop_last=drop_last)
        for r, p in enumerate(plans)
    ]
    for epoch in range(2):
        start = plans[0].samples
        expected_steps = len(samplers[0])
        global_batches, shares, clocks = lockstep_epoch(plans, samplers)
        assert len(global_batches) == expected_steps
        assert plans[0].epoch == epoch
        order = samplers[0].order(epoch).tolist()
        drawn = [i for b in global_batches for i in b]
        # Global batches are consecutive slices of the epoch's order: each index at most once, and all of
        # them without drop_last.
        assert drawn == order[: len(drawn)]
        if not drop_last:
            assert sorted(drawn) == list(range(num_samples))
        for k, (batch, ranks, t) in enumerate(zip(global_batches, shares, clocks, strict=True)):
            want = schedule(t)
            last = k == len(global_batches) - 1
            if drop_last or not last:
                assert len(batch) == want
            else:  # the last batch takes what is left: fewer, or up to world_size - 1 more
                assert len(batch) == num_samples - (len(drawn) - len(batch))
                assert len(batch) < want + world_size
            sizes = [len(share) for share in ranks]
            assert min(sizes) >= 1 and sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
        if drop_last:
            left = num_samples - len(drawn)
            assert left < schedule(plans[0].samples)  # only a tail too small for the next batch is dropped
        assert plans[0].samples - start == sum(map(len, global_batches))


def test_order_is_a_function_of_seed_and_epoch_only():
    runs = {}
    for batch, world_size in [
        (S.ConstantBatch(8), 1),
        (S.StepBatch(4, 20), 2),
        (S.LinearBatch(30, 4, 50), 3),
    ]:
        plans = [make_plan(batch) for _ in range(world_size)]
        samplers = [p.batch_sampler(97, seed=5, rank=r, world_size=world_size) for r, p in enumerate(plans)]
        epochs = []
        for _ in range(3):
            global_batches, _, _ = lockstep_epoch(plans, samplers)
            epochs.append([i for b in global_batches for i in b])
        runs[(repr(batch), world_size)] = epochs
    first, *others = runs.values()
    assert all(other == first for other in others)
    assert len({tuple(order) for order in first}) == 3  # each epoch has its own order
    other_seed = make_plan(8).batch_sampler(97, seed=6)
    assert other_seed.order(0).tolist() != first[0]
    assert make_plan(8).batch_sampler(10, shuffle=False).order(3).tolist() == list(range(10))


def test_generator_seed_differs_for_every_epoch_of_a_run():
    # torch's CPU generator reads 32 bits of its seed; the hash must still not repeat an epoch's order.
    for seed in (0, 1, 2**32, -7):
        seeds = [generator_seed(seed, epoch) for epoch in range(4096)]
        assert len(set(seeds)) == 4096 and all(0 <= s < 2**32 for s in seeds)
    assert generator_seed(0, 1) != generator_seed(1, 0)
    assert generator_seed(0, 0) != generator_seed(2**32, 0)  # seeds that differ above bit 32 too


def run(batch, num_samples, steps, *, rank=0, world_size=1, resume_at=None, seed=3):
    """This rank's batches over ``steps`` steps; with ``resume_at``, through a checkpoint at that step."""
    plan = make_plan(batch)
    sampler = plan.batch_sampler(num_samples, seed=seed, rank=rank, world_size=world_size)
    out = []
    while len(out) < steps:
        for indices in sampler:
            out.append(indices)
            plan.step()
            if len(out) == resume_at:
                buffer = io.BytesIO()
                torch.save(plan.state_dict(), buffer)
                buffer.seek(0)
                plan = make_plan(batch)
                plan.load_state_dict(torch.load(buffer, weights_only=True))
                sampler = plan.batch_sampler(num_samples, seed=seed, rank=rank, world_size=world_size)
                break  # a new process: the old iterator is gone
            if len(out) == steps:
                break
    return out


@pytest.mark.parametrize("resume_at", [1, 5, 9, 10, 14])  # 10: the checkpoint falls on the epoch's end
@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2), (2, 3)])
def test_resume_mid_epoch_gives_the_identical_remaining_sequence(resume_at, rank, world_size):
    batch = S.StepBatch(6, 30, max_size=24)  # 100 samples: sizes 6 x5, 12 x3, 24 x2 - 10 steps an epoch
    straight = run(batch, 100, 22, rank=rank, world_size=world_size)
    resumed = run(batch, 100, 22, rank=rank, world_size=world_size, resume_at=resume_at)
    assert resumed == straight


def test_an_abandoned_iteration_resumes_from_the_last_step():
    plan = make_plan(10)
    sampler = plan.batch_sampler(50, seed=1)
    iterator = iter(sampler)
    drawn = [next(iterator) for _ in range(3)]  # drawn ahead, as a prefetching loader does
    plan.step()
    plan.step()
    assert next(iter(sampler)) == drawn[2]  # the third batch was never trained: it comes again
    assert len(sampler) == 3


def test_step_uses_the_drawn_size_not_the_current_estimate():
    estimator = S.GradientNoiseScale(beta=0.0)
    plan = make_plan(S.NoiseScaleBatch(8, 64, estimator))
    iterator = iter(plan.batch_sampler(1000))
    first, second = next(iterator), next(iterator)
    estimator.update(1 + 40 / 4, 4, 1 + 40 / 32, 32)  # B_noise becomes 40 after both were drawn
    assert plan.batch_size == 40 and len(first) == len(second) == 8
    plan.step()
    plan.step()
    assert plan.samples == 16  # the clock follows the batches that were trained
    assert len(next(iterator)) == 40
    with pytest.raises(ValueError, match=r"plan.step\(32\): the batch sampler drew a global batch of 40"):
        plan.step(32)


def test_len_counts_the_batches_to_come():
    plan = make_plan(S.LinearBatch(10, 30, 100))
    sampler = plan.batch_sampler(101, drop_last=True)
    # 10, 12, 14, 17, 21, 25 (at t = 0, 10, 22, 36, 53, 74); the last 2 are fewer than the next 30.
    assert len(sampler) == len(list(sampler)) == 6
    iterator = iter(sampler)
    for _ in range(2):
        next(iterator)
        plan.step()
    assert len(sampler) == 4


def test_dataloader_with_workers_gets_exact_sizes_despite_prefetching():
    # With 2 workers and prefetch_factor 2 the sampler draws 4 batches ahead. A sampler reading the
    # plan's batch size when it draws would see the clock 4 steps late and give stale sizes here.
    batch = S.StepBatch(3, 12, max_size=48)
    dataset = TensorDataset(torch.arange(150))

    def epochs(num_workers, n_epochs, stop_after=None, plan=None):
        plan = plan or make_plan(batch)
        loader = DataLoader(
            dataset,
            batch_sampler=plan.batch_sampler(len(dataset), seed=11),
            num_workers=num_workers,
            prefetch_factor=2 if num_workers else None,
        )
        out, ahead = [], 0
        for _ in range(n_epochs):
            for (x,) in loader:
                ahead = max(ahead, len(plan.drawn))  # batches drawn but not yet trained
                out.append((plan.samples, x.tolist()))
                plan.step()
                if len(out) == stop_after:
                    return out, plan, ahead
        return out, plan, ahead

    with_workers, _, ahead = epochs(2, 2)
    assert ahead >= 4  # the test did run with the sampler ahead of training
    assert with_workers == epochs(0, 2)[0]
    # Each batch has the schedule's size at the clock it is trained at (but an epoch's last, shorter one).
    assert all(len(x) == batch(t) for t, x in with_workers if t % 150 + len(x) < 150)
    for epoch in range(2):
        indices = [i for t, x in with_workers if 150 * epoch <= t < 150 * (epoch + 1) for i in x]
        assert sorted(indices) == list(range(150))

    # Stopped after 7 steps (with 4 more batches prefetched), the state resumes at step 8.
    head, stopped, _ = epochs(2, 1, stop_after=7)
    resumed = make_plan(batch)
    resumed.load_state_dict(stopped.state_dict())
    tail, _, _ = epochs(2, 2, plan=resumed)
    assert head + tail[: len(with_workers) - 7] == with_workers


def test_changed_settings_mid_epoch_are_refused_but_allowed_between_epochs():
    plan = make_plan(10)
    iterator = iter(plan.batch_sampler(40, seed=1))
    next(iterator)
    plan.step()
    with pytest.raises(ValueError, match=r"epoch 0 is not finished \(10 of its samples used\).*'seed': 1"):
        next(iter(plan.batch_sampler(40, seed=2)))
    for _ in iterator:
        plan.step()
    assert len(list(plan.batch_sampler(40, seed=2, world_size=2))) == 4  # epoch 1 may change them


BAD_INPUT = [
    (lambda p: p.batch_sampler(10, world_size=0), ValueError, r"world_size must be an int >= 1, got 0"),
    (
        lambda p: p.batch_sampler(10, rank=2, world_size=2),
        ValueError,
        r"rank must be in \[0, world_size=2\), got 2",
    ),
    (lambda p: p.batch_sampler(3, world_size=4), ValueError, r"num_samples must be an int >= 4, got 3"),
    (lambda p: p.batch_sampler(10, seed=1.5), TypeError, r"seed must be an int, got 1.5"),
    (lambda p: p.batch_sampler(10, shuffle=1), TypeError, r"shuffle must be a bool, got 1"),
    (
        lambda p: next(iter(p.batch_sampler(100, world_size=16))),
        ValueError,
        r"global batch size 8 at t=0 samples is smaller than world_size=16",
    ),
]


@pytest.mark.parametrize(("build", "error", "match"), BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_is_a_clear_error(build, error, match):
    with pytest.raises(error, match=match):
        build(make_plan(8))
