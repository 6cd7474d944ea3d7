"""The integer engine: converted Linears and convs whose matmul runs in int8 × int8 → int32 (`linear.IntLinear`,
`conv.IntConv`),
`to_engine_(model)` to put a converted model on it (`convert.py`), and the packed safetensors export
(`packed.py`)."""

from ternqc.runtime.engine.convert import EngineReport, to_engine_
from ternqc.runtime.engine.linear import IntLinear

__all__ = ["EngineReport", "IntLinear", "to_engine_"]
