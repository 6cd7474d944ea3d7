"""ternqc: a rule language and compiler for ternary quantisation of PyTorch models.

Flow: `compile` a rules file (.tq) into a `Plan`; the runtime prepares hooks from the plan, calibrates,
maps statistics to quantiser parameters and converts modules to ternary ones; `finetune(...)` then trains the
ternary model with the quantisers in the loop (`ternqc.tuning`).

One call on a model you hold: `ternqc.quantize_(model, "weights_only", loader, eval_data=val_loader)`
(see `ternqc.api`). Importing ternqc imports neither torch nor lark: `quantize_`, `compile_rules` and
`Report` load on first use.
"""

from ternqc.plan import Plan

__all__ = ["Plan", "Report", "__version__", "compile_rules", "finetune", "load_packed", "quantize_"]
__version__ = "0.1.0"

_LAZY = {"quantize_": "ternqc.api", "compile_rules": "ternqc.api", "Report": "ternqc.api", "finetune": "ternqc.tuning"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ternqc' has no attribute {name!r}")


def load_packed(path, model=None):
    """Rebuild a model saved by `ternqc export --format packed` on the integer engine.

    `model` is the float model to convert in place (default: the built-in model the file names). The result
    gives outputs equal bit for bit to the exported engine model. See docs/PACKED.md.
    """
    from ternqc.runtime.engine.packed import load_packed as _load_packed

    return _load_packed(path, model)
