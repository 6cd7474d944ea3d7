"""`IntLinear`: a converted Linear whose matmul runs in integers.

In: a converted Linear (quantised in place, `quantize.modules`; its state read through that module's helpers) whose weight and data_in are quantised to at most 8 bits
(ternary, binary or integer), with a per-tensor or dynamic per-row input scale. Out: a module computing

    y = (c_x @ c_W^T) · (s_x · s_W) + b

with 8-bit codes c, the product accumulated exactly in int32 and one float rescale (`intmm.py`: oneDNN's
u8 × s8 kernel with the rescale, bias and a folded ReLU fused; `torch._int_mm` otherwise): s_x per tensor
or per row (dynamic), s_W per tensor, per output channel or per group (then one product per group of input
columns, each rescaled by its scales). b is the bias as the simulated forward uses it (its quantised bias
when the bias is quantised). A quantised data_out is applied in float on y.

Everything the forward needs is in buffers (`wcodes` int8 [out, in], `wscale`, `bias`, the input and output
Δ/α), so `state_dict` / `load_state_dict` carry a module whole (the packed export relies on it); oneDNN's
prepacked weight is a cache rebuilt from `wcodes`. `relu` is set by fusion (`convert.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from ternqc.runtime.engine.inputs import MAX_ENGINE_WIDTH, InputQuant, input_ineligible
from ternqc.runtime.engine.intmm import int_matmul, onednn_available, prepack, qlinear_onednn
from ternqc.runtime.quantize.kinds import get_kind, row_dims
from ternqc.runtime.quantize.kinds.registry import scale_for
from ternqc.runtime.quantize.modules import (
    activation_quantiser,
    is_converted,
    latent_param,
    quantized_param,
    resolved_quant,
    ternary_param,
)
from ternqc.runtime.quantize.types import param_view

#: op -> the float class whose own forward a module must keep to be replaced by an engine module.
_FORWARDS = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d}


def engine_op(m: nn.Module) -> str | None:
    """The op (`linear`, `conv1d`, `conv2d`) of a converted module the engine has a kernel for, else None."""
    return m.ternary_config.op if is_converted(m) and m.ternary_config.op in _FORWARDS else None


def ineligible(m: nn.Module) -> str | None:
    """Why `m` cannot go on the engine (None: it can): an `IntLinear` for a converted Linear, an `IntConv`
    (`conv.py`) for a converted Conv1d/Conv2d with groups = 1 and zero padding."""
    op = engine_op(m)
    if op is None:
        return f"{type(m).__name__} has no integer kernel (converted Linear, Conv1d and Conv2d only)"
    if type(m).forward is not _FORWARDS[op].forward:
        return f"{type(m).__name__} has its own forward (the engine replaces only the standard one)"
    if op != "linear" and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
        return "a grouped conv, or one with non-zero or 'same'/'valid' padding, has no integer kernel"
    rq = resolved_quant(m)
    w = rq.tensor("weight")
    p = ternary_param(m, "weight")
    if not w.quantize or p is None:
        return "the weight is float"
    if w.width > MAX_ENGINE_WIDTH:
        return f"the weight has {w.width} bits (the engine takes up to {MAX_ENGINE_WIDTH})"
    alpha = p.alpha_of(latent_param(m, "weight"))
    if alpha is not None and alpha.numel() not in (1, param_view(m, "weight").shape[0]) and not w.group_size:
        return "the weight scale is neither per tensor, per channel nor per group"
    q = activation_quantiser(m, "data_in")
    return input_ineligible(rq.tensor("data_in"), None if q is None else q.alpha)


class IntLinear(nn.Module):
    """The integer-engine Linear; build with `IntLinear.from_module(ternary_linear)`."""

    @classmethod
    def from_module(cls, m: nn.Module) -> IntLinear:
        """Build from a converted Linear (ValueError when `ineligible(m)`); `IntConv` from a conv."""
        reason = ineligible(m)
        if reason is None and (engine_op(m) == "linear") != (cls is IntLinear):
            reason = f"{cls.__name__} cannot be built from a {type(m).__name__}"
        node = m.ternary_config.node if is_converted(m) else type(m).__name__
        if reason is not None:
            raise ValueError(f"{node}: {reason}")
        self = cls()
        rq = resolved_quant(m)
        self.node, self.config = node, rq
        param = ternary_param(m, "weight")
        latent = latent_param(m, "weight")
        w = (latent.t() if param.transposed else latent).detach()  # the language's layout [out, ...]
        self.out_features = w.shape[0]
        self.in_features = w[0].numel()  # a conv's row: in_channels · kernel elements
        tw = rq.tensor("weight")
        with torch.no_grad():
            alpha = param.alpha_of(latent)
            full = None if alpha is None else scale_for(alpha, tuple(w.shape), tw)
            self.group_size = tw.group_size if full is not None and full is not alpha else None
            codes = get_kind(tw.kind).codes(w, tw, param.delta, full)
            self.register_buffer("wcodes", codes.to(torch.int8).reshape(self.out_features, -1).contiguous())
            if alpha is None:
                wscale = torch.ones(self.out_features, dtype=w.dtype)
            elif self.group_size:
                wscale = alpha.t().contiguous()  # [n_groups, N]
            else:
                wscale = alpha.reshape(-1).expand(self.out_features).contiguous()
            self.register_buffer("wscale", wscale.clone())
            qb = quantized_param(m, "bias")
            bias = qb if qb is not None else param_view(m, "bias")  # as the simulated forward uses it
            self.register_buffer("bias", None if bias is None else bias.detach().clone())
            tin = rq.tensor("data_in")
            qin, qout = activation_quantiser(m, "data_in"), activation_quantiser(m, "data_out")
            self.register_buffer("in_delta", None if qin.delta is None else qin.delta.clone())
            in_alpha = qin.alpha if tin.scaling else None
            self.register_buffer("in_alpha", None if in_alpha is None else in_alpha.reshape(()).clone())
            out_delta = None if qout is None else qout.delta
            out_alpha = None if qout is None else qout.alpha
            self.register_buffer("out_delta", None if out_delta is None else out_delta.clone())
            self.register_buffer("out_alpha", None if out_alpha is None else out_alpha.clone())
        self._in = InputQuant(tin, self.in_delta, self.in_alpha)
        self._out = rq.tensor("data_out")
        self.relu = False
        self.onednn = onednn_available()
        self._packed = None
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        nonnegative = self._in.nonnegative
        self._in = InputQuant(self._in.tq, self.in_delta, self.in_alpha)  # buffers were replaced
        self._in.nonnegative = nonnegative
        self._packed = None
        self._wmax = None

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_packed": None}  # oneDNN's opaque tensor does not copy or pickle

    def _use_onednn(self) -> bool:
        """oneDNN's u8 × s8 kernel, unless a pair of products could saturate the int16 intermediate that
        AVX2's vpmaddubsw keeps (2 · max u8 code · max |weight code| > 32767: 8-bit weights with signed
        8-bit inputs); `torch._int_mm` is exact there."""
        if not self.onednn:
            return False
        if self._wmax is None:
            self._wmax = int(self.wcodes.abs().max()) if self.wcodes.numel() else 0
        tq = self._in.tq
        umax = 2 if tq.kind != "integer" else (self._in.high if self._in.nonnegative else 255)
        return 2 * umax * self._wmax <= 32767

    _wmax: int | None = None

    def _pack(self) -> list[torch.Tensor]:
        if self._packed is None:
            g = self.group_size or self.in_features
            self._packed = [prepack(self.wcodes[:, i:i + g].contiguous()) for i in range(0, self.in_features, g)]
            self._wzp = torch.zeros(self.out_features, dtype=torch.int64)
            self._wscale_rows = [s.float().contiguous() for s in self.wscale.reshape(-1, self.out_features)]
        return self._packed

    # --- forward ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        c, zp, s = self._in.codes(x.reshape(-1, self.in_features))
        y = self._rows(c, zp, s).reshape(*lead, self.out_features)
        return self._quant_out(y, "linear")

    def _rows(self, c: torch.Tensor, zp: int, s) -> torch.Tensor:
        """`y [rows, N]` from uint8 codes `c [rows, K]` (zero point `zp`) and the input scale `s`."""
        dynamic = not isinstance(s, float)
        if self._use_onednn() and not self.group_size and not dynamic:
            (packed,) = self._pack()
            y = qlinear_onednn(c, zp, s, packed, self._wscale_rows[0], self._wzp, self.bias, self.relu)
        else:
            y = self._accumulate(c, zp)
            if self.bias is not None:
                y = torch.addcmul(self.bias, y, s) if dynamic else y.mul_(s).add_(self.bias)
            else:
                y.mul_(s)
            if self.relu:
                y.relu_()
        return y

    def _quant_out(self, y: torch.Tensor, op: str) -> torch.Tensor:
        if not self._out.quantize:
            return y
        kind = get_kind(self._out.kind)
        scale = kind.dynamic_scale(y, self._out, row_dims(op, y)) if self._out.dynamic else self.out_alpha
        return kind.quantize(y, self._out, self.out_delta, scale)

    def _accumulate(self, c: torch.Tensor, zp: int) -> torch.Tensor:
        """Σ_g ((c - zp)_g @ W_g^T) · s_W[g] in float32, one exact integer product per group of input
        columns (a single group without per-group scales)."""
        g = self.group_size or self.in_features
        if self._use_onednn():
            packed = self._pack()
            y = None
            for i, (pk, ws) in enumerate(zip(packed, self._wscale_rows)):
                ci = c[:, i * g:(i + 1) * g].contiguous() if len(packed) > 1 else c
                part = qlinear_onednn(ci, zp, 1.0, pk, ws, self._wzp, None, False)
                y = part if y is None else y.add_(part)
            return y
        a = c.view(torch.int8) if zp == 0 else (c.to(torch.int16) - zp).to(torch.int8)
        y = None
        for i, ws in enumerate(self.wscale.reshape(-1, self.out_features)):
            acc = int_matmul(a[:, i * g:(i + 1) * g].contiguous(), self.wcodes[:, i * g:(i + 1) * g].t())
            part = acc.to(self.wscale.dtype).mul_(ws)
            y = part if y is None else y.add_(part)
        return y

    def extra_repr(self) -> str:
        tin, tw = self._in.tq, self.config.tensor("weight")
        fused = ", relu" if self.relu else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, node={self.node}, "
                f"weight={get_kind(tw.kind).describe(tw)}, data_in={get_kind(tin.kind).describe(tin)}{fused}")


__all__ = ["IntLinear", "ineligible"]
