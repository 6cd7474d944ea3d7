"""`IntLinear`: a converted Linear whose matmul runs in integers.

In: a `TernaryLinear` (the simulated module) whose weight and data_in are quantised to at most 8 bits
(ternary, binary or integer), with a per-tensor or dynamic per-row input scale. Out: a module computing

    y = (c_x @ c_W^T) · (s_x · s_W) + b

with the codes c in int8, the product accumulated exactly in int32 (`intmm.int_matmul`), and one float
rescale: s_x per tensor or per row, s_W per tensor, per output channel or per group (then one int32
product per group, each rescaled by its column of scales). b is the module's bias as the simulated forward
uses it (its quantised bias when the bias is quantised). A quantised data_out is applied in float on y.

Everything the forward needs is in buffers, so `state_dict` / `load_state_dict` carry a module whole (the
packed export relies on it). Fusion (`convert.py`) may set `relu` (a following ReLU folded in) and `emit`
(the output is the *next* layer's int8 input codes, decided on the int32 accumulator: for a ternary next
input after a ReLU, c = [acc > floor((Δ - b) / (s_x·s_W))] per column, one comparison; for an integer one,
c = clamp(round(acc · s_x·s_W / s + b / s), 0, Q)). Those codes are exact functions of the accumulator;
the float simulation can differ where its rounded value lies within rounding of a threshold.
"""

from __future__ import annotations

import torch
from torch import nn

from ternqc.runtime.engine.inputs import MAX_ENGINE_WIDTH, InputQuant, input_ineligible
from ternqc.runtime.engine.intmm import int_matmul
from ternqc.runtime.quantize.kinds import get_kind, row_dims
from ternqc.runtime.quantize.kinds.registry import scale_for
from ternqc.runtime.quantize.modules import TernaryLinear

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def ineligible(m: nn.Module) -> str | None:
    """Why `m` cannot become an `IntLinear` (None: it can)."""
    if not isinstance(m, TernaryLinear):
        return f"{type(m).__name__} has no integer kernel (Linear only)"
    rq = m.resolved_quant()
    w = rq.tensor("weight")
    if not w.quantize or m.qweight is None:
        return "the weight is float"
    if w.width > MAX_ENGINE_WIDTH:
        return f"the weight has {w.width} bits (the engine takes up to {MAX_ENGINE_WIDTH})"
    alpha = m.weight_alpha
    if alpha is not None and alpha.numel() not in (1, m.out_features) and not w.group_size:
        return "the weight scale is neither per tensor, per channel nor per group"
    return input_ineligible(rq.tensor("data_in"), m.data_in_alpha)


class IntLinear(nn.Module):
    """The integer-engine Linear; build with `IntLinear.from_module(ternary_linear)`."""

    @classmethod
    def from_module(cls, m: TernaryLinear) -> IntLinear:
        """Build from a converted `TernaryLinear` (ValueError when `ineligible(m)`)."""
        reason = ineligible(m)
        if reason is not None:
            raise ValueError(f"{m.node}: {reason}")
        self = cls()
        rq = m.resolved_quant()
        self.node, self.config = m.node, rq
        self.in_features, self.out_features = m.in_features, m.out_features
        tw = rq.tensor("weight")
        self.group_size = tw.group_size if tw.group_size and m.weight_alpha is not None else None
        with torch.no_grad():
            w = m.weight.detach()
            alpha = m.weight_alpha
            full = None if alpha is None else scale_for(alpha, tuple(w.shape), tw)
            codes = get_kind(tw.kind).codes(w, tw, m.weight_delta, full)
            self.register_buffer("wcodes", codes.to(torch.int8).t().contiguous())  # [K, N] for int_matmul
            if alpha is None:
                wscale = torch.ones(self.out_features, dtype=w.dtype)
            elif self.group_size and alpha.dim() == 2 and alpha.shape[1] > 1:
                wscale = alpha.t().contiguous()  # [n_groups, N]
            else:
                self.group_size = None
                wscale = alpha.reshape(-1).expand(self.out_features).contiguous()
            self.register_buffer("wscale", wscale.clone())
            bias = m.qbias if m.qbias is not None else m.bias
            self.register_buffer("bias", None if bias is None else bias.detach().clone())
            tin = rq.tensor("data_in")
            self.register_buffer("in_delta", None if m.data_in_delta is None else m.data_in_delta.clone())
            in_alpha = m.data_in_alpha if tin.scaling else None
            self.register_buffer("in_alpha", None if in_alpha is None else in_alpha.reshape(()).clone())
            self.register_buffer("out_delta", None if m.data_out_delta is None else m.data_out_delta.clone())
            self.register_buffer("out_alpha", None if m.data_out_alpha is None else m.data_out_alpha.clone())
            static = self.in_alpha if self.in_alpha is not None else torch.ones((), dtype=w.dtype)
            colscale = None if tin.dynamic or self.group_size else (static * self.wscale)
            self.register_buffer("colscale", colscale)
        self._in = InputQuant(tin, self.in_delta, self.in_alpha)
        self._out = rq.tensor("data_out")
        self.relu = False
        self.register_buffer("emit_thr", None)  # int32 [N]: next ternary input codes = acc > thr
        self.register_buffer("emit_mul", None)  # float [N]: next integer input codes from acc
        self.register_buffer("emit_add", None)
        self.emit_high = 0
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._in = InputQuant(self._in.tq, self.in_delta, self.in_alpha)  # buffers were replaced

    # --- fusion -----------------------------------------------------------------------------------------

    def can_emit(self) -> bool:
        """Whether the next layer's codes can be computed from this layer's accumulator (a static column
        scale, no data_out quantiser)."""
        return self.colscale is not None and not self._out.quantize

    @torch.no_grad()
    def emit_for(self, nxt: IntLinear) -> bool:
        """Make this layer (followed by a ReLU) output `nxt`'s int8 input codes; False when `nxt`'s input
        quantiser has no such form (then nothing changes)."""
        tq = nxt._in.tq
        if not self.can_emit() or tq.dynamic or tq.kind == "binary":
            return False
        cs = self.colscale.double()
        b = self.bias.double() if self.bias is not None else torch.zeros_like(cs)
        if tq.kind == "ternary":
            d = nxt.in_delta.double().expand_as(cs) if nxt.in_delta.dim() <= 1 else None
            if d is None or bool((d < 0).any()):
                return False
            bound = torch.where(cs > 0, torch.floor((d - b) / cs.clamp(min=1e-300)),
                                torch.where(b > d, torch.full_like(cs, INT32_MIN), torch.full_like(cs, INT32_MAX)))
            self.emit_thr = bound.clamp(INT32_MIN, INT32_MAX).to(torch.int32)
        else:  # integer, static step
            s = nxt.in_alpha.double()
            if float(s) <= 0:
                return False
            self.emit_mul = (cs / s).to(self.colscale.dtype)
            self.emit_add = (b / s).to(self.colscale.dtype)
            self.emit_high = nxt._in.high
        nxt.takes_codes = True
        return True

    takes_codes = False

    # --- forward ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x.dtype == torch.int8:  # codes from a fused predecessor (static input scale)
            c, s = x2, self.in_alpha
        else:
            c, s = self._in.codes(x2)
        if self.group_size:
            y = self._grouped(c)
            if s is not None:
                y.mul_(s)
            if self.bias is not None:
                y.add_(self.bias)
        else:
            acc = int_matmul(c, self.wcodes)
            if self.emit_thr is not None:
                return (acc > self.emit_thr).view(torch.int8).reshape(*lead, self.out_features)
            if self.emit_mul is not None:
                q = torch.addcmul(self.emit_add, acc.to(self.emit_mul.dtype), self.emit_mul)
                q = q.round_().clamp_(0, self.emit_high).to(torch.int8)
                return q.reshape(*lead, self.out_features)
            y = acc.to(self.wscale.dtype)
            if self.colscale is not None:
                y = torch.addcmul(self.bias, y, self.colscale) if self.bias is not None else y.mul_(self.colscale)
            else:  # dynamic per-row input scale
                y.mul_(s).mul_(self.wscale)
                if self.bias is not None:
                    y.add_(self.bias)
        if self.relu:
            y.relu_()
        y = y.reshape(*lead, self.out_features)
        if self._out.quantize:
            kind = get_kind(self._out.kind)
            scale = kind.dynamic_scale(y, self._out, row_dims("linear", y)) if self._out.dynamic else self.out_alpha
            y = kind.quantize(y, self._out, self.out_delta, scale)
        return y

    def _grouped(self, c: torch.Tensor) -> torch.Tensor:
        """Σ_g (c_g @ W_g) · s_W[g], one int32 product per group of input columns."""
        g = self.group_size
        y = None
        for i in range(self.in_features // g):
            acc = int_matmul(c[:, i * g:(i + 1) * g].contiguous(), self.wcodes[i * g:(i + 1) * g])
            part = acc.to(self.wscale.dtype).mul_(self.wscale[i])
            y = part if y is None else y.add_(part)
        return y

    def extra_repr(self) -> str:
        tin, tw = self._in.tq, self.config.tensor("weight")
        fused = (", relu" if self.relu else "") + (", emits next codes" if self.emit_thr is not None or
                                                    self.emit_mul is not None else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, node={self.node}, "
                f"weight={get_kind(tw.kind).describe(tw)}, data_in={get_kind(tin.kind).describe(tin)}{fused}")


__all__ = ["IntLinear", "ineligible"]
