"""Recurrent layers (``nn.LSTM``, ``nn.GRU``): the weight rule per gate block.

A gate's pre-activation is a linear map of the input and of the hidden state. With every gate
block's rows copied r times (interleaved within the block) and the columns divided over the
copies of each input or hidden channel (zero-sum noise), each teacher gate row equals its
student row exactly; the teacher's hidden and cell states are then exact copies of the
student's at every step, and the recurrence stays exact (GRU's reset gate included).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layout import Layout, interleaved
from ..registry import CannotExpand, register
from ..weights import widen_per_channel
from ._common import arg, clone_module
from .linear_ops import widen_linear_weight


@register(nn.LSTM, nn.GRU, nn.RNN)
def recurrent(ctx, node):
    m = ctx.module()
    x = node.args[0]
    if arg(node, 1, "hx") is not None:
        raise CannotExpand("initial hidden state given")
    if getattr(m, "proj_size", 0):
        raise CannotExpand("LSTM with proj_size")
    sx = ctx.sval(x)
    if not isinstance(sx, torch.Tensor):
        raise CannotExpand("packed sequence input")
    lay = ctx.layout(x)
    nd = sx.dim()
    if lay is not None and lay.dim != nd - 1:
        raise CannotExpand(f"features expected on the last dim, the input has them on dim {lay.dim}")
    r, H = ctx.r, m.hidden_size
    dirs = 2 if m.bidirectional else 1
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    hid = interleaved(H, r, 0).index                       # teacher -> student hidden unit
    rows = Layout(0, torch.cat([g * H + hid for g in range(gates)]), r)
    layer_in, in_width = (None if lay is None else lay.index), m.input_size
    params, sources = {}, []
    for layer in range(m.num_layers):
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            for kind, index, width in (("ih", layer_in, in_width), ("hh", hid, H)):
                name = f"weight_{kind}{sfx}"
                params[name], src = widen_linear_weight(ctx, getattr(m, name), 0, 1, rows, index, width)
                sources.append((name, src))
                if m.bias:
                    name = f"bias_{kind}{sfx}"
                    params[name] = widen_per_channel(getattr(m, name).detach(), 0, rows.index)
                    sources.append((name, {"out": (0, rows.first_copy())}))
        # the next layer reads [forward hidden | backward hidden], each interleaved
        layer_in, in_width = torch.cat([d * H + hid for d in range(dirs)]), dirs * H
    new = clone_module(m, params, input_size=m.input_size if lay is None else lay.index.numel(),
                       hidden_size=r * H)
    new._init_flat_weights()   # the flat-weight list still points at the student's tensors
    target = ctx.add_module(node.target, new)
    for name, src in sources:
        ctx.add_source(f"{node.target}.{name}", node.target, name, **src)
    out = Layout(nd - 1, layer_in, r)
    state = Layout(nd - 1, hid, r)          # h_n / c_n: (layers * dirs, [batch,] hidden)
    lays = (out, (state, state)) if m.mode == "LSTM" else (out, state)
    return ctx.emit("call_module", target, (ctx.dt(x),), {}), lays
