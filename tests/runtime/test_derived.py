"""The activation scale α (the plan's derived `threshold_abs_mean`): one calibration pass when the values fit
the quantile budget or a band around the Δ predicted from the first batch holds the final Δ, a second pass
over only the modules that did not, the same bits every way."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from ternqc.compiler import builtin_recipe, compile_file
from ternqc.runtime.calibrate import loop
from ternqc.runtime.models.builtin import ToyNet
from ternqc.runtime.run import pipeline, workers

# toy-tiny under ternary_full.tq: 512 samples; seq_blocks.0 sees 512 x 4 values (8 KiB), every other
# quantised input 512 x 100 (200 KiB)
ALL_FIT, SOME_FIT, NONE_FIT = 256.0, 64 / 1024, 1 / 1024


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("derived")
    torch.manual_seed(5)
    torch.save(ToyNet().state_dict(), folder / "toy.pt")
    plan = compile_file(builtin_recipe("ternary_full.tq")).plan
    return plan, str(folder / "toy.pt")


def run(setup, budget_mib, monkeypatch=None, seen=None, bands=False, predict=None):
    """`apply` with `budget_mib`; without `bands` nothing is predicted (every value kept, or a second pass);
    `predict` replaces the prediction."""
    plan, ckpt = setup
    settings = pipeline.RunSettings(ckpt=ckpt, dataset="toy-tiny", progress=False, quantile_budget_mib=budget_mib)
    with pytest.MonkeyPatch.context() as mp:
        if not bands:
            predict = lambda got: {}  # noqa: E731
        if predict is not None:  # `apply` predicts on the model check's forward (`FirstBatchProbe`)
            real_predict = pipeline.predict_bands
            mp.setattr(pipeline, "predict_bands", lambda *args: predict(real_predict(*args)))

            class Probe(pipeline.FirstBatchProbe):
                @contextlib.contextmanager
                def collecting(self):
                    with super().collecting():
                        yield
                    self.bands = predict(self.bands)

            mp.setattr(pipeline, "FirstBatchProbe", Probe)
        return _apply(plan, settings, monkeypatch, seen)


def _apply(plan, settings, monkeypatch, seen):
    if monkeypatch is not None:
        real = loop.calibrate

        def spy(model, batches, resolved, **kwargs):
            seen.append({p: tuple(t) for p, t in resolved.modules.items()})
            return real(model, batches, resolved, **kwargs)

        monkeypatch.setattr(loop, "calibrate", spy)
    return pipeline.apply(pipeline.load_model(settings), plan, settings)


def passes(result):
    return {
        node["path"]: node["tensors"]["data_in"].get("alpha_passes")
        for node in result.report["nodes"].values()
        if node["tensors"]["data_in"].get("quantized")
    }


def alphas(result):
    return {path: mq.tensor("data_in").alpha for path, mq in result.configs.items()}


def derived_values(result):
    return {
        path: {s: r for s, r in ms.values.get("data_in_0", {}).items() if s.name == "threshold_abs_mean"}
        for path, ms in result.profile.table.items()
    }


def test_alpha_from_the_first_pass_equals_a_second_pass_bit_for_bit(setup, monkeypatch):
    seen: list = []
    one = run(setup, ALL_FIT, monkeypatch, seen)
    assert seen == []  # no second calibration pass at all
    assert set(passes(one).values()) == {1}
    two = run(setup, NONE_FIT)
    assert set(passes(two).values()) == {2}
    assert alphas(one) == alphas(two)  # floats compared exactly
    assert derived_values(one) == derived_values(two)
    assert all(v["count"] > 0 for d in derived_values(one).values() for v in d.values())


def test_a_second_pass_hooks_only_the_modules_whose_values_did_not_fit(setup, monkeypatch):
    seen: list = []
    mixed = run(setup, SOME_FIT, monkeypatch, seen)
    by_path = passes(mixed)
    assert by_path["seq_blocks.0"] == 1 and {p for p, n in by_path.items() if n == 2}
    (second,) = seen
    assert set(second) == {p for p, n in by_path.items() if n == 2}
    assert all(t == ("data_in_0",) for t in second.values())
    assert alphas(mixed) == alphas(run(setup, NONE_FIT))


def test_alpha_by_hand_equals_numpy(setup):
    """α = mean |x| over |x| > Δ of seq_blocks.2's input over the calibration batches (numpy, float64)."""
    result = run(setup, ALL_FIT)
    plan, ckpt = setup
    settings = pipeline.RunSettings(ckpt=ckpt, dataset="toy-tiny", progress=False)
    model = pipeline.load_model(settings)
    seen = []
    handle = model.seq_blocks[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for x, _ in result.profile.batches:
            model(x)
    handle.remove()
    a = torch.cat([t.reshape(-1) for t in seen]).abs().numpy()
    delta = result.configs["seq_blocks.2"].tensor("data_in").delta
    above = a[a > np.float32(delta)]
    # float64 sums of these float32 values are exact (far below 2^53 spacings), so the means agree exactly
    want = np.sum(above, dtype=np.float64) / above.size
    assert result.configs["seq_blocks.2"].tensor("data_in").alpha == want
    assert run(setup, SOME_FIT, bands=True).configs["seq_blocks.2"].tensor("data_in").alpha == want


@pytest.mark.parametrize("budget", [ALL_FIT, SOME_FIT])
def test_two_processes_give_the_single_process_alpha(setup, budget):
    plan, ckpt = setup
    settings = pipeline.RunSettings(ckpt=ckpt, dataset="toy-tiny", progress=False, quantile_budget_mib=budget)
    single = workers.apply_worker(plan, settings)
    two = workers.run_workers(2, workers.apply_worker, plan, settings)
    assert two.configs == single.configs
    assert passes(two) == passes(single)
    assert derived_values(two) == derived_values(single)


def test_a_band_around_the_predicted_delta_answers_in_one_pass_with_the_same_bits(setup):
    """A budget too small for every value (64 KiB for 200 KiB inputs) but enough for the values near Δ: one pass
    everywhere, and α bit for bit that of every value kept and of a second pass."""
    banded = run(setup, SOME_FIT, bands=True)
    assert set(passes(banded).values()) == {1}
    kept_all, second = run(setup, ALL_FIT), run(setup, NONE_FIT)
    assert set(passes(second).values()) == {2}
    assert alphas(banded) == alphas(kept_all) == alphas(second)
    assert derived_values(banded) == derived_values(kept_all) == derived_values(second)


def test_a_delta_outside_its_band_takes_a_second_pass_with_the_same_bits(setup, monkeypatch):
    """Predictions twice too large: no final Δ lies in its band, so those tensors take a second pass, and α is
    still the one of every value kept."""
    seen: list = []
    doubled = run(setup, SOME_FIT, monkeypatch, seen, bands=True, predict=lambda got: {k: (2 * lo, 2 * hi) for k, (lo, hi) in got.items()})
    assert {p for p, n in passes(doubled).items() if n == 2}  # the band missed somewhere
    (second,) = seen
    assert set(second) == {p for p, n in passes(doubled).items() if n == 2}
    assert alphas(doubled) == alphas(run(setup, ALL_FIT))


def test_a_plan_without_its_derived_points_is_refused_not_worked_out_again(setup):
    """The plan is the only door: the runtime does not decide on its own that α needs a statistic."""
    import attrs

    from ternqc.runtime.errors import UserError

    plan, ckpt = setup
    bare = attrs.evolve(plan, profile=tuple(p for p in plan.profile if p.reason != "derived"))
    settings = pipeline.RunSettings(ckpt=ckpt, dataset="toy-tiny", progress=False)
    with pytest.raises(UserError, match="lists none there"):
        pipeline.apply(pipeline.load_model(settings), bare, settings)


def test_a_sweep_over_the_activation_threshold_finishes_every_combination_in_one_pass(setup):
    """One calibration for three thresholds of the same profile: the bands join every combination's predicted
    Δ, so each combination's α comes from the first pass, bit for bit as an `apply` keeping every value."""
    from ternqc.compiler import compile_source
    from ternqc.runtime.run.sweep import run_sweep

    _, ckpt = setup
    text = builtin_recipe("ternary_full.tq").read_text()
    assert text.count("data_in_threshold = 0.7 *") == 1
    plans = [
        ({"k": k}, compile_source(text.replace("data_in_threshold = 0.7 *", f"data_in_threshold = {k} *"), "k.tq").plan)
        for k in ("0.6", "0.7", "0.8")
    ]
    settings = pipeline.RunSettings(ckpt=ckpt, dataset="toy-tiny", progress=False, quantile_budget_mib=0.5)
    swept = run_sweep(pipeline.load_model(settings), plans, settings, reports=True)
    assert swept.calibrations == 1
    for (_, plan), row in zip(plans, swept.rows):
        one_pass = {
            node["path"]: node["tensors"]["data_in"]
            for node in row.report["nodes"].values()
            if node["tensors"]["data_in"].get("quantized")
        }
        assert {d["alpha_passes"] for d in one_pass.values()} == {1}
        alone = pipeline.RunSettings(ckpt=ckpt, dataset="toy-tiny", progress=False, quantile_budget_mib=256)
        want = pipeline.apply(pipeline.load_model(alone), plan, alone)
        assert {p: d["alpha"] for p, d in one_pass.items()} == {
            node["path"]: node["tensors"]["data_in"]["alpha"]
            for node in want.report["nodes"].values()
            if node["path"] in one_pass
        }


@pytest.mark.parametrize("model_kind", ["toy", "transformer"])
def test_the_first_batch_probe_gives_the_bands_of_a_calibration_of_that_batch(setup, model_kind):
    """`FirstBatchProbe` collects the prediction's statistics during a forward of the first batch run for another
    reason (the model check): the same bands as `predict_bands`, which calibrates that batch itself."""
    from ternqc.runtime.run.effects import check_model
    from ternqc.runtime.run.predict import FirstBatchProbe, predict_bands

    plan, _ = setup
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    if model_kind == "toy":
        model = ToyNet().eval()
        batches = [(torch.rand(64, 1, 2, 2, generator=g) * 10 - 5, None) for _ in range(4)]
    else:
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation=torch.nn.ReLU(), batch_first=True)
        model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        batches = [(torch.randn(4, 16, 32, generator=g), None) for _ in range(4)]
    budget = 256 * 1024
    want = predict_bands(model, [plan], batches, budget)
    probe = FirstBatchProbe(model, [plan], batches, budget)
    check_model(model, batches[0], around=probe.collecting)
    assert want and probe.bands == want


def test_apply_calibrates_the_first_batch_only_in_the_pass(setup, monkeypatch):
    """`apply` in one process: the Δ prediction's statistics come from the model check's forward, so the only
    calibration is the pass over every batch (before: a calibration of the first batch, then the pass)."""
    calls = []
    real = loop.calibrate_pass

    def spy(model, batches, *args, **kwargs):
        calls.append(len(batches))
        return real(model, batches, *args, **kwargs)

    monkeypatch.setattr(loop, "calibrate_pass", spy)
    result = run(setup, SOME_FIT, bands=True)
    assert calls[0] > 1 and 1 not in calls
    assert any(n == 1 for n in passes(result).values())
