"""Quantiles: exact beyond torch.quantile's 2^24 limit, a shared memory budget, and a sketch that stays within
the budget and within 1e-4 rank error of numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ternqc.plan import StatSpec
from ternqc.runtime.calibrate.quantiles import ExactValues, QuantileBudget
from ternqc.runtime.calibrate.sketch import CompactorSketch, rank_error_bound
from ternqc.runtime.calibrate.stats.states import from_tensors, make_state

EPS32 = float(np.finfo(np.float32).eps)


def quantile_spec(q, dims="all"):
    return StatSpec("range_quantile", dims=dims, options=(("quantile", q),))


def rank_error(sorted_values: np.ndarray, value: float, q: float) -> float:
    """How far (as a fraction of n) `value` is from being at rank q·(n-1) of `sorted_values`."""
    n = len(sorted_values)
    target = q * (n - 1)
    below = np.searchsorted(sorted_values, value, "left")  # values < value
    upto = np.searchsorted(sorted_values, value, "right") - 1  # last index holding a value <= value
    return max(0.0, below - target, target - upto) / n


def test_exact_quantile_over_more_than_2_24_values_in_one_tensor():
    n = 2**24 + 1000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))  # torch.quantile refuses this (~2.5 s)
    state = make_state(quantile_spec(0.975), batched=False)
    state.update(x)
    r = state.result()
    assert r["count"] == n and "exact" not in r
    x64 = x.double().numpy()
    lo, hi = np.quantile(x64, [1 - 0.975, 0.975])
    assert abs(r["min"] - lo) <= 4 * EPS32 * abs(lo)
    assert abs(r["max"] - hi) <= 4 * EPS32 * abs(hi)


def test_exact_quantiles_equal_torch_quantile_below_the_limit():
    """The median (q·(n-1) exact in float32) matches torch.quantile bit for bit."""
    xs = [torch.randn(64, 10) for _ in range(3)]
    state = make_state(quantile_spec(0.5, dims="none"))
    for x in xs:
        state.update(x)
    assert state.result()["max"] == torch.quantile(torch.cat(xs), 0.5, dim=0).tolist()
    whole = make_state(quantile_spec(0.5))
    for x in xs:
        whole.update(x)
    assert whole.result()["max"] == float(torch.quantile(torch.cat(xs), 0.5))


def test_buffer_is_preallocated_from_the_size_hint_and_grows():
    budget = QuantileBudget(10 * 2**20)
    buf = ExactValues(2, budget)
    slot = buf.slot(3, hint=30)
    assert slot.shape == (2, 3) and budget.used == 2 * 30 * 4
    slot[...] = np.arange(6.0).reshape(2, 3)
    for _ in range(20):  # beyond the hint: doubling keeps earlier values
        buf.slot(3).fill(-1.0)
    assert buf.values().shape == (2, 63)
    np.testing.assert_array_equal(buf.values()[:, :3], [[0, 1, 2], [3, 4, 5]])


@pytest.mark.parametrize("q", [0.5, 0.975, 0.999])
def test_small_budget_switches_to_a_sketch_within_budget_and_rank_error(q):
    budget = QuantileBudget(2**20)  # 1 MiB: 262144 float32 values; the data below is 8x that
    gen = torch.Generator().manual_seed(1)
    state = make_state(quantile_spec(q), quantile_budget=budget)
    xs = [torch.randn(512, 256, generator=gen) * (1 + i % 3) + i % 5 for i in range(16)]
    for x in xs:
        state.update(x)
    r = state.result()
    assert r["exact"] is False and r["count"] == 16 * 512 * 256
    assert budget.peak <= budget.limit
    assert state._sketch.nbytes <= state._sketch.reserved_bytes() <= budget.limit
    srt = np.sort(torch.cat([x.reshape(-1) for x in xs]).double().numpy())
    assert rank_error(srt, r["max"], q) <= 1e-4
    assert rank_error(srt, r["min"], 1 - q) <= 1e-4
    assert "sketch" in state.note() and "rank error" in state.note()


def test_sketch_handles_repeated_values_exactly():
    """Half the values are exactly 0 (a ReLU output): the sketch's quantiles below the median are 0."""
    budget = QuantileBudget(2**18)
    gen = torch.Generator().manual_seed(2)
    state = make_state(quantile_spec(0.7), quantile_budget=budget)
    xs = [torch.relu(torch.randn(1024, 200, generator=gen)) for _ in range(8)]
    for x in xs:
        state.update(x)
    r = state.result()
    assert r["exact"] is False
    assert r["min"] == 0.0  # the 0.3 quantile
    srt = np.sort(torch.cat(xs).reshape(-1).double().numpy())
    assert rank_error(srt, r["max"], 0.7) <= 1e-4


def test_sketch_per_channel_rows_within_rank_error():
    budget = QuantileBudget(8 * 2**20)
    gen = torch.Generator().manual_seed(3)
    state = make_state(quantile_spec(0.9, dims=(0, 2)), quantile_budget=budget)
    scale = torch.tensor([1.0, 2.0, 5.0, 0.1]).reshape(1, 4, 1)
    xs = [torch.randn(256, 4, 1024, generator=gen) * scale for _ in range(4)]
    for x in xs:
        state.update(x)
    r = state.result()
    assert r["exact"] is False and budget.peak <= budget.limit
    data = torch.cat(xs).transpose(0, 1).reshape(4, -1).double().numpy()
    for c in range(4):
        srt = np.sort(data[c])
        assert rank_error(srt, r["max"][c][0], 0.9) <= 1e-4
        assert rank_error(srt, r["min"][c][0], 0.1) <= 1e-4


def test_budget_is_shared_first_come_first_served():
    budget = QuantileBudget(4 * 2**20)  # 2 MiB exact + 2 sketch promises of 0.75 MiB fit; 4 MiB exact do not
    a = make_state(quantile_spec(0.5), quantile_budget=budget)
    b = make_state(quantile_spec(0.5), quantile_budget=budget)
    x = torch.randn(512, 1024)  # 2 MiB of values
    a.update(x)
    b.update(x)
    assert "exact" not in a.result() and b.result()["exact"] is False
    assert budget.peak <= budget.limit


def test_sketch_merge_and_serialisation_stay_within_rank_error():
    gen = torch.Generator().manual_seed(4)
    parts = [torch.randn(2048, 256, generator=gen) for _ in range(4)]
    s = quantile_spec(0.95)
    a = make_state(s, quantile_budget=QuantileBudget(2**20))
    b = make_state(s, quantile_budget=QuantileBudget(2**20))
    for i, x in enumerate(parts):
        (a if i % 2 else b).update(x)
    rebuilt = from_tensors(s, b.to_tensors(), quantile_budget=QuantileBudget(2**20))
    assert rebuilt.result() == b.result()
    a.merge(rebuilt)
    r = a.result()
    assert r["count"] == 4 * 2048 * 256 and r["exact"] is False
    srt = np.sort(torch.cat(parts).reshape(-1).double().numpy())
    assert rank_error(srt, r["max"], 0.95) <= 1e-4


def test_exact_merges_with_a_sketch():
    s = quantile_spec(0.8)
    gen = torch.Generator().manual_seed(5)
    small, big = torch.randn(64, 64, generator=gen), torch.randn(1024, 1024, generator=gen)
    exact = make_state(s)
    exact.update(small)
    sketched = make_state(s, quantile_budget=QuantileBudget(2**20))
    sketched.update(big)
    exact.merge(sketched)
    r = exact.result()
    assert r["exact"] is False and r["count"] == 64 * 64 + 1024 * 1024
    srt = np.sort(torch.cat([small.reshape(-1), big.reshape(-1)]).double().numpy())
    assert rank_error(srt, r["max"], 0.8) <= 1e-4


def test_compactor_sketch_counts_weights_exactly():
    sketch = CompactorSketch(3, k=64)
    rng = np.random.default_rng(0)
    for m in (10, 1000, 5, 70000):
        sketch.add(rng.standard_normal((3, m)).astype(np.float32))
    values, weights = sketch.items()
    assert values.shape[0] == 3 and int(weights.sum()) == 10 + 1000 + 5 + 70000
    assert rank_error_bound(2**16) < 1e-4


def test_budget_keeps_room_for_every_states_sketch():
    """Exact buffers never take the room a later sketch needs: every state that overflows still gets a
    sketch with rank error <= 1e-4, and the total stays within the limit."""
    budget = QuantileBudget(4 * 2**20)
    states = [make_state(quantile_spec(0.5), quantile_budget=budget, size_hint=4) for _ in range(3)]
    gen = torch.Generator().manual_seed(6)
    for _ in range(4):
        for state in states:
            state.update(torch.randn(256, 1024, generator=gen))  # 1 MiB a batch, 4 MiB a state
    assert budget.peak <= budget.limit
    for state in states:
        assert state.result()["exact"] is False
        assert rank_error_bound(state._sketch.k) <= 1e-4


# --- selection (select_protocol) ------------------------------------------------------------------------


def test_a_rank_on_an_atom_the_sample_did_not_flag_is_found_by_counting_the_edges(monkeypatch):
    """Ranks that land on lo or hi of their bracket (a big atom) without the sample flagging it: the extra
    counting round answers them exactly."""
    from ternqc.runtime.calibrate import quantiles

    monkeypatch.setattr(quantiles, "_repeated", lambda pooled, value: False)
    rng = np.random.default_rng(8)
    values = np.concatenate([rng.standard_normal(300_000), np.zeros(200_000), rng.random(100_000) + 5])
    values = rng.permutation(values).astype(np.float32)
    want = np.sort(values)
    ranks = [0, 150_000, 250_000, 420_000, 499_999, 550_000, 599_999]
    got = quantiles.run_local(quantiles.select_protocol(values, values.size, ranks))
    assert {k: float(v) for k, v in got.items()} == {k: float(want[k]) for k in ranks}


@pytest.mark.parametrize(
    ("size", "kind"),
    [(1, "normal"), (2, "normal"), (5000, "normal"), (2**14, "relu"), (2**14 + 1, "normal"), (47_000, "relu"),
     (300_000, "normal"), (300_000, "atoms"), (70_000, "nan")],
)
def test_select_values_gives_the_sorted_values_at_the_ranks(size, kind):
    """Against np.sort: partitions (a single rank included) and, beyond PARTITION_UP_TO, the protocol, whose
    values between are narrowed by the protocol again when there are many (300k values: ~17k between)."""
    from ternqc.runtime.calibrate import quantiles

    rng = np.random.default_rng(size)
    values = rng.standard_normal(size).astype(np.float32)
    if kind == "relu":
        values = np.maximum(values, 0)
    elif kind == "atoms":
        values[rng.random(size) < 0.3] = 0.25
    elif kind == "nan":
        values[rng.random(size) < 0.1] = np.nan
    want = np.sort(values)  # NaN last
    finite = int(np.count_nonzero(~np.isnan(values)))
    rank_sets = [[finite // 2], [0, finite - 1], [finite // 3, finite // 3 + 1, (2 * finite) // 3]]
    for ranks in rank_sets:
        ranks = sorted({k for k in ranks if 0 <= k < finite})
        got = quantiles.select_values(values.copy(), ranks)
        assert {k: float(v) for k, v in got.items()} == {k: float(want[k]) for k in ranks}


@pytest.mark.parametrize("native", [True, False])
def test_select_protocol_narrows_many_values_between_again(monkeypatch, native):
    """A sample too small for the values (wide brackets: 60k values between for 600k) selects among the values
    between as among any values (compiled, or without the library through the protocol again), with the same
    answer as a sort."""
    from ternqc.runtime.calibrate import quantiles, scan_kernel

    if not native:
        monkeypatch.setattr(scan_kernel, "select", lambda *a: None)
    calls = []
    real = quantiles.select_values
    monkeypatch.setattr(quantiles, "SAMPLE_SIZE", 2**9)
    monkeypatch.setattr(quantiles, "select_values", lambda v, r, *a, **k: calls.append(v.size) or real(v, r, *a, **k))
    values = np.random.default_rng(3).standard_normal(600_000).astype(np.float32)
    ranks = [299_999, 300_000]
    got = quantiles.run_local(quantiles.select_protocol(values, values.size, ranks))
    want = np.sort(values)
    assert {k: float(v) for k, v in got.items()} == {k: float(want[k]) for k in ranks}
    assert max(calls) > quantiles.PARTITION_UP_TO  # the values between were selected among, not partitioned


def test_select_values_ends_when_the_sample_is_every_value(monkeypatch):
    """A sample as large as the values (more than PARTITION_UP_TO of them) answers by one partition, not by
    selecting among the same values again."""
    from ternqc.runtime.calibrate import quantiles

    monkeypatch.setattr(quantiles, "SAMPLE_SIZE", 2**16)
    values = np.random.default_rng(4).standard_normal(40_000).astype(np.float32)
    want = np.sort(values)
    got = quantiles.select_values(values.copy(), [123, 20_000])
    assert {k: float(v) for k, v in got.items()} == {123: float(want[123]), 20_000: float(want[20_000])}


def test_lerp_exactly_has_torch_lerps_bits_where_it_answers():
    """Against torch.lerp (a vector and one element at a time: its vectorised and scalar paths), on normal,
    subnormal, signed-zero and huge values: every answer has torch's bits; weights other than 0 and 0.5 go to
    torch."""
    from ternqc.runtime.calibrate.quantiles import lerp_exactly

    rng = np.random.default_rng(11)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 3e-45, 6e-39, -1.2e-38, 1e38, -3e38, 3e38], dtype=np.float32)
    pool = np.concatenate([rng.standard_normal(300), rng.standard_normal(100) * 1e-40, rng.standard_normal(100) * 1e37])
    pool = np.concatenate([pool.astype(np.float32), special])
    lo, hi = rng.choice(pool, 3000), rng.choice(pool, 3000)
    answered = 0
    for w in (0.0, 0.5):
        vector = torch.lerp(torch.from_numpy(lo), torch.from_numpy(hi), torch.full((lo.size,), w)).numpy()
        for i in range(0, lo.size, 7 if w else 1):
            got = lerp_exactly(lo[i], hi[i], w)
            if got is None:
                continue
            answered += 1
            one = torch.lerp(torch.tensor([lo[i]]), torch.tensor([hi[i]]), torch.tensor([w])).numpy()[0]
            assert np.float32(got).tobytes() == vector[i].tobytes() == one.tobytes(), (lo[i], hi[i], w)
    assert answered > 3000
    assert lerp_exactly(np.float32(1.0), np.float32(2.0), 0.25) is None
    assert lerp_exactly(np.float32(1e-45), np.float32(4e-45), 0.5) is None  # a subnormal difference halved


def test_released_buffers_are_reused_and_the_pool_is_bounded(monkeypatch):
    from ternqc.runtime.calibrate import buffers

    buffers.clear_pool()
    monkeypatch.setattr(buffers, "POOL_BYTES", 3 * 2**20)
    a = buffers.take_buffer(2**18)  # 1 MiB
    buffers.give_back(a)
    b = buffers.take_buffer(2**17)
    assert np.shares_memory(a, b)  # the smallest pooled buffer that is large enough
    for _ in range(5):
        buffers.give_back(np.empty(2**18, dtype=np.float32))
    assert sum(x.nbytes for x in buffers._FREE) <= 3 * 2**20
    assert buffers.pooled_bytes() == sum(x.nbytes for x in buffers._FREE)
    buffers.clear_pool()


def test_buffers_kept_for_reuse_count_against_the_quantile_budget():
    # an exact buffer that grows by doubling gives each smaller one back to the pool: kept for reuse, they
    # must stay within the budget's limit together with the buffer in use (before, a run with a 16 MiB
    # budget ended holding 13 MiB of values and 26 MiB pooled); the values themselves stay exact
    from ternqc.runtime.calibrate import buffers

    buffers.clear_pool()
    limit = 8 * 2**20
    budget = QuantileBudget(limit)
    values = ExactValues(1, budget)
    chunks = [np.random.default_rng(i).standard_normal(2**16).astype(np.float32) for i in range(28)]
    pooled_at_most = 0
    for chunk in chunks:  # 28 x 256 KiB = 7 MiB of values: the buffer grows 256 KiB .. 8 MiB
        slot = values.slot(chunk.size)
        assert slot is not None
        slot[0] = chunk
        assert budget.used + buffers.pooled_bytes() <= limit
        pooled_at_most = max(pooled_at_most, buffers.pooled_bytes())
    assert pooled_at_most > 0  # smaller buffers were kept while there was room
    np.testing.assert_array_equal(values.values()[0], np.concatenate(chunks))
    values.release()
    assert budget.used == 0 and buffers.pooled_bytes() <= buffers.POOL_BYTES
    buffers.clear_pool()
