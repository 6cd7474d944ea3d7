"""ternqc: a rule language and compiler for ternary quantisation of PyTorch models.

Flow: `compile` a rules file (.tq) into a `Plan`; the runtime prepares hooks from the plan, calibrates,
maps statistics to quantiser parameters and converts modules to ternary ones.
"""

from ternqc.plan import Plan

__all__ = ["Plan", "__version__", "load_packed"]
__version__ = "0.1.0"


def load_packed(path, model=None):
    """Rebuild a model saved by `ternqc export --format packed` on the integer engine.

    `model` is the float model to convert in place (default: the built-in model the file names). The result
    gives outputs equal bit for bit to the exported engine model. See docs/PACKED.md.
    """
    from ternqc.runtime.engine.packed import load_packed as _load_packed

    return _load_packed(path, model)
