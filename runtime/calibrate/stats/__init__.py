"""Statistic states: small mergeable accumulators for MASE's statistics, vectorised over the batch.

In: a `StatSpec` (which statistic, `dims`, `abs`, options) and tensors, one `update(x)` per batch for an
activation or once with the whole tensor for a parameter. Out: `result()`, a dict with MASE's fields for the
statistic (`plan.STATISTICS[name].fields`): python floats for scalars, nested lists for per-channel or
element-wise results, `count` an int. `merge(other)` adds another state's data (exact, except a sketch,
which merges within its stated rank error); `to_tensors()` / `from_tensors(spec, tensors)` turn a state into
a dict of tensors and back; `state.sync()` / `TensorStats.sync()` are the protocols with which
`distributed.sync_stats` merges the states of every process of a `torch.distributed` job, so that every
process ends with the same results.

`dims` (the lead's decision):
- `dims` index the tensor as the module sees it. For activations (`batched=True`) dim 0 is the batch and is
  always reduced: statistics are across samples.
- `dims="all"`: everything is reduced; the result is one scalar.
- `dims="none"`: only the batch dim is reduced for activations (element-wise across samples: the result has
  the per-sample shape); nothing is reduced for parameters (the result has the parameter's shape).
- a tuple of dims: those dims are reduced (plus the batch dim for activations); negative dims count from
  the end. Reduced non-batch dims are KEPT with size 1, so a per-channel result broadcasts against the
  tensor: weight [out, in] with dims (1,) -> [out, 1]; conv2d input [B, C, H, W] with dims (2, 3) ->
  [C, 1, 1]; linear input [B, 100] with dims "none" -> [100].
- `abs=True` takes |x| first.

Fields: `range_min_max` min, max, range = max - min (in float32, as MASE), count = number of elements seen
(MASE: 128 samples x 4 features = 512). `range_quantile(quantile=q)`: min = the (1-q) quantile, max = the q
quantile (linear interpolation at rank q·(n-1), torch.quantile's definition, exact and without its 2^24
limit: see `quantiles.py`). `variance_precise` and `variance_online` are the same state: per batch a mean
and a sum of squared deviations, merged in float64 with Chan et al.'s formula, so the variance is exact to
~1e-7 relative. `range_n_sigma(num_sigma=k)`: min/max = mean -/+ k·std (unbiased std), range = max - min.
`abs_mean`: mean of |x|. `threshold_abs_mean` (derived): mean of |x| over the elements with |x| >
threshold, where the threshold (a float or a tensor that broadcasts against x) is given at construction;
count = how many.

NaN and +-Inf are counted, left out of every statistic, and reported as `nonfinite = N` in the result when
N > 0. A position that saw no finite value gets NaN fields. When a quantile state had to use a sketch
because of the memory budget, its result has `exact = False`. Zeros are reported as +0.0.

Results do not depend on how the batches are split between processes, bit for bit (a sketch aside):
- every batch gets a key (its index in the calibration, times 2^20, plus the call within the batch), and
  each sum-like statistic keeps one float64 partial per key: on the CPU the batch's values in a fixed order
  (value i into float64 lane i % 32, each lane in order, the lanes in order: `sums.lane_sums`; the compiled
  scans and numpy give the same bits, whatever the thread count or vector width), on an accelerator float32
  sums over chunks of 16384 values added in float64 (torch's single-output reductions depend on the thread
  count). Partials are folded left in key order, as they come in one process, all at once after a merge;
- min/max and exact quantiles do not depend on the order of the values at all.

Speed: `TensorStats` feeds all statistics of one tensor together: per block one probe (`sums.Block.prepare`:
with the compiled scans one pass gives the min and max, the NaN/Inf check, whether |x| = x and each batch's
sum of |x|, and for a one-batch block also a bracketed quantile's counts and kept values; else one `aminmax`),
|x| made only when a statistic reads its values, one sum per other sum-like statistic and one copy into the
exact quantile buffer. Tensors of at most 16384 values per batch are first copied into a
staging buffer and processed 64 batches at a time (a small model's cost is Python work per call, not
arithmetic). Parameters are read once and their results computed at once. Memory: nothing small is kept
per batch (per-batch partials go into preallocated arrays; small long-lived allocations between the
forward's large ones fragment the heap), and large buffers (exact values, staging, |x|) come from
`quantiles.take_buffer`'s pool, which keeps them for the next calibration (fresh memory costs page faults).
"""

from __future__ import annotations
