"""Hugging Face transformers models for the zoo, built from small configs (no weights, no download).

Each entry builds one architecture at a size that expands in seconds: 2 layers, hidden 32,
4 attention heads (2 key/value heads where the architecture has grouped-query attention),
vocabulary 100. Text models take token ids ``(batch, 16)``; ViT takes 32x32 images. They are
captured by the ``torch.export`` front end (``DESIGN.md §6``).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["HF_MODELS", "SEQ_LEN", "VOCAB", "build_hf"]

VOCAB = 100
SEQ_LEN = 16
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _bert(T):
    return T.BertModel(T.BertConfig(**_SMALL))


def _roberta(T):
    return T.RobertaModel(T.RobertaConfig(**_SMALL, pad_token_id=1))


def _distilbert(T):
    return T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64))


def _gpt2(T):
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, use_cache=False,
                                          bos_token_id=0, eos_token_id=0))


def _llama(T):
    return T.LlamaForCausalLM(T.LlamaConfig(**_SMALL, num_key_value_heads=2, use_cache=False))


def _mistral(T):
    return T.MistralForCausalLM(T.MistralConfig(**_SMALL, num_key_value_heads=2, use_cache=False))


def _qwen2(T):
    return T.Qwen2ForCausalLM(T.Qwen2Config(**_SMALL, num_key_value_heads=2, use_cache=False))


def _t5_encoder(T):
    return T.T5EncoderModel(T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))


def _vit(T):
    return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, num_labels=10))


# name -> (builder, input kind: "tokens" or "image")
HF_MODELS: dict[str, tuple[Callable, str]] = {
    "bert": (_bert, "tokens"), "roberta": (_roberta, "tokens"), "distilbert": (_distilbert, "tokens"),
    "gpt2": (_gpt2, "tokens"), "llama": (_llama, "tokens"), "mistral": (_mistral, "tokens"),
    "qwen2": (_qwen2, "tokens"), "t5_encoder": (_t5_encoder, "tokens"), "vit": (_vit, "image"),
}


def build_hf(name: str) -> nn.Module:
    """The model ``name`` of :data:`HF_MODELS` (needs ``pip install -e ".[hf]"``)."""
    import transformers

    transformers.logging.set_verbosity_error()
    return HF_MODELS[name][0](transformers)
