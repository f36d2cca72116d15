"""Shape ops: reshape/view/flatten, permutes, (un)squeeze, expand/repeat, indexing, cat/split.

Reshapes are handled by grouping input and output dims whose sizes multiply to the same number
(the way ``view`` itself reasons). Within the group holding the channel dim:
- a split (``C -> (H, D)``) scales only the innermost factor (``D -> rD``), exact for the
  interleaved layout;
- a merge (``(C, H, W) -> CHW``) yields the explicit teacher->student map of the merged dim,
  whatever the input layout (this is how ``flatten -> linear`` and channel shuffles stay exact).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..layout import Layout, interleaved
from ..registry import CannotExpand, register
from ._common import arg, norm_dim


# ---- reshape ---------------------------------------------------------------------------------
def _groups(src: list[int], dst: list[int]) -> list[tuple[list[int], list[int]]]:
    groups, i, j = [], 0, 0
    n, m = len(src), len(dst)
    while i < n or j < m:
        if i < n and src[i] == 1 and (j >= m or dst[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < m and dst[j] == 1 and (i >= n or src[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= n or j >= m:
            raise CannotExpand("reshape sizes do not line up")
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= n:
                    raise CannotExpand("reshape sizes do not line up")
                gi.append(i)
                pi *= src[i]
                i += 1
            else:
                if j >= m:
                    raise CannotExpand("reshape sizes do not line up")
                gj.append(j)
                pj *= dst[j]
                j += 1
        groups.append((gi, gj))
    return groups


def reshape_layout(src: list[int], dst: list[int], lay: Layout, r: int) -> tuple[list[int], Layout, bool]:
    """Teacher output shape and layout of a reshape; the bool says the input must be interleaved."""
    groups = _groups(src, dst)
    for n, (gi, gj) in enumerate(groups):
        if lay.dim not in gi:
            continue
        # trailing size-1 output dims belong to the channel factor: (.., 3*H*1) -> (.., 3, H, 1)
        # splits into heads of dim 1, whose innermost factor (the 1) is the one to widen
        # (only for a real split: (B, C) -> (B, C, 1, 1) keeps C as the channel dim)
        gj = list(gj)
        if sum(dst[k] != 1 for k in gj) > 1:
            for gi2, gj2 in groups[n + 1:]:
                if gi2 or any(dst[k] != 1 for k in gj2):
                    break
                gj += gj2
        if not gj and n > 0 and groups[n - 1][1]:
            # a size-1 channel dim (head dim 1) merged into the dims before it: (.., H, 1) -> (.., H)
            gi, gj = list(groups[n - 1][0]) + list(gi), list(groups[n - 1][1])
        if not gj:
            raise CannotExpand("channel dim reshaped away")
        tshape = list(dst)
        # the merged (flat) map of the group's input dims, channel dim widened
        sizes = [src[k] * (r if k == lay.dim else 1) for k in gi]
        flat = torch.zeros(1, dtype=torch.long)
        for k, size in zip(gi, sizes):
            coord = lay.index if k == lay.dim else torch.arange(size)
            flat = (flat[:, None] * src[k] + coord[None, :]).reshape(-1)
        nontriv = [k for k in gj if dst[k] != 1]
        if len(nontriv) == 1 and nontriv[0] == gj[-1]:
            o = nontriv[0]
            tshape[o] *= r
            return tshape, Layout(o, flat, r), False
        # split into several output dims: scale the innermost one; needs copies adjacent in flat
        # (a channel dim of student width 1 counts: its r teacher copies are not size 1)
        inner = [k for k in gi if src[k] != 1 or k == lay.dim][-1]
        if inner != lay.dim:
            raise CannotExpand("reshape splits a merged dim whose channel part is not innermost")
        o = gj[-1]
        tshape[o] *= r
        return tshape, interleaved(dst[o], r, o), not lay.is_interleaved
    raise CannotExpand("channel dim not found in reshape")


def fix_sizes(ctx, size_args: list, desired: list[int]) -> list:
    """Teacher size arguments giving ``desired``: keep those already right, fix the others.

    Sizes computed in the model from a teacher tensor's shape are already wide; literals and
    sizes of kept tensors are not. ``-1`` stays as it is.
    """
    out = []
    for a, want in zip(size_args, desired):
        d = a.node if isinstance(a, _Teacher) else ctx.dt(a)
        v = ctx.tval(d) if isinstance(d, fx.Node) else d
        if v == want or v == -1:
            out.append(d)
        elif isinstance(d, fx.Node) and v * ctx.r == want:
            out.append(ctx.call_function(operator.mul, d, ctx.r))
        elif isinstance(d, fx.Node) and v == want * ctx.r:
            out.append(ctx.call_function(operator.floordiv, d, ctx.r))
        else:
            out.append(want)
    return out


class _Teacher:
    """A size argument that is already a teacher node (an element of a teacher ``torch.Size``)."""

    def __init__(self, node: fx.Node):
        self.node = node


def _size_list(node: fx.Node, start: int, ctx) -> tuple[list, bool]:
    rest = list(node.args[start:])
    if not rest and "shape" in node.kwargs:
        rest = [node.kwargs["shape"]]
    if not rest and "size" in node.kwargs:
        rest = [node.kwargs["size"]]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0]), True
    if len(rest) == 1 and isinstance(rest[0], fx.Node) and not isinstance(ctx.sval(rest[0]), int):
        sv = ctx.sval(rest[0])
        return [_Teacher(ctx.call_function(operator.getitem, ctx.dt(rest[0]), i)) for i in range(len(sv))], True
    return rest, False


@register("view", "reshape", torch.reshape, transparent=True)
def reshape(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    sizes, packed = _size_list(node, 1, ctx)
    src, dst = list(ctx.sval(x).shape), list(ctx.out.shape)
    if lay is None:
        tshape, out_lay, xd = dst, None, ctx.dt(x)
    else:
        tshape, out_lay, need_inter = reshape_layout(src, dst, lay, ctx.r)
        xd = ctx.interleave(x)[0] if need_inter else ctx.dt(x)
    if len(sizes) != len(dst):
        raise CannotExpand("size list length differs from the output rank")
    new_sizes = fix_sizes(ctx, sizes, tshape)
    if node.op == "call_method":
        return ctx.call_method(node.target, xd, *new_sizes), out_lay
    return ctx.call_function(node.target, xd, tuple(new_sizes)), out_lay


@register("flatten", torch.flatten, nn.Flatten, transparent=True)
def flatten(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    tshape, out_lay, _ = reshape_layout(list(ctx.sval(x).shape), list(ctx.out.shape), lay, ctx.r)
    return ctx.emit_same(), out_lay


@register("unflatten", torch.unflatten, nn.Unflatten, transparent=True)
def unflatten(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    tshape, out_lay, need_inter = reshape_layout(list(ctx.sval(x).shape), list(ctx.out.shape), lay, ctx.r)
    xd = ctx.interleave(x)[0] if need_inter else ctx.dt(x)
    if node.op == "call_module":
        m = ctx.module()
        dim = norm_dim(m.dim, ctx.sval(x).dim())
        sizes = tshape[dim:dim + len(m.unflattened_size)]
        return ctx.call_method("unflatten", xd, dim, tuple(sizes)), out_lay
    dim = norm_dim(arg(node, 1, "dim"), ctx.sval(x).dim())
    sizes = list(arg(node, 2, "sizes"))
    new = fix_sizes(ctx, sizes, tshape[dim:dim + len(sizes)])
    return ctx.call_method("unflatten", xd, dim, tuple(new)), out_lay


# ---- dim moves -------------------------------------------------------------------------------
def _moved(ctx, node, new_dim_of):
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    return ctx.emit_same(), lay.at(new_dim_of(lay.dim, ctx.sval(x).dim()))


@register("permute", torch.permute, transparent=True)
def permute(ctx, node):
    dims = list(node.args[1:]) if len(node.args) > 2 or not isinstance(arg(node, 1, "dims"), (list, tuple)) \
        else list(arg(node, 1, "dims"))
    def f(d, nd):
        return [norm_dim(p, nd) for p in dims].index(d)
    return _moved(ctx, node, f)


@register("transpose", torch.transpose, "swapaxes", "swapdims", torch.swapaxes, torch.swapdims, transparent=True)
def transpose(ctx, node):
    def f(d, nd):
        a, b = norm_dim(arg(node, 1, "dim0"), nd), norm_dim(arg(node, 2, "dim1"), nd)
        return b if d == a else a if d == b else d
    return _moved(ctx, node, f)


@register("t", torch.t, transparent=True)
def t(ctx, node):
    return _moved(ctx, node, lambda d, nd: nd - 1 - d)


@register("movedim", torch.movedim, "moveaxis", torch.moveaxis, transparent=True)
def movedim(ctx, node):
    def f(d, nd):
        srcs, dsts = arg(node, 1, "source"), arg(node, 2, "destination")
        srcs = [srcs] if isinstance(srcs, int) else list(srcs)
        dsts = [dsts] if isinstance(dsts, int) else list(dsts)
        order = [None] * nd
        for s_, d_ in zip(srcs, dsts):
            order[norm_dim(d_, nd)] = norm_dim(s_, nd)
        rest = iter(k for k in range(nd) if k not in [norm_dim(s_, nd) for s_ in srcs])
        order = [o if o is not None else next(rest) for o in order]
        return order.index(d)
    return _moved(ctx, node, f)


@register("unfold", transparent=True)
def unfold(ctx, node):
    """``x.unfold(dim, size, step)``: sliding windows along a dim (HaloNet's halo blocks). The
    windows are counted on ``dim`` and indexed on a new last dim; other dims keep their place."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    d = norm_dim(arg(node, 1, "dimension"), ctx.sval(x).dim())
    if d == lay.dim:
        raise CannotExpand("unfold along the channel dim")
    return ctx.emit_same(), lay


@register(F.unfold, torch._C._nn.im2col, nn.Unfold, transparent=True)
def im2col(ctx, node):
    """``F.unfold``/``nn.Unfold`` (ATen ``im2col``, what the export front end binds it to):
    ``(N, C, H, W) -> (N, C*k*k, L)``, output channel ``c*k*k + j`` is tap ``j`` of input
    channel ``c``.

    Channels are never mixed, so the widened input's map carries over tap by tap: teacher
    output channel ``t*k*k + j`` holds student channel ``index[t]*k*k + j``. This is one
    :class:`Layout` on the output's channel dim (the input's map times ``k*k``, not interleaved
    even for an interleaved input); a weight layer reading it (a convolution written as
    unfold + linear) uses the map as it is. A reshape that splits it again, ``(N, C, k*k, L)``,
    follows the reshape rule's split policy: the copies go to the innermost factor (here the
    taps) after a permutation to the interleaved layout. Exact, but a later contraction over
    the taps then sums the copies (timm's VOLO outlook attention: its ``nn.Unfold`` boundary
    is gone, share 0.9995 -> 1.0, and the widening of ``v`` ends at ``attn @ v``).

    RAFT's convex upsampling (``torchvision.models.optical_flow``) is a case where widening
    the unfold buys the teacher nothing: it unfolds the 2-channel flow, views it as
    ``(N, 2, 9, 1, 1, h, w)`` and multiplies it with a softmaxed mask ``(N, 1, 9, 8, 8, h, w)``
    whose copies lie on a sub-pixel dim. A product is widened on one dim only, so the elementwise
    rule narrows the flow there (the mean of its copies); upsampling is linear in the flow with
    weights shared by its copies, so this gives what narrowing before the unfold gave (the
    boundary RAFT had without this rule): same values, same teacher capacity, a few more
    small ops on a (N, 2r*9, h*w) tensor."""
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    sx = ctx.sval(x)
    cdim = sx.dim() - 3          # (N, C, H, W) or unbatched (C, H, W)
    if lay.dim != cdim:
        raise CannotExpand(f"unfold of a tensor expanded on dim {lay.dim}, not its channel dim {cdim}")
    kk = ctx.out.shape[cdim] // sx.shape[cdim]
    index = (lay.index[:, None] * kk + torch.arange(kk)[None, :]).reshape(-1)
    return ctx.emit_same(), Layout(cdim, index, ctx.r)


@register("unsqueeze", torch.unsqueeze, transparent=True)
def unsqueeze(ctx, node):
    def f(d, nd):
        k = norm_dim(arg(node, 1, "dim"), nd + 1)
        return d + 1 if k <= d else d
    return _moved(ctx, node, f)


@register("squeeze", torch.squeeze, transparent=True)
def squeeze(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    shape = ctx.sval(x).shape
    dims = arg(node, 1, "dim")
    nd = len(shape)
    if dims is None:
        removed = [k for k in range(nd) if shape[k] == 1]
    else:
        dims = [dims] if isinstance(dims, int) else list(dims)
        removed = [norm_dim(k, nd) for k in dims if shape[norm_dim(k, nd)] == 1]
    if lay.dim in removed:
        raise CannotExpand("squeezes the channel dim")
    if dims is None and 1 in shape:
        # the teacher would keep a width-1 channel dim that the student squeezes: name dims
        args = (ctx.dt(x), tuple(removed))
        return ctx.call_method("squeeze", *args), lay.at(lay.dim - sum(k < lay.dim for k in removed))
    return ctx.emit_same(), lay.at(lay.dim - sum(k < lay.dim for k in removed))


@register("expand", "broadcast_to", torch.broadcast_to)
def expand(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    sizes, _ = _size_list(node, 1, ctx)
    dst = list(ctx.out.shape)
    xn = ctx.sval(x).dim()
    tshape = list(dst)
    out_lay = None
    if lay is not None:
        d = lay.dim + len(dst) - xn
        tshape[d] = lay.index.numel()
        out_lay = lay.at(d)
    new = fix_sizes(ctx, sizes, tshape)
    if node.op == "call_method" and node.target == "expand":
        return ctx.call_method("expand", ctx.dt(x), *new), out_lay
    return ctx.call_function(torch.broadcast_to, ctx.dt(x), tuple(new)), out_lay


@register("expand_as")
def expand_as(ctx, node):
    x, other = node.args[0], node.args[1]
    lay, olay = ctx.layout(x), ctx.layout(other)
    if lay is None and olay is None:
        return ctx.emit_same(), None
    nd = ctx.out.dim()
    if olay is not None:
        d = olay.dim
        xd = ctx.sval(x).dim()
        pd = d - (nd - xd)
        if pd >= 0 and ctx.sval(x).shape[pd] != 1:
            return ctx.call_method("expand_as", ctx.to_layout(x, olay.at(pd)), ctx.dt(other)), olay
        return ctx.emit_same(), olay
    raise CannotExpand("expand_as of an expanded tensor to a kept one")


@register("repeat", "tile", torch.tile)
def repeat(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    reps, _ = _size_list(node, 1, ctx)
    reps = [ctx.tval(a.node) if isinstance(a, _Teacher) else ctx.sval(a) if isinstance(a, fx.Node) else a
            for a in reps]
    nd_out = ctx.out.dim()
    d = lay.dim + nd_out - ctx.sval(x).dim()
    k = reps[len(reps) - nd_out + d] if len(reps) >= nd_out - d else 1
    c = lay.width
    index = torch.cat([lay.index + j * c for j in range(k)]) if k > 1 else lay.index
    return ctx.emit_same(), Layout(d, index, ctx.r)


# ---- indexing ----------------------------------------------------------------------------------
@register(operator.getitem, transparent=True)
def getitem(ctx, node):
    x, idx = node.args
    sv = ctx.sval(x)
    lay = ctx.layout(x)
    if not isinstance(sv, Tensor):
        # tuple/list/Size/dict element
        if isinstance(lay, (list, tuple)) and isinstance(idx, int):
            return ctx.emit_same(), lay[idx]
        if isinstance(lay, (list, tuple)) and isinstance(idx, slice):
            return ctx.emit_same(), type(lay)(lay[idx])
        return ctx.emit_same(), None
    if lay is None:
        if isinstance(ctx.out, Tensor) and any(isinstance(ctx.layout(a), Layout) for a in node.all_input_nodes):
            raise CannotExpand("indexing with an expanded index tensor")
        return ctx.emit_same(), None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    tensor_items = [k for k, i in enumerate(items) if isinstance(i, fx.Node) and isinstance(ctx.sval(i), Tensor)]
    if tensor_items:
        return _gather_rows(ctx, node, x, lay, items, tensor_items)
    nd = sv.dim()
    n_consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items = items[:e] + [slice(None)] * (nd - n_consuming) + items[e + 1:]
    items = items + [slice(None)] * (nd - sum(1 for i in items if i is not None))
    in_d = out_d = 0
    new_items = []
    out_lay = None
    for it in items:
        if it is None:
            new_items.append(None)
            out_d += 1
            continue
        if in_d == lay.dim:
            if isinstance(it, slice) and it == slice(None):
                out_lay = lay.at(out_d)
                new_items.append(it)
            elif isinstance(it, slice):
                return _slice_channel(ctx, node, x, lay, items, in_d)
            else:
                raise CannotExpand("integer index on the channel dim")
        else:
            new_items.append(ctx.dt(it))
        if isinstance(it, slice):
            out_d += 1
        in_d += 1
    return ctx.call_function(operator.getitem, ctx.dt(x), tuple(new_items)), out_lay


def _gather_rows(ctx, node, x, lay: Layout, items, tensor_items):
    """``x[idx]`` / ``x[:, idx]`` with one integer index tensor on a dim before the channel dim
    (relative-position-bias tables): the channel dim moves by ``idx.dim() - 1``."""
    if len(tensor_items) != 1 or any(i is None or i is Ellipsis for i in items):
        raise CannotExpand("advanced indexing pattern")
    k = tensor_items[0]
    index = ctx.sval(items[k])
    if index.dtype == torch.bool or k >= lay.dim or ctx.layout(items[k]) is not None:
        raise CannotExpand("advanced (tensor) indexing on or after the channel dim")
    if any(not (isinstance(i, slice) and i == slice(None)) for j, i in enumerate(items) if j != k):
        raise CannotExpand("advanced indexing mixed with slices")
    return ctx.emit_same(), lay.at(lay.dim - 1 + index.dim())


def _slice_channel(ctx, node, x, lay: Layout, items, pos):
    """A slice of the channel dim: keep the teacher channels whose student channel is selected."""
    it = items[pos]
    vals = [ctx.sval(v) if isinstance(v, fx.Node) else v for v in (it.start, it.stop, it.step)]
    chosen = list(range(lay.width))[slice(*vals)]
    rank = torch.full((lay.width,), -1, dtype=torch.long)
    rank[torch.tensor(chosen, dtype=torch.long)] = torch.arange(len(chosen))
    keep = (rank[lay.index] >= 0).nonzero().flatten()
    # order teacher channels by the order of their student channels in the slice
    keep = keep[torch.argsort(rank[lay.index[keep]], stable=True)]
    new_index = rank[lay.index[keep]]
    rest = list(items)
    rest[pos] = slice(None)
    # first apply the other indices (which keep the channel position at `pos` minus ints before it)
    other = tuple(ctx.dt(v) for v in rest)
    y = ctx.call_function(operator.getitem, ctx.dt(x), other)
    out_dim = sum(1 for v in rest[:pos] if not isinstance(v, int)) + 0
    y = ctx.call_function(torch.index_select, y, out_dim, ctx.index_buffer(keep))
    return y, Layout(out_dim, new_index, ctx.r)


# ---- cat / stack / split ---------------------------------------------------------------------
@register(torch.cat, torch.concat, torch.concatenate)
def cat(ctx, node):
    tensors = list(arg(node, 0, "tensors"))
    dim = arg(node, 1, "dim", 0)
    lays = [ctx.layout(t) for t in tensors]
    if not any(isinstance(l, Layout) for l in lays):
        return ctx.emit_same(), None
    nd = ctx.out.dim()
    dim = norm_dim(dim, nd)
    ref = next(l for l in lays if isinstance(l, Layout))
    if ref.dim == dim:
        parts, index, off = [], [], 0
        for t, l in zip(tensors, lays):
            w = ctx.sval(t).shape[dim]
            if l is None:
                l = interleaved(w, ctx.r, dim)
                parts.append(ctx.to_layout(t, l))
            else:
                parts.append(ctx.dt(t))
            index.append(l.index + off)
            off += w
        return ctx.call_function(torch.cat, parts, dim), Layout(dim, torch.cat(index), ctx.r)
    parts = [ctx.to_layout(t, ref) for t in tensors]
    return ctx.call_function(torch.cat, parts, dim), ref


@register(torch.stack)
def stack(ctx, node):
    tensors = list(arg(node, 0, "tensors"))
    lays = [ctx.layout(t) for t in tensors]
    if not any(isinstance(l, Layout) for l in lays):
        return ctx.emit_same(), None
    nd = ctx.out.dim()
    dim = norm_dim(arg(node, 1, "dim", 0), nd)
    ref = next(l for l in lays if isinstance(l, Layout))
    parts = [ctx.to_layout(t, ref) for t in tensors]
    return ctx.call_function(torch.stack, parts, dim), ref.at(ref.dim + (1 if dim <= ref.dim else 0))


def _split_out(ctx, node, x, lay: Layout, dim: int, sizes: list[int]):
    """Split along the channel dim with student sizes; each piece's teacher channels must be the
    copies of exactly its student channels (true for interleaved; else permute first)."""
    xd = ctx.dt(x)
    ok = True
    off = 0
    for s in sizes:
        seg = lay.index[off * ctx.r:(off + s) * ctx.r]
        if seg.numel() and (seg.min() < off or seg.max() >= off + s):
            ok = False
            break
        off += s
    if not ok:
        xd, lay = ctx.interleave(x)
    outs, off = [], 0
    for s in sizes:
        outs.append(Layout(dim, lay.index[off * ctx.r:(off + s) * ctx.r] - off, ctx.r))
        off += s
    node_out = ctx.call_function(torch.split, xd, [s * ctx.r for s in sizes], dim)
    return node_out, tuple(outs)


@register(torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split", "split_with_sizes")
def split(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    outs = ctx.out
    if lay is None:
        return ctx.emit_same(), None
    nd = ctx.sval(x).dim()
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim_pos = {"split": 2, "chunk": 2, "tensor_split": 2, "split_with_sizes": 2}[name]
    dim = norm_dim(arg(node, dim_pos, "dim", 0), nd)
    if dim != lay.dim:
        return ctx.emit_same(), tuple(lay for _ in outs)
    sizes = [o.shape[dim] for o in outs]
    return _split_out(ctx, node, x, lay, dim, sizes)


@register(torch.unbind, "unbind")
def unbind(ctx, node):
    x = node.args[0]
    lay = ctx.layout(x)
    if lay is None:
        return ctx.emit_same(), None
    nd = ctx.sval(x).dim()
    dim = norm_dim(arg(node, 1, "dim", 0), nd)
    if dim == lay.dim:
        raise CannotExpand("unbind along the channel dim")
    return ctx.emit_same(), tuple(lay.at(lay.dim - (1 if dim < lay.dim else 0)) for _ in ctx.out)


@register("reshape_as", "view_as", transparent=True)
def reshape_as(ctx, node):
    """``x.reshape_as(other)``: a reshape whose sizes come from ``other``'s teacher shape."""
    x, other = node.args[0], node.args[1]
    lay = ctx.layout(x)
    src, dst = list(ctx.sval(x).shape), list(ctx.out.shape)
    if lay is None:
        tshape, out_lay, xd = dst, None, ctx.dt(x)
    else:
        tshape, out_lay, need_inter = reshape_layout(src, dst, lay, ctx.r)
        xd = ctx.interleave(x)[0] if need_inter else ctx.dt(x)
    od = ctx.dt(other)
    if list(ctx.tval(od).shape) == list(tshape):
        return ctx.call_method(node.target, xd, od), out_lay
    sizes = [ctx.call_function(operator.getitem, ctx.call_method("size", od), i) for i in range(len(dst))]
    sizes = fix_sizes(ctx, [_Teacher(s) for s in sizes], tshape)
    return ctx.call_method("reshape", xd, *sizes), out_lay
