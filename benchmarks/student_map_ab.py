"""Within-process A/B of the issue-9 student-map changes on ResNet-18 32x32 batch 16.

    python benchmarks/student_map_ab.py 2 5          # ratio 2, 5 rounds, session-6 changes
    python benchmarks/student_map_ab.py 2 5 s5       # the session-5 changes instead
    python benchmarks/student_map_ab.py 3 5 s4       # the session-4 changes
    python benchmarks/student_map_ab.py 2 9 s5 fb    # forward+backward cases only (no GPD step)
    python benchmarks/student_map_ab.py 2 7 run      # the student's branches run on small maps

'new' is the code as it is; 'old' switches off, at run time and only around its own cases, one
set of changes (on top of everything else as it is now, so an older set's figures differ from
those measured when it was new):

- ``s6`` (default): the session-6 small-map changes: ``conv_nd`` cutting the taps that read
  only padding before its tiny-map GEMM, the box of a kernel gathered with ``index_select``
  and its gradient written into pooled storage, the student convs of multi-branch layers in
  ``dt.joint`` running box-shaped kernels with cut padding through ``conv_nd`` (also in
  ``dt.student``), and the student map of only the box ('old' puts back the previous
  ``conv_nd``, a sliced box with a padded gradient, the students' own conv forward, and whole
  kernels mapped before slicing; the old ``conv_nd`` is read from the git history at 6f2281c,
  the rest is copied below);
- ``s5``: the session-5 map kernels: the zero rows of a reused gradient buffer only
  checked, not rewritten; the input copies written as r plain copies instead of one broadcast
  copy (a batched GEMM for kernels); the map's student-sized output on pooled storage; the
  live-box student kernel run with cut padding instead of zero-padded to full size; the box
  slice of the branch tensors with one full-size gradient write ('old' puts back the previous
  ``_adjoint_fast``, ``_map_fast``, ``teacher._kernels_at_call`` and plain indexing, copied
  below);
- ``run``: the student conv of a multi-branch layer on a small map running its 1x1->kxk
  branch on the activations (``BranchConvNd.student_plan``) instead of folding it into a
  student-width kernel ('old' makes ``student_plan`` return ``()``: every branch folded);
- ``s4``: the three changes of session 4: the pooled gradient buffers of the student map
  (``_GradPool``: a fresh tensor per step instead), ``scale_rows`` (the plain broadcast
  product) and the live-tap student kernels (``_student_cut`` off).

Both run in one process, 1 thread, interleaved in a shuffled order per round, so a loaded
machine shifts both alike; ratios are per round, median [min, max]. Writes
benchmarks/results/student_map_ab_r<ratio>_<changes>.json.
"""
from __future__ import annotations

import contextlib, json, os, random, statistics, sys, time
import math
import torch, torchvision, torch.nn.functional as F
from torch import Tensor
import gpd_fx
from gpd_fx.losses import GPDLossConfig, gpd_loss
from gpd_fx.passes import branches as B, student_map as SM

torch.set_num_threads(1)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
ratio = int(sys.argv[1])
which = sys.argv[3] if len(sys.argv) > 3 else "s6"
only_fb = "fb" in sys.argv[4:]   # only the forward+backward cases (no GPD step)
_take, _scale = SM._GradPool.take_reused, B.scale_rows
_adjoint, _mapfast = SM._adjoint_fast, SM._map_fast


def _map_fast_s4(t, src, pool=None):
    """``student_map._map_fast`` before session 5 (fresh output)."""
    _, in_r = SM._stride_of(src)
    t = SM._select_out(t, src)
    if src.inp is not None:
        dim, _, width = src.inp
        v = t.unflatten(dim, (width, in_r))
        t = v.select(dim + 1, 0)
        if in_r > 1:
            t = t + v.select(dim + 1, 1)
            for j in range(2, in_r):
                t.add_(v.select(dim + 1, j))
    t = t.contiguous()
    return t * src.scale if src.scale != 1.0 else t


def _adjoint_fast_s4(gs, src, shape, pool=None):
    """``student_map._adjoint_fast`` before session 5 (zero fill always, one broadcast copy)."""
    out_r, in_r = SM._stride_of(src)
    if src.scale != 1.0:
        gs = gs * src.scale
    g = (pool or SM._grad_pool(src)).take(shape, gs.dtype, gs.device)
    target = g
    if src.out is not None:
        dim, first = src.out
        if out_r == 0:
            g.narrow(dim, 1, g.shape[dim] - 1).zero_()
            target = g.narrow(dim, 0, 1)
        elif out_r > 1:
            v = g.unflatten(dim, (first.numel(), out_r))
            v.narrow(dim + 1, 1, out_r - 1).zero_()
            target = v.select(dim + 1, 0)
    if src.inp is not None:
        dim, _, width = src.inp
        target.unflatten(dim, (width, in_r)).copy_(gs.unsqueeze(dim + 1))
    else:
        target.copy_(gs)
    return g


@contextlib.contextmanager
def _kernels_at_call_s4(lazy):
    """``teacher._kernels_at_call`` before session 5: the live-box kernel zero-padded back to
    the full kernel size (the conv keeps its padding)."""
    handles = []

    def install(src, layer, conv):
        original = conv._parameters["weight"]

        def pre(module, args):
            cut = layer.student_cut(args[0] if args else None)
            module._parameters["weight"] = layer.mapped_weight(src, None if cut is None else cut[0])

        def post(module, args, out):
            module._parameters["weight"] = original

        handles.append(conv.register_forward_pre_hook(pre))
        handles.append(conv.register_forward_hook(post, always_call=True))
        return conv, original

    restore = [install(*item) for item in lazy]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for conv, original in restore:
            conv._parameters["weight"] = original


class _BoxSlice_s4:
    """Before session 5: plain indexing (one ``SliceBackward`` per sliced dim)."""
    apply = staticmethod(lambda w, box, pool=None: w[box])


# ----------------------------------------------------------------------- session 6 ('s6')
# Before session 6: conv_nd ran the im2col GEMM of a tiny map over the whole kernel (dead taps
# included), a box of a kernel was a strided slice with a padded gradient, the student convs
# of multi-branch layers in dt.joint got a full-size kernel (zero outside the live box) and ran
# in oneDNN, and the student map mapped whole kernels before slicing the box.

def _from_revision(rev: str, name: str, path: str = "passes/branches.py"):
    """The top-level function ``name`` of ``path`` as it was at git revision ``rev``, defined in
    the namespace of today's module (so it calls today's helpers). Needs the repository's history
    (a clone, not an installed package)."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "-C", repo, "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
    start = src.index(f"\ndef {name}(") + 1
    stop = min(i for i in (src.find("\ndef ", start), src.find("\nclass ", start), src.find("\n# ---", start)) if i > 0)
    ns = dict(B.__dict__)
    exec(compile(src[start:stop], f"{rev}:{path}", "exec"), ns)
    return ns[name]


# conv_nd before session 6 (6f2281c): the tiny-map GEMM over the whole kernel, dead taps included
_conv_nd_6f2281c = _from_revision("6f2281c", "conv_nd")


def _conv_nd_s5(*args, pool=None, **kwargs):
    return _conv_nd_6f2281c(*args, **kwargs)


class _BoxSlice_s5:
    """Before session 6: a strided slice made contiguous; the gradient a fresh constant pad."""

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w, box):
            ctx.shape, ctx.box = w.shape, box
            return w[box].contiguous()

        @staticmethod
        def backward(ctx, g):
            pads = []
            for d in reversed(range(len(ctx.shape))):
                start, stop, _ = (ctx.box[d] if d < len(ctx.box) else slice(None)).indices(ctx.shape[d])
                pads += [start, ctx.shape[d] - stop]
            return F.pad(g, pads), None

    apply = staticmethod(lambda w, box, pool=None: _BoxSlice_s5._Fn.apply(w, box))


@contextlib.contextmanager
def _student_convs_s5(calls):
    """Before session 6: the student convs keep their own forward (oneDNN); only the run-branch
    terms are added."""
    saved = []
    try:
        for conv, term, _padding in calls:
            if term is None:
                continue
            call = type(conv).forward.__get__(conv)

            def forward(*args, _call=call, _term=term, **kwargs):
                return _term(_call(*args, **kwargs), args[0])

            saved.append(conv)
            conv.__dict__["forward"] = forward
        yield
    finally:
        for conv in saved:
            del conv.__dict__["forward"]


_box_slice = B._BoxSlice
TEACHER = sys.modules["gpd_fx.teacher"]
_kernels_at_call = TEACHER._kernels_at_call


_student_plan = B.BranchConvNd.student_plan


_conv_nd, _student_convs, _share_map = B.conv_nd, TEACHER._student_convs, B.share_map
_lazy_now = TEACHER.DynamicTeacher._lazy_now


def _lazy_now_s5(self):
    """Before session 6 the joint student kernel was never box-shaped (dt.student's was)."""
    items = _lazy_now(self)
    for _, layer, _ in items:
        layer.__dict__["_student_lazy"] = False
    return items


@contextlib.contextmanager
def old(dts):
    if which == "s6":
        B.conv_nd, B._BoxSlice, TEACHER._student_convs = _conv_nd_s5, _BoxSlice_s5, _student_convs_s5
        B.share_map = lambda tensors, sources, boxes=None: _share_map(tensors, sources)   # whole kernels
        TEACHER.DynamicTeacher._lazy_now = _lazy_now_s5
        try:
            yield
        finally:
            B.conv_nd, B._BoxSlice, TEACHER._student_convs = _conv_nd, _box_slice, _student_convs
            B.share_map, TEACHER.DynamicTeacher._lazy_now = _share_map, _lazy_now
        return
    if which == "run":
        B.BranchConvNd.student_plan = lambda self, x: ()
        try:
            yield
        finally:
            B.BranchConvNd.student_plan = _student_plan
        return
    if which == "s5":
        SM._adjoint_fast, SM._map_fast = _adjoint_fast_s4, _map_fast_s4
        TEACHER._kernels_at_call = _kernels_at_call_s4
        B._BoxSlice = _BoxSlice_s4
        try:
            yield
        finally:
            SM._adjoint_fast, SM._map_fast = _adjoint, _mapfast
            TEACHER._kernels_at_call = _kernels_at_call
            B._BoxSlice = _box_slice
        return
    def fresh(self, shape, dtype, device, tag="grad"):
        return torch.empty(tuple(shape), dtype=dtype, device=device), False
    SM._GradPool.take_reused = fresh
    B.scale_rows = lambda w, v: w * v.reshape((-1,) + (1,) * (w.dim() - 1))
    saved = [(m, m.__dict__.get("_student_cut")) for dt in dts for m in dt.teacher.modules() if isinstance(m, B._Branched)]
    for m, _ in saved:
        m.__dict__["_student_cut"] = False
    try:
        yield
    finally:
        SM._GradPool.take_reused, B.scale_rows = _take, _scale
        for m, c in saved:
            m.__dict__["_student_cut"] = c

torch.manual_seed(0)
s = torchvision.models.resnet18(num_classes=100).train()
ex = (torch.randn(2, 3, 32, 32),)
ir = gpd_fx.expand(s, ratio=ratio, example_inputs=ex, branches=()).train()
mb = gpd_fx.expand(s, ratio=ratio, example_inputs=ex, branches=None).train()
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 100, (16,))
cfg = GPDLossConfig()
opt = {id(m): torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4) for m in (s, ir, mb)}

def step(m, loss_fn, use_opt):
    def run():
        o = opt[id(m)]
        o.zero_grad(set_to_none=True)
        loss_fn().backward()
        if use_opt:
            o.step()
    return run

cases = {
    "student": (step(s, lambda: F.cross_entropy(s(x), y), True), False),
    "teacher": (step(ir, lambda: F.cross_entropy(ir.teacher(x), y), True), False),
    "gpd_mb new": (step(mb, lambda: gpd_loss(*mb.joint(x), y, cfg)[0], True), False),
    "gpd_mb old": (step(mb, lambda: gpd_loss(*mb.joint(x), y, cfg)[0], True), True),
    "student_fb": (step(s, lambda: F.cross_entropy(s(x), y), False), False),
    "dt_student_fb new": (step(ir, lambda: F.cross_entropy(ir.student(x), y), False), False),
    "dt_student_fb old": (step(ir, lambda: F.cross_entropy(ir.student(x), y), False), True),
    "dt_student_mb_fb new": (step(mb, lambda: F.cross_entropy(mb.student(x), y), False), False),
    "dt_student_mb_fb old": (step(mb, lambda: F.cross_entropy(mb.student(x), y), False), True),
}
def timed(name):
    """(wall seconds, this thread's CPU seconds) of one step. On a machine shared with other
    jobs the CPU time leaves out the time spent waiting for a core (memory-bandwidth contention
    still shows in both)."""
    fn, is_old = cases[name]
    with (old([ir, mb]) if is_old else contextlib.nullcontext()):
        t0, c0 = time.perf_counter(), time.thread_time(); fn()
        return time.perf_counter() - t0, time.thread_time() - c0
if only_fb:
    cases = {n: c for n, c in cases.items() if "_fb" in n}
for name in cases:   # warm-up, twice each
    timed(name); timed(name)
times = {n: [] for n in cases}
cpu = {n: [] for n in cases}
load0 = os.getloadavg()
rng = random.Random(0)
for _ in range(rounds):
    order = list(cases); rng.shuffle(order)
    for n in order:
        w, c = timed(n)
        times[n].append(w); cpu[n].append(c)
load1 = os.getloadavg()
def stat(v):
    return f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]"
def ratios_of(t):
    r = {}
    for tag in ("new", "old"):
        if f"gpd_mb {tag}" in t:
            r[f"gpd_mb {tag} / (teacher + student)"] = [g / (a + b) for g, a, b in zip(t[f"gpd_mb {tag}"], t["teacher"], t["student"])]
        r[f"dt_student_fb {tag} / student_fb"] = [a / b for a, b in zip(t[f"dt_student_fb {tag}"], t["student_fb"])]
        r[f"dt_student_mb_fb {tag} / student_fb"] = [a / b for a, b in zip(t[f"dt_student_mb_fb {tag}"], t["student_fb"])]
    for case in ("dt_student_fb", "dt_student_mb_fb", "gpd_mb"):
        if f"{case} new" in t:
            r[f"{case} new / old"] = [a / b for a, b in zip(t[f"{case} new"], t[f"{case} old"])]
    return r
ratios, cpu_ratios = ratios_of(times), ratios_of(cpu)
print(f"A/B {which}: resnet18 32x32 b16 r{ratio}, {rounds} rounds, load {load0[0]:.1f} -> {load1[0]:.1f}")
print(f"  {'case':24s} {'wall ms':>8s}  [min, max]      {'CPU ms':>8s}  [min, max]")
for n in times:
    w, c = times[n], cpu[n]
    print(f"  {n:24s} {statistics.median(w)*1e3:8.1f}  [{min(w)*1e3:.0f}, {max(w)*1e3:.0f}]"
          f"   {statistics.median(c)*1e3:8.1f}  [{min(c)*1e3:.0f}, {max(c)*1e3:.0f}]")
print(f"  {'per-round ratio':40s} {'wall':22s} CPU")
for n in ratios:
    print(f"  {n:40s} {stat(ratios[n]):22s} {stat(cpu_ratios[n])}")
os.makedirs('benchmarks/results', exist_ok=True)
json.dump({"ratio": ratio, "rounds": rounds, "changes": which, "load": [load0, load1], "times_s": times,
           "cpu_s": cpu, "ratios": ratios, "cpu_ratios": cpu_ratios},
          open(f"benchmarks/results/student_map_ab_r{ratio}_{which}.json", "w"), indent=1)
