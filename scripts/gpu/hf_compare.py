#!/usr/bin/env python3
"""Teacher-forced logits of our engine (the `score` example, CUDA, bf16) against
transformers on the same random-weight model, over 256 positions.

Checks per position: cosine similarity >= 0.999, and the argmax agrees wherever
transformers' top-2 margin exceeds the bf16 noise at that position, measured as the
largest |logit| difference between transformers in bf16 and in float32.

usage: hf_compare.py MODEL_DIR SCORE_BINARY OUT_JSON [--chunk N]"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM

POSITIONS = 256


def hf_logits(path, ids, dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").cuda().eval()
    with torch.no_grad():
        out = model(torch.tensor([ids], device="cuda")).logits[0].float().cpu().numpy()
    del model
    torch.cuda.empty_cache()
    return out


def main():
    path, score_bin, out_json = sys.argv[1], sys.argv[2], sys.argv[3]
    chunk = sys.argv[sys.argv.index("--chunk") + 1] if "--chunk" in sys.argv else str(POSITIONS)
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    rng = np.random.default_rng(1234)
    ids = rng.integers(0, vocab, POSITIONS).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        tok_path, out_path = os.path.join(tmp, "ids.json"), os.path.join(tmp, "ours.f32")
        json.dump(ids, open(tok_path, "w"))
        run = subprocess.run([score_bin, path, tok_path, out_path, "--chunk", chunk], capture_output=True, text=True)
        sys.stderr.write(run.stderr)
        if run.returncode != 0:
            raise SystemExit(f"score failed: {run.returncode}")
        ours = np.fromfile(out_path, dtype=np.float32).reshape(POSITIONS, vocab)
    ref_bf16 = hf_logits(path, ids, torch.bfloat16)
    ref_f32 = hf_logits(path, ids, torch.float32)
    noise = np.abs(ref_bf16 - ref_f32).max(axis=1)
    cos = (ours * ref_bf16).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref_bf16, axis=1))
    top2 = np.sort(ref_bf16, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    checked = margin > noise
    agree = ours.argmax(1) == ref_bf16.argmax(1)
    result = {
        "model": os.path.basename(path.rstrip("/")), "positions": POSITIONS, "chunk": int(chunk),
        "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(ours - ref_bf16).max()), "hf_bf16_vs_f32_max_noise": float(noise.max()),
        "argmax_checked": int(checked.sum()), "argmax_agree_where_checked": int((agree & checked).sum()),
        "argmax_agree_all": int(agree.sum()),
        "pass": bool(cos.min() >= 0.999 and (agree | ~checked).all()),
    }
    print(json.dumps(result))
    json.dump(result, open(out_json, "w"), indent=1)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
