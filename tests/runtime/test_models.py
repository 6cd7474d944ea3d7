"""build_model: the built-in toy network, user factories from files and packages, and every error."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from ternqc.runtime.errors import UserError
from ternqc.runtime.models.builtin import ToyNet, build_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
USER_MODEL = f"{FIXTURES / 'user_model.py'}:factory"
BAD = FIXTURES / "bad_factories.py"


def test_toy_has_mase_module_names_and_shapes():
    model = build_model("toy")
    assert isinstance(model, ToyNet)
    names = {name: type(m).__name__ for name, m in model.named_modules() if name}
    assert names == {
        "seq_blocks": "Sequential",
        "seq_blocks.0": "Linear",
        "seq_blocks.1": "ReLU",
        "seq_blocks.2": "Linear",
        "seq_blocks.3": "ReLU",
        "seq_blocks.4": "Linear",
    }
    x = torch.randn(3, 1, 2, 2)
    expected = x.view(3, 4)
    for block in model.seq_blocks:  # the forward, computed by hand
        expected = block(expected)
    assert torch.equal(model(x), expected)
    assert model(x).shape == (3, 2)


def test_user_model_from_file_relative_to_cwd(monkeypatch):
    monkeypatch.chdir(FIXTURES.parent.parent)
    model = build_model("tests/fixtures/user_model.py:factory")
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Conv2d", "Linear", "ReLU"} <= kinds
    assert any(name.count(".") >= 2 for name, _ in model.named_modules())  # nested submodules
    assert model(torch.randn(5, 1, 4, 4)).shape == (5, 2)


def test_user_model_is_seeded_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b = build_model(USER_MODEL), build_model(USER_MODEL)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_user_model_forward_is_not_fx_traceable():
    """The fixture must keep its data-dependent `if`: the profiler's tests rely on FX failing on it."""
    with pytest.raises(Exception, match="(?i)control flow|symbolically traced"):
        torch.fx.symbolic_trace(build_model(USER_MODEL))


def test_user_model_from_package_module(tmp_path, monkeypatch):
    pkg = tmp_path / "my_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def small():
                return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_models.nets:small")
    assert isinstance(model, nn.Sequential)
    assert model(torch.zeros(2, 1, 2, 2)).shape == (2, 3)


def test_user_file_can_import_its_siblings(tmp_path):
    (tmp_path / "helpers_for_model.py").write_text("from torch import nn\nWIDTH = 7\n")
    (tmp_path / "m.py").write_text(
        "from torch import nn\nfrom helpers_for_model import WIDTH\n"
        "def factory():\n    return nn.Linear(2, WIDTH)\n"
    )
    assert build_model(f"{tmp_path / 'm.py'}:factory").out_features == 7


def _error(spec: str) -> str:
    with pytest.raises(UserError) as info:
        build_model(spec)
    return str(info.value)


def test_unknown_builtin_suggests_the_close_name():
    msg = _error("toyy")
    assert "unknown model 'toyy'" in msg and "did you mean 'toy'" in msg and "file.py:factory" in msg


def test_missing_file():
    msg = _error("no/such/model_file.py:factory")
    assert "no/such/model_file.py" in msg and "does not exist" in msg


def test_missing_attribute_suggests_close_names():
    msg = _error(f"{BAD}:model_raise")
    assert "has no attribute 'model_raise'" in msg and "did you mean 'model_raises'" in msg


def test_attribute_that_is_not_callable():
    msg = _error(f"{BAD}:NOT_A_FACTORY")
    assert "NOT_A_FACTORY" in msg and "not a function" in msg


def test_factory_that_raises_names_factory_and_exception():
    msg = _error(f"{BAD}:model_raises")
    assert "model_raises" in msg and "ValueError" in msg and "fails on purpose" in msg
    assert "bad_factories.py:" in msg  # where it raised
    assert "\n" not in msg  # one paragraph


def test_factory_returning_a_non_module():
    msg = _error(f"{BAD}:model_returns_dict")
    assert "returned a builtins.dict" in msg and "nn.Module" in msg


def test_file_that_fails_to_import(tmp_path):
    (tmp_path / "broken.py").write_text("import torch\ndef factory(:\n")
    msg = _error(f"{tmp_path / 'broken.py'}:factory")
    assert "importing model file" in msg and "SyntaxError" in msg


def test_module_not_found():
    msg = _error("surely_not_a_module_xyz.nets:factory")
    assert "surely_not_a_module_xyz" in msg and "PYTHONPATH" in msg


def test_spec_without_factory_name():
    msg = _error("model.py:")
    assert "FILE.py:factory" in msg


def test_file_without_factory_name_says_how_to_write_it():
    msg = _error("models/net.py")
    assert "looks like a file" in msg and "models/net.py:NAME" in msg
