"""Within-process A/B of the issue-9 student-map changes on ResNet-18 32x32 batch 16.

    python benchmarks/student_map_ab.py 2 5     # ratio 2, 5 rounds
    python benchmarks/student_map_ab.py 3 5

'new' is the code as it is; 'old' switches off, at run time and only around its own cases, the
three changes of issue 9 session 4: the pooled gradient buffers of the student map
(``_GradPool``: a fresh tensor per step instead), ``scale_rows`` (the plain broadcast product)
and the live-tap student kernel of ``dt.joint`` (``_student_cut`` off). Both run in one process,
1 thread, interleaved in a shuffled order per round, so a loaded machine shifts both alike;
ratios are per round, median [min, max]. Writes benchmarks/results/student_map_ab_r<ratio>.json.
"""
import contextlib, json, os, random, statistics, sys, time
import torch, torchvision, torch.nn.functional as F
import gpd_fx
from gpd_fx.losses import GPDLossConfig, gpd_loss
from gpd_fx.passes import branches as B, student_map as SM

torch.set_num_threads(1)
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
ratio = int(sys.argv[1])
_take, _scale = SM._GradPool.take, B.scale_rows

@contextlib.contextmanager
def old(dts):
    SM._GradPool.take = lambda self, shape, dtype, device: torch.empty(tuple(shape), dtype=dtype, device=device)
    B.scale_rows = lambda w, v: w * v.reshape((-1,) + (1,) * (w.dim() - 1))
    saved = [(m, m.__dict__.get("_student_cut")) for dt in dts for m in dt.teacher.modules() if isinstance(m, B._Branched)]
    for m, _ in saved:
        m.__dict__["_student_cut"] = False
    try:
        yield
    finally:
        SM._GradPool.take, B.scale_rows = _take, _scale
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
    fn, is_old = cases[name]
    with (old([ir, mb]) if is_old else contextlib.nullcontext()):
        t0 = time.perf_counter(); fn(); return time.perf_counter() - t0
for name in cases:   # warm-up, twice each
    timed(name); timed(name)
times = {n: [] for n in cases}
load0 = os.getloadavg()
rng = random.Random(0)
for _ in range(rounds):
    order = list(cases); rng.shuffle(order)
    for n in order:
        times[n].append(timed(n))
load1 = os.getloadavg()
def stat(v):
    return f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]"
ratios = {}
for tag in ("new", "old"):
    ratios[f"gpd_mb {tag} / (teacher + student)"] = [g / (t + st) for g, t, st in zip(times[f"gpd_mb {tag}"], times["teacher"], times["student"])]
    ratios[f"dt_student_fb {tag} / student_fb"] = [a / b for a, b in zip(times[f"dt_student_fb {tag}"], times["student_fb"])]
    ratios[f"dt_student_mb_fb {tag} / student_fb"] = [a / b for a, b in zip(times[f"dt_student_mb_fb {tag}"], times["student_fb"])]
print(f"resnet18 32x32 b16 r{ratio}, {rounds} rounds, load {load0[0]:.1f} -> {load1[0]:.1f}")
for n, v in times.items():
    print(f"  {n:24s} {statistics.median(v)*1e3:8.1f} ms  [{min(v)*1e3:.0f}, {max(v)*1e3:.0f}]")
for n, v in ratios.items():
    print(f"  {n:40s} {stat(v)}")
os.makedirs('benchmarks/results', exist_ok=True)
json.dump({"ratio": ratio, "rounds": rounds, "load": [load0, load1], "times_s": times, "ratios": ratios},
          open(f"benchmarks/results/student_map_ab_r{ratio}.json", "w"), indent=1)
