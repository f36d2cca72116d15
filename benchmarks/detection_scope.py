"""Every torchvision detection model through ``gpd_fx.expand(..., scope=["backbone"])`` (issue 14).

    python benchmarks/detection_scope.py [--dtype float32|float64] [--size 128] [--only NAME ...]
        [--scope backbone head] [--thresh0] [--randomize] [--out FILE.jsonl]

Detectors select boxes in Python over image lists, so neither front end captures them whole;
``scope=`` expands the named submodules in place and verifies the whole model's outputs. Per
model (one subprocess each, for memory and timeouts) one JSON line is appended to ``--out``:
whole-model relative error (expand's own verification), FLOP share of the whole model and of the
scopes, boundaries, whether ``fold`` gives the same class and keys and the same detections, and
the seconds taken. ``--thresh0`` sets the score thresholds to 0 (random-init heads score below
the defaults, leaving nothing to compare); ``--randomize`` randomises BatchNorm statistics
(fresh BN shrinks MobileNet features to ~1e-8). Results of the 2026-12-03 runs are in
``benchmarks/measured/detection_scope/``; the table is in ``benchmarks/README.md``.
"""
import argparse, json, subprocess, sys, time, traceback

MODELS = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
          "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
          "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
          "fcos_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large"]


def compare(got, ref):
    """max |box diff| / max |box|, and whether labels and structure match exactly."""
    import torch
    if len(got) != len(ref):
        return float("inf"), False
    err, same = 0.0, True
    for g, r in zip(got, ref):
        same &= g.keys() == r.keys() and torch.equal(g["labels"], r["labels"])
        for k in r:
            if r[k].is_floating_point() and r[k].numel():
                if g[k].shape != r[k].shape:
                    return float("inf"), False
                err = max(err, float((g[k] - r[k]).abs().max() / r[k].abs().max().clamp_min(1e-30)))
    return err, bool(same)


THRESH0 = {"fasterrcnn": dict(box_score_thresh=0.0, rpn_score_thresh=0.0), "maskrcnn": dict(box_score_thresh=0.0),
           "keypointrcnn": dict(box_score_thresh=0.0), "retinanet": dict(score_thresh=0.0),
           "fcos": dict(score_thresh=0.0), "ssd": dict(score_thresh=0.0)}


def one(name, dtype, size, scope=("backbone",), thresh0=False, randomize=False):
    import torch, torchvision, gpd_fx
    torch.manual_seed(0)
    kw = dict(weights=None, weights_backbone=None, num_classes=2 if name.startswith("keypoint") else 3)
    if not name.startswith("ssd"):
        kw.update(min_size=size, max_size=size)   # SSDs resize to their fixed 300/320
    if thresh0:   # random-init heads score below the default thresholds: no boxes to compare
        kw.update(next(v for k, v in THRESH0.items() if name.startswith(k)))
    model = getattr(torchvision.models.detection, name)(**kw).eval()
    if randomize:   # random-init BN (running var 1) shrinks mobilenet features to ~1e-8: shake them
        from gpd_fx.testing.checks import randomize_constants
        with torch.no_grad():
            randomize_constants(model)
    images = [torch.rand(3, size, size) for _ in range(2)]
    row = dict(randomize=randomize, model=name, dtype=dtype, size=size, scope="+".join(scope), thresh0=thresh0)
    t = time.perf_counter()
    dt = gpd_fx.expand(model, 2, (images,), scope=list(scope),
                       verify_dtype=torch.float64 if dtype == "float64" else None)
    row["expand_s"] = round(time.perf_counter() - t, 1)
    rep, sub = dt.report, dt.reports["backbone"]
    row.update(max_rel_error=rep.max_rel_error, whole_flop_share=round(rep.expanded_flop_fraction, 3),
               scope_flop_share=round(sub.expanded_flop_fraction, 3), boundaries=len(rep.boundaries),
               fallbacks=len(rep.fallbacks), frontend=rep.frontend,
               boundary_reasons=dict(list(rep.boundary_reasons.items())[:5]))
    dt.eval()
    with torch.no_grad():
        ref = model(images)
        row["n_boxes"] = [len(r["boxes"]) for r in ref]
        feats = model.backbone(model.transform(images)[0].tensors)
        row["max_feature"] = max(float(v.abs().max()) for v in feats.values())
        row["teacher_vs_model_float32"], row["teacher_labels_equal"] = compare(dt(images), ref)
        row["student_vs_model"], row["student_labels_equal"] = compare(dt.student(images), ref)
    t = time.perf_counter()
    plain = gpd_fx.fold(dt)
    row["fold_s"] = round(time.perf_counter() - t, 1)
    with torch.no_grad():
        err, same = compare(plain(images), ref)
    row["fold_ok"] = (type(plain) is type(model) and plain.state_dict().keys() == model.state_dict().keys()
                      and same and err < 1e-4)
    row["fold_err"] = err
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out", default="benchmarks/measured/detection_scope/rows.jsonl")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--worker")
    ap.add_argument("--scope", nargs="+", default=["backbone"])
    ap.add_argument("--thresh0", action="store_true", help="score thresholds 0, so that boxes are compared")
    ap.add_argument("--randomize", action="store_true", help="gpd_fx.testing.checks.randomize_constants first")
    a = ap.parse_args()
    if a.worker:
        try:
            row = one(a.worker, a.dtype, a.size, a.scope, a.thresh0, a.randomize)
        except Exception as e:
            row = dict(model=a.worker, dtype=a.dtype, size=a.size, error=f"{type(e).__name__}: {str(e)[:400]}",
                       tb=traceback.format_exc()[-1500:])
        print("ROW " + json.dumps(row))
        return
    for name in a.only or MODELS:
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--worker", name, "--dtype", a.dtype, "--size", str(a.size), "--scope", *a.scope] + (["--thresh0"] if a.thresh0 else []) + (["--randomize"] if a.randomize else []),
                               capture_output=True, text=True, timeout=a.timeout)
            rows = [l[4:] for l in p.stdout.splitlines() if l.startswith("ROW ")]
            row = json.loads(rows[-1]) if rows else dict(model=name, error="no row: " + p.stderr[-600:])
        except subprocess.TimeoutExpired:
            row = dict(model=name, dtype=a.dtype, size=a.size, error=f"timeout {a.timeout}s")
        row["wall_s"] = round(time.perf_counter() - t, 1)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("tb", "boundary_reasons")}), flush=True)


if __name__ == "__main__":
    main()
