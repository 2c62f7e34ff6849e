#!/usr/bin/env python3
"""Compares the logits dyn_cuda_compare dumped (--dump-logits PREFIX) with Hugging Face transformers
running the same model in float32 and in bfloat16 on the same token sequence.

    dyn_cuda_compare --model M.gguf --ids ... --steps 32 --cpu-weights f32 --dump-logits /tmp/d
    python3 scripts/hf_logits_compare.py --model M.gguf --dump /tmp/d [--device cuda]

Prints, per pair, ||a - b|| / ||b|| over the vocabulary at each compared position (worst, median,
how many under 1e-2) and whether the argmaxes agree: HF bf16 against HF fp32 is what a trusted
bf16 implementation's own rounding does to this model, the yardstick for "bf16 tolerance".
A .gguf model is loaded through transformers' GGUF support (needs the gguf package; weights are
dequantized to float32, as dyn's --cpu-weights f32 does); a directory as a Hugging Face checkpoint.
"""
import argparse
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def rel_errors(a, b):
    return np.linalg.norm((a - b).astype(np.float64), axis=1) / np.linalg.norm(b.astype(np.float64), axis=1)


def report(name, a, b):
    e = rel_errors(a, b)
    agree = int((a.argmax(1) == b.argmax(1)).sum())
    print(f"{name:34s} worst {e.max():.3e}  median {np.median(e):.3e}  under 1e-2 {int((e < 1e-2).sum())}/{len(e)}  "
          f"argmax agrees {agree}/{len(e)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dump", required=True, help="PREFIX given to dyn_cuda_compare --dump-logits")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    ids = [int(t) for t in open(args.dump + ".ids").read().strip().split(",")]
    cpu = np.fromfile(args.dump + ".cpu.f32", dtype=np.float32)
    gpu = np.fromfile(args.dump + ".gpu.f32", dtype=np.float32)

    def hf_logits(dtype):
        if args.model.endswith(".gguf"):
            kw = dict(pretrained_model_name_or_path=os.path.dirname(os.path.abspath(args.model)),
                      gguf_file=os.path.basename(args.model))
        else:
            kw = dict(pretrained_model_name_or_path=args.model)
        model = AutoModelForCausalLM.from_pretrained(**kw, dtype=torch.float32).to(dtype).to(args.device).eval()
        with torch.no_grad():
            out = model(torch.tensor([ids], device=args.device)).logits[0].float().cpu().numpy()
        return out

    fp32, bf16 = hf_logits(torch.float32), hf_logits(torch.bfloat16)
    vocab = fp32.shape[1]
    rows = cpu.size // vocab
    # dyn compared the positions from the prompt's last token on: the last `rows` positions fed.
    sel = slice(len(ids) - rows, len(ids))
    cpu, gpu = cpu.reshape(rows, vocab), gpu.reshape(rows, vocab)
    hf32, hf16 = fp32[sel], bf16[sel]
    print(f"{len(ids)} tokens, {rows} positions compared, vocab {vocab}, transformers on {args.device}")
    report("HF bf16 vs HF fp32", hf16, hf32)
    report("dyn CPU (reference weights) vs HF fp32", cpu, hf32)
    report("dyn GPU vs HF fp32", gpu, hf32)
    report("dyn GPU vs dyn CPU", gpu, cpu)


if __name__ == "__main__":
    main()
