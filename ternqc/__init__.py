"""ternqc: a rule language and compiler for ternary quantisation of PyTorch models.

Flow: `compile` a rules file (.tq) into a `Plan`; the runtime prepares hooks from the plan, calibrates,
maps statistics to quantiser parameters and converts modules to ternary ones; `finetune(...)` then trains the
ternary model with the quantisers in the loop.
"""

from ternqc.plan import Plan
from ternqc.tuning import finetune

__all__ = ["Plan", "__version__", "finetune"]
__version__ = "0.1.0"
