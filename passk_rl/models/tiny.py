"""Tiny Llama-architecture models and a character-level tokenizer, built locally (no hub access).

Used by the tests (a randomly initialised model) and by the built-in task's base model (which pre-trains one of
these). Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Optional, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# Printable ASCII covers the built-in task, math answers and code; anything else maps to <unk>.
DEFAULT_ALPHABET = "".join(ch for ch in string.printable if ch not in "\x0b\x0c\r")


def build_tokenizer(alphabet: str = DEFAULT_ALPHABET, *, model_max_length: int = 512):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, ids stable for an alphabet.

    BPE with no merges splits text into single characters; ``Fuse`` decoding joins them back unchanged (so
    spaces and newlines round-trip exactly, which the verifiers rely on).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        if ch not in vocab:
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
                      intermediate_size: Optional[int] = None, max_position_embeddings: int = 512,
                      bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0):
    from transformers import LlamaConfig

    # head_dim 64: vLLM's CPU attention kernels support only a fixed set of head sizes (64 is among them).
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def build_random_model(out_dir: str | Path, *, seed: int = 0, alphabet: str = DEFAULT_ALPHABET,
                       hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
                       max_position_embeddings: int = 512, init_std: Optional[float] = None) -> Path:
    """Write a randomly initialised tiny Llama + tokenizer to ``out_dir`` (HF layout, safetensors, fp32).

    ``init_std`` overrides the initializer range; a larger value gives a peakier, less uniform random policy
    (useful when a test needs sampled sequences to differ in log-probability).
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(alphabet, model_max_length=max_position_embeddings)
    cfg = tiny_llama_config(len(tok), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                            max_position_embeddings=max_position_embeddings,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    if init_std is not None:
        cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    (out / "passk_rl_model.json").write_text(json.dumps({"kind": "tiny-random", "seed": seed}))
    return out


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens (the char tokenizer adds none by default; kept explicit)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
