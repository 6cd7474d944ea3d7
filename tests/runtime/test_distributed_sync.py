"""Merging statistics across processes, simulated with threads: W "processes" each feed their share of the
batches (`batches[r::W]`, keyed by batch index) and run `distributed.sync_stats` through a gather built on a
barrier.
Every process must end with exactly the results of one process fed every batch (a sketch: within its rank
error, and the same in every process). The real thing (torch.distributed, gloo, 2 processes) is in
test_distributed.py."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.quantiles import QuantileBudget, run_local, select_protocol
from ternqc.runtime.calibrate.stats.feeder import TensorStats
from ternqc.runtime.run.collectives import sync_stats


def spec(name, dims="all", abs=False, **options):
    return StatSpec(name, dims=dims, abs=abs, options=tuple(options.items()))


class ThreadGroup:
    """`gather` for W threads: every thread's object, in rank order."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)

    def gather_for(self, rank: int):
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out

        return gather


def run_distributed(make, batches, world):
    """Feed `batches[r::world]` to the `make()` of each of `world` threads, sync, return every thread's
    results."""
    group = ThreadGroup(world)
    results: list = [None] * world
    errors: list = []

    def process(rank):
        try:
            ts = make(eager=False)
            for i in range(rank, len(batches), world):
                ts.update(batches[i], i)
            sync_stats([ts], group.gather_for(rank))
            results[rank] = (ts.results(), ts.nonfinite, ts.updates)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=process, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def run_single(make, batches):
    ts = make(eager=True)
    for i, x in enumerate(batches):
        ts.update(x, i)
    return ts.results(), ts.nonfinite, ts.updates


def same(a, b) -> bool:
    """Equal, NaN equal to NaN, and the same sign of zero (the bits)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b))


SPECS = [
    spec("range_min_max"),
    spec("range_min_max", (2, 3)),
    spec("range_min_max", "none", abs=True),
    spec("range_quantile", quantile=0.5),
    spec("range_quantile", quantile=0.975, abs=True),
    spec("range_quantile", (2, 3), quantile=0.9),
    spec("abs_mean"),
    spec("abs_mean", (2, 3)),
    spec("variance_precise"),
    spec("variance_online", "none"),
    spec("range_n_sigma", (0, 2), num_sigma=2.0),
]


def conv_batches():
    """Varying batch sizes (small ones are staged, one is not), a mean, NaN and Inf in two batches."""
    g = torch.Generator().manual_seed(0)
    sizes = [8, 8, 3, 8, 8, 5, 8, 300, 8, 2]
    out = [torch.randn(b, 3, 5, 4, generator=g) * (1 + i % 3) + 0.5 for i, b in enumerate(sizes)]
    out[2][0, 1, 2, 3] = float("nan")
    out[5][1, 0, 0, 0] = float("inf")
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_every_statistic_merges_to_the_single_process_result_bit_for_bit(world):
    batches = conv_batches()

    def make(eager):
        return TensorStats(SPECS, eager=eager, size_hint=len(batches) // world + 1, plan_hint=len(batches))

    want = run_single(make, batches)
    for got in run_distributed(make, batches, world):
        assert got[1:] == want[1:]
        for s in SPECS:
            assert got[0][s].keys() == want[0][s].keys(), s.key()
            for field in want[0][s]:
                assert same(got[0][s][field], want[0][s][field]), (s.key(), field)


def test_large_batches_and_threshold_abs_mean_merge_bit_for_bit():
    """Batches larger than a summation chunk (16384) and than the staging limit; a per-channel threshold."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(b, 4, 10000, generator=g) * 3 + 1 for b in (2, 3, 2, 1, 2)]
    delta = torch.tensor([0.5, 1.0, 2.0, 3.0]).reshape(4, 1)
    factories = [
        lambda eager: TensorStats([spec("threshold_abs_mean", (0, 2))], eager=eager, threshold=delta),
        lambda eager: TensorStats([spec("threshold_abs_mean")], eager=eager, threshold=1.5),
        lambda eager: TensorStats(
            [spec("abs_mean"), spec("variance_precise"), spec("range_quantile", quantile=0.3)], eager=eager
        ),
    ]
    for make in factories:
        want = run_single(make, batches)
        for got in run_distributed(make, batches, 2):
            assert all(same(got[0][s][f], want[0][s][f]) for s in want[0] for f in want[0][s])


def test_sketches_merge_within_rank_error_and_identically_everywhere():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(256, 512, generator=g) + (i % 4) for i in range(8)]
    s = spec("range_quantile", quantile=0.9)

    def make(eager):
        return TensorStats([s], eager=eager, quantile_budget=QuantileBudget(2**20))

    results = run_distributed(make, batches, 2)
    first = results[0][0][s]
    assert first["exact"] is False
    assert all(r[0][s] == first for r in results[1:])
    values = np.sort(torch.cat(batches).reshape(-1).double().numpy())
    n = len(values)
    for field, q in (("max", 0.9), ("min", 0.1)):
        rank = np.searchsorted(values, first[field])
        assert abs(rank - q * (n - 1)) / n <= 1e-4


def test_an_exact_and_a_sketched_process_merge_into_a_sketch():
    """The budget decides per process; when one process had to sketch, every process's values join it."""
    g = torch.Generator().manual_seed(3)
    big, small = torch.randn(1024, 1024, generator=g), torch.randn(16, 16, generator=g)
    s = spec("range_quantile", quantile=0.75)
    group = ThreadGroup(2)
    out = [None, None]

    def process(rank):
        ts = TensorStats([s], eager=False, quantile_budget=QuantileBudget(2**20 if rank == 0 else 2**28))
        ts.update(big if rank == 0 else small, rank)
        sync_stats([ts], group.gather_for(rank))
        out[rank] = ts.results()[s]

    threads = [threading.Thread(target=process, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert out[0] == out[1] and out[0]["exact"] is False and out[0]["count"] == 1024 * 1024 + 256
    values = np.sort(torch.cat([big.reshape(-1), small.reshape(-1)]).double().numpy())
    assert abs(np.searchsorted(values, out[0]["max"]) - 0.75 * (len(values) - 1)) / len(values) <= 1e-4


def test_a_process_without_batches_merges():
    batches = conv_batches()[:1]

    def make(eager):
        return TensorStats(SPECS, eager=eager)

    want = run_single(make, batches)
    for got in run_distributed(make, batches, 2):
        assert all(same(got[0][s][f], want[0][s][f]) for s in SPECS for f in want[0][s])


def test_selection_is_exact_even_when_the_sample_misleads_it():
    """Values arranged so that the strided sample sees only huge values: every bracket misses and the
    fallback partitions everything. Also several ranks, atoms, NaN and an empty part."""
    n = 200_003
    rng = np.random.default_rng(4)
    values = rng.standard_normal(n).astype(np.float32)
    values[:: 7] = 1e6  # the sample (a prime stride) hits many of these
    values[100:50_000] = 0.0  # an atom
    values[5] = np.nan
    finite = n - 1
    ranks = [0, 1, finite // 3, finite // 2, finite - 1]
    want = np.sort(values[~np.isnan(values)])
    got = run_local(select_protocol(values, finite, ranks))
    assert {k: float(v) for k, v in got.items()} == {k: float(want[k]) for k in ranks}
    # three parts, one empty
    parts = [values[:70_000], values[70_000:70_000], values[70_000:]]
    group = ThreadGroup(3)
    answers = [None] * 3

    def process(r):
        part = parts[r]
        answers[r] = _drive(select_protocol(part, int(np.count_nonzero(~np.isnan(part))), ranks, 3),
                            group.gather_for(r))

    threads = [threading.Thread(target=process, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all({k: float(v) for k, v in a.items()} == {k: float(want[k]) for k in ranks} for a in answers)


def _drive(protocol, gather):
    try:
        message = next(protocol)
        while True:
            message = protocol.send(gather(message))
    except StopIteration as stop:
        return stop.value
