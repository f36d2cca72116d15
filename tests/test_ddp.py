"""DDP: two CPU processes under torchrun (gloo) train a few GPD steps and end with identical weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

WORKER = textwrap.dedent("""
    import os, sys, torch
    from gpd_fx.trainer import TrainConfig, run

    out = sys.argv[1]
    cfg = TrainConfig(epochs=2, batch_size=16, image_size=8, max_steps_per_epoch=3, out_dir=out, progress=False,
                      export_onnx=False, device="cpu")
    res = run(cfg)
    rank = int(os.environ["RANK"])
    torch.save({k: v.detach().clone() for k, v in res.dt.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    torch.save({k: v.detach().clone() for k, v in res.student.state_dict().items()},
               os.path.join(out, f"student_rank{rank}.pt"))
    print(f"rank {rank} wrote {sorted(res.paths)}", flush=True)
""")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_cpu_processes_stay_in_sync(tmp_path):
    """torchrun --nproc_per_node=2: same teacher and student on both ranks; only rank 0 writes and logs."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    # one thread per process: two processes share the (possibly 2-core) machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    a, b = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:  # parameters by DDP's all-reduce; BN statistics by the end-of-epoch broadcast
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(out / "student_rank0.pt", weights_only=True)
    sb = torch.load(out / "student_rank1.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    # rank 0 alone wrote the run's files and printed the per-epoch lines
    assert "rank 0 wrote ['checkpoint'," in proc.stdout and "rank 1 wrote []" in proc.stdout
    assert proc.stdout.count("epoch 2/2:") == 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["global_step"] == 6
    assert torch.equal(ckpt["dt"][next(iter(a))], a[next(iter(a))])
