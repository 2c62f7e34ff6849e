#!/usr/bin/env python3
"""Writes a random-weight Llama-style model as a Hugging Face directory (config.json +
model.safetensors, bf16), for comparing backends on a real model shape without real weights.

    python3 scripts/make_random_llama.py --out /tmp/rand-llama [--arch llama|qwen3] [--dtype bf16|f16] [--seed 0]

The default shape is small but has what the 8B model's kernels need: GQA with head_dim 128
(8 query heads over 2 KV heads), an untied LM head, Llama-3 RoPE scaling, and norm weights that
are not all ones. `--arch qwen3` adds per-head q/k RMSNorm weights (Qwen3ForCausalLM). Needs only
numpy; the safetensors file is written by hand (8-byte header length, JSON header, raw data).
"""
import argparse
import json
import os
import struct

import numpy as np


def bf16_bytes(a):
    """float32 array -> bf16 bytes, rounded to nearest even (as torch's .to(torch.bfloat16))."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def write_safetensors(path, tensors, dtype):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = bf16_bytes(arr) if dtype == "bf16" else np.ascontiguousarray(arr, dtype=np.float16).tobytes()
        header[name] = {"dtype": dtype.upper(), "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", choices=["llama", "qwen3"], default="llama")
    ap.add_argument("--dtype", choices=["bf16", "f16"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    H, D = args.hidden, args.head_dim

    def matrix(rows, cols):  # variance 1/cols: activations keep their scale through the layers
        return rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)

    def norm(n):  # around one, not all ones, so a kernel that skips the weight fails
        return 1.0 + 0.2 * rng.standard_normal(n, dtype=np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((args.vocab, H), dtype=np.float32)}
    for l in range(args.layers):
        p = f"model.layers.{l}."
        t[p + "self_attn.q_proj.weight"] = matrix(args.heads * D, H)
        t[p + "self_attn.k_proj.weight"] = matrix(args.kv_heads * D, H)
        t[p + "self_attn.v_proj.weight"] = matrix(args.kv_heads * D, H)
        t[p + "self_attn.o_proj.weight"] = matrix(H, args.heads * D)
        t[p + "mlp.gate_proj.weight"] = matrix(args.ffn, H)
        t[p + "mlp.up_proj.weight"] = matrix(args.ffn, H)
        t[p + "mlp.down_proj.weight"] = matrix(H, args.ffn)
        t[p + "input_layernorm.weight"] = norm(H)
        t[p + "post_attention_layernorm.weight"] = norm(H)
        if args.arch == "qwen3":
            t[p + "self_attn.q_norm.weight"] = norm(D)
            t[p + "self_attn.k_norm.weight"] = norm(D)
    t["model.norm.weight"] = norm(H)
    t["lm_head.weight"] = 2.0 * matrix(args.vocab, H)  # logits ~ N(0, 4): clear greedy winners

    config = {
        "architectures": ["Qwen3ForCausalLM" if args.arch == "qwen3" else "LlamaForCausalLM"],
        "model_type": args.arch, "hidden_size": H, "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "head_dim": D, "vocab_size": args.vocab,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16" if args.dtype == "bf16" else "float16", "bos_token_id": 1, "eos_token_id": 2,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    write_safetensors(os.path.join(args.out, "model.safetensors"), t, args.dtype)
    n = sum(a.size for a in t.values())
    print(f"{args.out}: {args.arch}, {n / 1e6:.1f} M parameters ({args.dtype}), seed {args.seed}")


if __name__ == "__main__":
    main()
