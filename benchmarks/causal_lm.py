"""GPD for a causal language model through the Python API: a character-level Llama on local text.

The student is a small ``transformers.LlamaForCausalLM`` (grouped-query attention) built from a
config, no weights downloaded. ``gpd_fx.expand`` captures it with the ``torch.export`` front end
(FX cannot trace it) and builds an exact teacher r times wider; teacher and student train
together with the GPD objective (``gpd_fx.losses.gpd_loss`` over every next-character
prediction). The plain student trains alone with the same optimiser, steps and batches in the
same run, so the student's perplexity has a baseline; a second plain student trains
``--long`` times as many steps, about the compute of a GPD step at ratio 2 (wall times are
printed: compare them). Prints validation perplexity (exp of the mean next-character
cross-entropy) of the plain students, the GPD student and the teacher, per seed and as
mean +- std, and writes JSON.

The text is local: the docstrings of a fixed list of Python standard-library modules (English
prose, ~100k characters, no download; its exact size depends on the Python version and is
printed). Needs ``pip install -e ".[hf]"``.

    python benchmarks/causal_lm.py                  # 5 seeds x 1000 steps, ratio 2 (~15 min on 2 cores)
    python benchmarks/causal_lm.py --steps 20 --seeds 0   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gpd_fx
from gpd_fx.checkpoint import atomic_write
from gpd_fx.losses import GPDLossConfig, gpd_loss

MODULES = ("argparse", "collections", "json", "textwrap", "typing", "pathlib", "functools", "itertools",
           "logging", "unittest", "dataclasses", "inspect", "subprocess", "threading", "random", "statistics")


def corpus() -> str:
    """Docstrings of :data:`MODULES` and of their public classes and functions, in a fixed order."""
    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, attr, None)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) \
                    and getattr(obj, "__module__", None) == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)


def encode(text: str) -> tuple[torch.Tensor, list[str]]:
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def student(vocab: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=args.width, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * args.width, max_position_embeddings=args.context,
        use_cache=False, tie_word_embeddings=False))


def batches(data: torch.Tensor, context: int, batch: int, steps: int, seed: int):
    """``steps`` batches of ``batch`` random windows (inputs, next-character targets)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
        win = torch.stack([data[s:s + context + 1] for s in start.tolist()])
        yield win[:, :-1], win[:, 1:]


@torch.no_grad()
def perplexity(forward, data: torch.Tensor, context: int) -> float:
    """exp(mean cross-entropy) over non-overlapping windows of ``data``."""
    n = (len(data) - 1) // context
    x = data[:n * context].view(n, context)
    y = data[1:n * context + 1].view(n, context)
    total = 0.0
    for i in range(0, n, 64):
        logits = forward(x[i:i + 64]).logits
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + 64].flatten(), reduction="sum"))
    return math.exp(total / (n * context))


def train_plain(model, train: torch.Tensor, args, steps: int, seed: int) -> float:
    """Train ``model`` alone with AdamW; returns the wall time."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for x, y in batches(train, args.context, args.batch, steps, seed):
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t0


def run_seed(seed: int, train: torch.Tensor, val: torch.Tensor, vocab: int, args) -> dict:
    torch.manual_seed(seed)
    plain = student(vocab, args)
    long = copy.deepcopy(plain)
    probe = train[:2 * args.context].view(2, args.context)
    dt = gpd_fx.expand(plain, args.ratio, (probe,), seed=seed)
    plain_seconds = train_plain(plain, train, args, args.steps, seed)
    long_seconds = train_plain(long, train, args, args.long * args.steps, seed)
    groups = gpd_fx.param_groups(dt, lr=args.lr, update="adam") if args.param_groups == "gpd" else dt.parameters()
    opt_gpd = torch.optim.AdamW(groups, lr=args.lr)
    cfg = GPDLossConfig()
    dt.train()
    t0 = time.perf_counter()
    for x, y in batches(train, args.context, args.batch, args.steps, seed):
        t_out, s_out = dt.joint(x)
        loss, _ = gpd_loss(t_out.logits.flatten(0, 1), s_out.logits.flatten(0, 1), y.flatten(), cfg)
        opt_gpd.zero_grad()
        loss.backward()
        opt_gpd.step()
    seconds = time.perf_counter() - t0
    dt.eval()
    folded = gpd_fx.fold(dt)
    return {"seed": seed, "plain": perplexity(plain, val, args.context),
            "plain_long": perplexity(long, val, args.context),
            "gpd_student": perplexity(folded, val, args.context),
            "gpd_teacher": perplexity(dt, val, args.context),
            "frontend": dt.report.frontend, "teacher_params": dt.report.teacher_params,
            "student_params": dt.report.student_params, "gpd_seconds": seconds,
            "plain_seconds": plain_seconds, "plain_long_seconds": long_seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps per run (default 1000)")
    p.add_argument("--long", type=int, default=3,
                   help="the second plain student trains this many times --steps (default 3)")
    p.add_argument("--batch", type=int, default=16, help="windows per batch (default 16)")
    p.add_argument("--context", type=int, default=64, help="characters per window (default 64)")
    p.add_argument("--width", type=int, default=64, help="student hidden size (default 64)")
    p.add_argument("--layers", type=int, default=2, help="student layers (default 2)")
    p.add_argument("--ratio", type=int, default=2, help="expansion ratio (default 2)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--param-groups", choices=["gpd", "plain"], default="gpd",
                   help="GPD optimiser groups: width-aware (gpd_fx.param_groups) or one lr for every "
                        "teacher tensor (default: gpd)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/measured/causal_lm.json"),
                   help="where to write the results (default benchmarks/measured/causal_lm.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = corpus()
    data, chars = encode(text)
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    print(f"corpus: {len(text):,} characters of standard-library docstrings, {len(chars)} distinct; "
          f"train {len(train):,} / validation {len(val):,}")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        row = run_seed(seed, train, val, len(chars), args)
        rows.append(row)
        print(f"seed {seed}: perplexity plain {row['plain']:.3f} ({row['plain_seconds']:.0f} s) | plain x{args.long} "
              f"{row['plain_long']:.3f} ({row['plain_long_seconds']:.0f} s) | GPD student {row['gpd_student']:.3f} | "
              f"GPD teacher {row['gpd_teacher']:.3f} ({row['gpd_seconds']:.0f} s; {row['frontend']} front end, teacher "
              f"{row['teacher_params']:,} vs student {row['student_params']:,} params)")
    summary = {}
    for key in ("plain", "plain_long", "gpd_student", "gpd_teacher"):
        vals = [r[key] for r in rows]
        summary[key] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    wins = sum(r["gpd_student"] < r["plain"] for r in rows)
    labels = (("plain", "plain student", "plain_seconds"), ("plain_long", f"plain student, {args.long}x steps",
                                                                 "plain_long_seconds"),
              ("gpd_student", "GPD student (folded)", "gpd_seconds"), ("gpd_teacher", "GPD teacher", "gpd_seconds"))
    print("\n| model | val perplexity (mean ± std) | train s (median) |\n|---|---|---|")
    for key, label, secs in labels:
        print(f"| {label} | {summary[key]['mean']:.3f} ± {summary[key]['std']:.3f} | "
              f"{statistics.median(r[secs] for r in rows):.0f} |")
    wins_long = sum(r["gpd_student"] < r["plain_long"] for r in rows)
    print(f"\nGPD student below plain on {wins}/{len(rows)} seeds, below plain x{args.long} on {wins_long}/{len(rows)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "corpus_chars": len(text), "vocab": len(chars), "rows": rows, "summary": summary,
               "gpd_student_wins": wins, "torch": torch.__version__}
    atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
