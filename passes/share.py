"""One set of teacher tensors: shared between the mode graphs, tied where the student ties,
never shared with the user's model.

Passes over finished teacher graphs that ``expand`` runs after the build and the
multi-branch rewrite (``DESIGN.md §1``: the teacher owns every tensor it trains; ``§3``: one
student-map source per student parameter).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gpd_fx.errors import VerificationError

from .branches import _Branched
from .module_paths import get_path, set_path
from .trace import MODE_ATTR

__all__ = ["own_tensors", "share_with", "tie_shared_parameters"]


def own_tensors(model: nn.Module, *graphs: nn.Module | None) -> None:
    """Give the teacher its own copy of every parameter and buffer that shares memory with the
    user's model.

    Rules keep tensors that need no widening as they are (the bias of a classifier whose output
    stays at student width), so an optimiser step on the teacher, or a BN update in train mode,
    would write into the user's module. Copying here, after every rule and the multi-branch
    rewrite ran, covers user rules too. One copy is made per distinct view
    of the user's memory, so tensors that are one in the teacher (tied weights) stay one.
    """
    theirs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
              if t.device.type != "meta" and t.untyped_storage().nbytes()}
    copies: dict[tuple, Tensor] = {}
    for g in graphs:
        if g is None:
            continue
        for mod in g.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is None or t.device.type == "meta" or t.untyped_storage().data_ptr() not in theirs:
                        continue
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(),
                           t.dtype, isinstance(t, nn.Parameter))
                    if key not in copies:
                        own = t.detach().clone()
                        copies[key] = nn.Parameter(own, t.requires_grad) if isinstance(t, nn.Parameter) else own
                    store[name] = copies[key]


def share_with(train_gm, teacher, sources, train_sources):
    """Make the train-mode graph use the eval graph's modules and parameters wherever both have
    the same target, and give the eval graph's root the train-only ones, so that one set of
    teacher parameters serves both modes and every student-map source resolves from ``teacher``."""
    def own(target):
        return not target.startswith(("_gpd_index", MODE_ATTR))

    for node in train_gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or not own(node.target):
            continue
        parent, _, name = node.target.rpartition(".")
        try:
            shared = teacher.get_submodule(node.target) if node.op == "call_module" else \
                get_path(teacher, node.target)
        except AttributeError:
            shared = None
        holder = train_gm.get_submodule(parent) if parent else train_gm
        mine = getattr(holder, name)
        if shared is not None and _shapes(mine) != _shapes(shared):
            raise VerificationError(
                f"the train-mode graph widened {node.target} differently from the eval-mode graph "
                f"({_shapes(mine)} vs {_shapes(shared)}); expand the model with aux outputs disabled")
        if shared is not None:
            if isinstance(shared, nn.Parameter):
                holder.register_parameter(name, shared)
            elif isinstance(shared, Tensor):
                holder.register_buffer(name, shared)
            else:
                setattr(holder, name, shared)
        else:
            set_path(teacher, node.target, mine)
    known = {s.student_name for s in sources}
    sources.extend(s for s in train_sources if s.student_name not in known)
    return train_gm


def _shapes(obj):
    if isinstance(obj, Tensor):
        return tuple(obj.shape)
    if isinstance(obj, _Branched):   # compare by the folded kernel a plain layer would hold
        return {"weight": tuple(obj.weight.shape), **({"bias": tuple(obj.bias.shape)} if obj.bias is not None else {})}
    if isinstance(obj, nn.Module):
        return {k: tuple(v.shape) for k, v in obj.state_dict().items()}
    return None


def tie_shared_parameters(model: nn.Module, teacher: nn.Module, sources: list) -> None:
    """One teacher parameter (and one student-map source) per student parameter.

    A parameter held by two modules (tied weights) is widened at each use; when both uses got
    the same channel maps, the second teacher tensor is replaced by the first, so the tie holds
    in the teacher too. Otherwise the first use's map defines the student and the other teacher
    copy trains the teacher only.
    """
    canonical: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        alias[name] = canonical.setdefault(id(p), name)
    by_name = {s.student_name: s for s in sources}
    keep = []
    for src in sources:
        first = alias.get(src.student_name, src.student_name)
        if first == src.student_name or first not in by_name:
            keep.append(src)
            continue
        ref = by_name[first]
        if _same_map(src, ref):
            holder = teacher.get_submodule(src.module) if src.module else teacher
            ref_holder = teacher.get_submodule(ref.module) if ref.module else teacher
            if getattr(holder, src.attr).shape == getattr(ref_holder, ref.attr).shape:
                setattr(holder, src.attr, getattr(ref_holder, ref.attr))
    sources[:] = keep


def _same_map(a, b) -> bool:
    def eq(x, y):
        if x is None or y is None:
            return x is y
        return all(torch.equal(u, v) if isinstance(u, Tensor) else u == v for u, v in zip(x, y))
    return eq(a.out, b.out) and eq(a.inp, b.inp) and a.scale == b.scale
