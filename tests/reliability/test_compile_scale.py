"""Compile time is linear in the number of rules (issue 13: 10,000 bindings took 39 s, with 37.5 M
`Selector.__eq__` calls from the summary). Measured as work, not time: the number of selector and statistic
comparisons for N and 4N bindings must grow at most linearly (quadratic growth would be 16 ×)."""

from __future__ import annotations

from ternqc import plan
from ternqc.compiler import compile_source
from ternqc.render import summarize


def _rules(n: int) -> str:
    lines = ["profile linear.weight: range_min_max(dims = all)"]
    for i in range(n):
        lines.append(f'"layer{i}".weight_threshold = {i % 7}.5 * stat.range_min_max.max')
        lines.append(f'"layer{i}".data_in_scaling_factor = true')
        lines.append(f'"layer{i}".data_in_threshold = stat(data_in).range_quantile(quantile = 0.5).max')
    return "\n".join(lines) + "\n"


def _comparisons(n: int, monkeypatch) -> int:
    calls = [0]
    for cls in (plan.Selector, plan.StatSpec, plan.Binding, plan.ProfilePoint):
        original = cls.__eq__

        def counting(self, other, _original=original):
            calls[0] += 1
            return _original(self, other)

        monkeypatch.setattr(cls, "__eq__", counting)
    compiled = compile_source(_rules(n), "r.tq")
    summary = summarize(compiled.plan)
    assert summary.count("\n") > 3 * n  # every selector and parameter is listed
    monkeypatch.undo()
    return calls[0]


def test_compile_and_summary_do_linear_work(monkeypatch) -> None:
    small, large = _comparisons(150, monkeypatch), _comparisons(600, monkeypatch)
    assert large <= 4 * small * 1.5 + 100, (small, large)
