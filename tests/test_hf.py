"""Hugging Face transformers through the ``torch.export`` front end (``DESIGN.md §6``).

Models are built from small configs (no weights, no downloads). ``torch.fx`` cannot trace them
(transformers v5 dropped its FX tracer), so ``frontend="auto"`` falls back to ``torch.export``;
the report says so. Each must expand exactly in float64 with no fallback and nearly all FLOPs
widened, train through ``dt.joint``, and fold back to the same class with the same state-dict
keys. Skipped without the ``hf`` extra (``pip install -e ".[hf]"``).
"""

from __future__ import annotations

import pytest
import torch

import gpd_fx
from gpd_fx.passes.widen_verify import TOL
from gpd_fx.testing.hf import SEQ_LEN, VOCAB, build_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

F64 = torch.float64


def _ids(batch=2):
    return torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(batch))


def _image(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch), dtype=F64)


# the zoo's own small configs (gpd_fx.testing.hf): BERT, GPT-2, Llama with grouped-query
# attention (4 heads share 2 key/value heads), ViT; name -> example-input maker
CASES = {"bert": _ids, "gpt2": _ids, "llama": _ids, "vit": _image}


def _main(out):
    """The tensor a test compares: logits, else the last hidden state."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _tolerance(dt) -> float:
    """float64's, unless the model computes in float32 inside (Llama's RMSNorm and rotary
    embedding cast to float32 by design): then float32 rounding bounds the agreement."""
    computes_f32 = any("computes in float32" in n for n in dt.report.frontend_notes)
    return TOL[torch.float32] if computes_f32 else TOL[F64]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_model_expands_exactly_trains_and_folds(name):
    make_input = CASES[name]
    torch.manual_seed(0)
    model = build_hf(name).to(F64).eval()
    x = make_input()
    dt = gpd_fx.expand(model, 2, (x,))
    r = dt.report
    assert r.frontend == "export" and any("torch.export captured" in n for n in r.frontend_notes)
    assert r.fallbacks == {} and r.boundaries == []
    assert r.expanded_flop_fraction >= 0.9
    assert r.teacher_params > 2 * r.student_params
    tol = _tolerance(dt)
    if name != "llama":
        assert tol == TOL[F64]
    x3 = make_input(3)   # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        ref = _main(model(x3))
        assert type(dt(x3)) is type(model(x3))          # the ModelOutput class survives
        err = float((_main(dt(x3)) - ref).abs().max() / ref.abs().max())
    assert err <= tol, f"{name}: teacher vs student {err:.3g} > {tol:g}"

    opt = torch.optim.SGD(gpd_fx.param_groups(dt, lr=0.05), lr=0.05)
    dt.train()
    for _ in range(3):
        t, s = dt.joint(x)
        loss = _main(t).pow(2).mean() + _main(s).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt.eval()
    folded = gpd_fx.fold(dt)
    assert type(folded) is type(model)
    assert set(folded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        a, b = _main(folded(x)), _main(dt.student(x))
        assert not torch.equal(b, _main(model(x)))     # the steps changed the student
    assert float((a - b).abs().max() / b.abs().max()) <= TOL[F64]


def test_tied_embeddings_stay_tied_through_fold():
    make_input = CASES["gpt2"]
    model = build_hf("gpt2").to(F64).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    dt = gpd_fx.expand(model, 2, (make_input(),))
    folded = gpd_fx.fold(dt)
    assert folded.lm_head.weight is folded.transformer.wte.weight


def test_forcing_fx_on_a_hf_model_says_why():
    make_input = CASES["bert"]
    with pytest.raises(gpd_fx.errors.TraceError, match="torch.fx could not trace BertModel"):
        gpd_fx.expand(build_hf("bert").eval(), 2, (make_input(),), frontend="fx")


@pytest.mark.parametrize("name", ["bert_mask", "t5_encoder"])
def test_attention_masks_and_position_bias_expand_without_boundaries(name):
    """A padding mask (BERT) and T5's relative position bias (an Embedding with one column per
    head, added as a float mask) reach attention; neither may cut it to student width."""
    ids = _ids()
    if name == "bert_mask":
        model = build_hf("bert")
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0
        inputs = (ids, mask)
    else:
        model = build_hf("t5_encoder")
        inputs = (ids,)
    model = model.to(F64).eval()
    dt = gpd_fx.expand(model, 2, inputs)
    assert dt.report.boundaries == [] and dt.report.fallbacks == {}
    with torch.no_grad():
        ref = _main(model(*inputs))
        err = float((_main(dt(*inputs)) - ref).abs().max() / ref.abs().max())
    assert err <= _tolerance(dt)


def test_llama_is_float64_exact_once_its_norm_stays_in_float64(monkeypatch):
    """Llama's own RMSNorm casts to float32, which bounds the float64 check at float32 rounding
    (1.2e-7 measured). With the same maths in the input dtype, the expanded Llama (GQA, RoPE,
    SwiGLU) agrees to float64 rounding: the expansion itself is exact to 1e-9."""
    from transformers.models.llama import modeling_llama

    def rms_norm_in_input_dtype(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    make_input = CASES["llama"]
    torch.manual_seed(0)
    model = build_hf("llama").to(F64).eval()
    dt = gpd_fx.expand(model, 2, (make_input(),))
    x3 = make_input(3)
    with torch.no_grad():
        ref = _main(model(x3))
        err = float((_main(dt(x3)) - ref).abs().max() / ref.abs().max())
    assert err <= TOL[F64], f"{err:.3g}"
