"""Memory floor of ``dt.student``'s map work (IR or CBR), ResNet-18 100 classes 32x32 batch 16.

    python benchmarks/student_map_floor.py 2 ir      # ratio, ir | cbr
    python benchmarks/student_map_floor.py 3 cbr

What a ``dt.student`` forward+backward must move that a plain student step does not, timed on
this machine with ideal kernels (1 thread, thread CPU time, median of 9). It records every map
call of one dt.student forward+backward (teacher tensor size, output-copy stride, student size),
then times ideal contiguous kernels on buffers of exactly those sizes:
  A: write the copy-0 rows of each teacher gradient (T_p / out_r elements)
  Z: the other rows: read them (the zero check) or write zeros
  F: the map forward: read the copy-0 rows, write the student-sized result
Contiguous buffers of those sizes, touched before timing (no page faults). The floor of the
extra time is A + Z + F; the CBR fold's own arithmetic (compositions, scales) comes on top.
"""
import sys, time, statistics as st, os, torch, torchvision, torch.nn.functional as F_
import gpd_fx
from gpd_fx.passes import student_map as SM
torch.set_num_threads(1)
ratio = int(sys.argv[1]); br = () if sys.argv[2] == "ir" else None
torch.manual_seed(0)
s = torchvision.models.resnet18(num_classes=100).train()
dt = gpd_fx.expand(s, ratio=ratio, example_inputs=(torch.randn(2, 3, 32, 32),), branches=br).train()
x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 100, (16,))
calls = []
orig = SM._adjoint_fast
def rec(gs, src, shape, pool=None):
    out_r = SM._stride_of(src)[0]
    n = 1
    for d in shape: n *= d
    rows = n if src.out is None else n // shape[src.out[0]] if out_r == 0 else n // out_r
    calls.append((n, rows, gs.numel()))
    return orig(gs, src, shape, pool)
SM._adjoint_fast = rec
F_.cross_entropy(dt.student(x), y).backward()
SM._adjoint_fast = orig
bufs = [(torch.ones(rows), torch.ones(n - rows), torch.ones(sm)) for n, rows, sm in calls]
def A():
    for a, z, o in bufs: a.fill_(0.5)
def Zw():
    for a, z, o in bufs: z.zero_()
def Zr():
    for a, z, o in bufs: z.sum()
def Fw():
    for a, z, o in bufs: a.sum(); o.fill_(0.25)
def tm(f, n=9):
    f(); ts = []
    for _ in range(n):
        c0 = time.thread_time(); f(); ts.append(time.thread_time() - c0)
    return st.median(ts) * 1e3
load = os.getloadavg()[0]
a, zw, zr, f = tm(A), tm(Zw), tm(Zr), tm(Fw)
T = sum(n for n, _, _ in calls); R = sum(r for _, r, _ in calls); S = sum(m for _, _, m in calls)
print(f"{sys.argv[2]} r{ratio} (load {load:.1f}, thread CPU ms): {len(calls)} map backward calls, teacher grads {T/1e6:.1f}M floats "
      f"({T*4/1e6:.0f} MB), copy-0 rows {R/1e6:.1f}M, other rows {(T-R)/1e6:.1f}M, student-sized {S/1e6:.1f}M")
print(f"  A rows write {a:.1f} | Z read {zr:.1f} | Z write {zw:.1f} | F map fwd {f:.1f}")
print(f"  floor: zero rows checked {a+zr+f:.1f} ms; zero rows written {a+zw+f:.1f} ms; zero rows trusted (unsafe) {a+f:.1f} ms")
