#!/usr/bin/env python3
"""Builds random-weight bf16 models of real shapes with transformers (nothing downloaded),
saved as Hugging Face directories, with the fixture tokenizer files copied in so the
engine loads them like any model. Run on the GPU machine.

usage: make_models.py OUT_DIR NAME [NAME ...]   (names: see SHAPES)"""
import os
import shutil
import sys

import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SHAPES = {
    "qwen3-0.6b": (Qwen3Config, dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                                      rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True), "qwen3-tiny"),
    "qwen3-8b": (Qwen3Config, dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                                    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False), "qwen3-tiny"),
    "llama3-8b": (LlamaConfig, dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False), "llama-tiny"),
    "llama3.2-1b": (LlamaConfig, dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), "llama-tiny"),
}


def write_tokenizer(path, vocab_size, template_from):
    """A word-level tokenizer with one word per id ("t0", "t1", ...), so every id the
    random model samples decodes to text, plus the fixture's chat template."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    config = json.load(open(os.path.join(REPO, "fixtures", "models", template_from, "tokenizer_config.json")))
    config = {"chat_template": config.get("chat_template"), "eos_token": "t1", "tokenizer_class": "PreTrainedTokenizerFast"}
    json.dump(config, open(os.path.join(path, "tokenizer_config.json"), "w"))


def make(out_dir, name):
    cls, kwargs, tokenizer_from = SHAPES[name]
    path = os.path.join(out_dir, name)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    config = cls(**kwargs)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="4GB")
    write_tokenizer(path, kwargs["vocab_size"], tokenizer_from)
    del model
    torch.cuda.empty_cache()
    print(f"made {path}", flush=True)
    return path


if __name__ == "__main__":
    for n in sys.argv[2:]:
        make(sys.argv[1], n)
