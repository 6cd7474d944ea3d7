"""The statistics registry is pinned to the plan's vocabulary, and every class takes the one constructor."""

from __future__ import annotations

import inspect

import pytest

from ternqc import plan
from ternqc.runtime.calibrate.stats import states
from ternqc.runtime.calibrate.stats.registry import STAT_REGISTRY, StatContext, register_stat


def test_every_statistic_of_the_plan_has_a_state_class_and_no_other():
    assert set(STAT_REGISTRY) == set(plan.STATISTICS) | set(plan.DERIVED_STATISTICS)


@pytest.mark.parametrize("name", sorted(STAT_REGISTRY))
def test_every_state_is_built_from_its_spec_and_a_context(name):
    cls = STAT_REGISTRY[name]
    assert list(inspect.signature(cls.__init__).parameters) == ["self", "spec", "ctx"]
    spec = plan.StatSpec(name)
    state = states.make_state(spec)
    assert type(state) is cls and state.spec == spec
    assert type(cls.from_spec(spec, StatContext(batched=False))) is cls


def test_a_name_registered_twice_fails():
    with pytest.raises(ValueError, match="registered twice"):
        register_stat("abs_mean")(type("Other", (), {}))


def test_make_state_has_no_per_class_branches():
    source = inspect.getsource(states.make_state)
    assert "if " not in source.split('"""')[-1]
