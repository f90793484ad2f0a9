"""Tiny random-initialised models of the architectures the 910B configs name, built from a transformers config
in a second (no hub): Llama, Qwen2 (qkv bias; tied and untied embeddings), Qwen3 (q/k norm). Shared by
tests/test_architectures.py and tests/test_bf16.py.

Shapes: hidden 64, 2 query heads of head_dim 32 sharing 1 key/value head (GQA, as both Qwen models use), 2 layers.
head_dim 32 because vLLM's CPU attention backend supports only some head sizes (``CPUAttentionBackend.
get_supported_head_sizes()`` in vLLM 0.32: 32, 64, 80, ... — 16 is not among them and kills the engine at its first
forward). ``initializer_range`` 0.1 (not the default 0.02): with near-zero weights every layer is close to the
identity and a wrong tensor would move the logprobs too little to tell.
"""

from __future__ import annotations

import json
from pathlib import Path

# name -> (transformers config class, architecture, extra config fields, the tensor a test tampers with)
# The tampered tensor is the one a mapping slip for that architecture would most likely hit: vLLM fuses q/k/v
# into qkv_proj (and their biases), ties lm_head to the embedding, and adds q_norm/k_norm for Qwen3. For Qwen2
# the q bias, not the k bias: a k bias adds the same amount to every score of a query, which softmax cancels, so
# no logprob could ever show it.
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False),
              "model.layers.0.self_attn.v_proj.weight"),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True),
                   "model.embed_tokens.weight"),
    "qwen2_untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False),
                     "model.layers.0.self_attn.q_proj.bias"),
    # tied, as Qwen3-4B (configs/qwen3-4b_910b_x20.yaml) is
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32),
              "model.layers.0.self_attn.q_norm.weight"),
    # untied: the q/k norms through the pipeline without the tied-lm_head problem (test_architectures.py)
    "qwen3_untied": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=32),
                     "model.layers.0.self_attn.q_norm.weight"),
}


def build_arch_model(arch: str, out_dir, *, seed: int = 0, init_std: float = 0.1) -> Path:
    """Write a random-initialised ``arch`` model (fp32 safetensors) with the character tokenizer to ``out_dir``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    from passk_rl.models.tiny import build_tokenizer

    cfg_cls, arch_name, extra, _ = ARCHS[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(model_max_length=512)
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, initializer_range=init_std, rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
    cfg.architectures = [arch_name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if arch.startswith("qwen2"):  # transformers zero-initialises biases: random ones, so a lost bias shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.normal_(0.0, init_std)
    if arch.startswith("qwen3"):  # norm weights start at 1; spread them so a q_norm/k_norm swap would show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.uniform_(0.5, 1.5)
    assert type(model).__name__ == arch_name
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    (out / "passk_rl_model.json").write_text(json.dumps({"kind": "tiny-random", "arch": arch, "seed": seed}))
    return out


def tamper_target(arch: str) -> str:
    return ARCHS[arch][3]
