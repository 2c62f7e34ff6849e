#!/usr/bin/env python3
"""Independent numpy reference for the native engine's GGUF forward pass (Llama-family).

Dequantizes every tensor with the `gguf` package (gguf.quants.dequantize), undoes llama.cpp's Q/K
row permutation for llama-arch files and applies Hugging Face style rotate-half RoPE, then runs
greedy decoding in float64 with a plain KV cache. With --act-q8 (the default) the rows entering a
matmul with a quantized weight are first rounded to 8-bit blocks of 32 (scale amax/127 stored as
f16), which is what llama.cpp (and dyn) compute; --no-act-q8 gives the exact dequantized model. Prints (or writes) per step the greedy id and the
top-2 (id, logit) pairs, in the JSON form src/engine/native/model/model_test.cpp reads.

  .venv/bin/python scripts/ref_forward.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --prompt "The capital of France is" --prompt "Once upon a time" --steps 24 \
      --out src/engine/native/model/testdata/smollm2_q4_1_reference.json
"""
import argparse
import json

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(v).decode()
    return v[0].item() if len(v) == 1 else v


class GgufModel:
    def __init__(self, path, act_q8=True):
        r = GGUFReader(path)
        self.act_q8 = act_q8
        self.quantized = set()
        self.arch = field(r, "general.architecture")
        a = self.arch
        self.n_layer = field(r, f"{a}.block_count")
        self.n_embd = field(r, f"{a}.embedding_length")
        self.n_head = field(r, f"{a}.attention.head_count")
        self.n_kv = field(r, f"{a}.attention.head_count_kv", self.n_head)
        self.head_dim = self.n_embd // self.n_head
        self.theta = field(r, f"{a}.rope.freq_base", 10000.0)
        self.eps = field(r, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        tok = r.fields["tokenizer.ggml.tokens"]
        self.tokens = [bytes(tok.parts[i]).decode("utf-8", "replace") for i in tok.data]
        self.t = {}
        for t in r.tensors:
            if t.tensor_type.name not in ("F32", "F16", "BF16"):
                self.quantized.add(t.name)
            w = dequantize(t.data, t.tensor_type).astype(np.float64)
            shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: [rows][cols]
            self.t[t.name] = w.reshape(shape)
        if "output.weight" not in self.t:
            self.t["output.weight"] = self.t["token_embd.weight"]
            if "token_embd.weight" in self.quantized:
                self.quantized.add("output.weight")
        if a == "llama":  # undo llama.cpp's permute so rotate-half RoPE applies
            for l in range(self.n_layer):
                for name, heads in (("attn_q", self.n_head), ("attn_k", self.n_kv)):
                    k = f"blk.{l}.{name}.weight"
                    w = self.t[k]
                    self.t[k] = w.reshape(heads, self.head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        half = self.head_dim // 2
        self.inv_freq = 1.0 / (self.theta ** (np.arange(0, half, dtype=np.float64) * 2 / self.head_dim))

    def mm(self, x, name):
        """x @ W^T, with x rounded to 8-bit blocks first when W is quantized (llama.cpp's Q8_0/Q8_1)."""
        if self.act_q8 and name in self.quantized:
            shape = x.shape
            b = x.reshape(-1, 32).astype(np.float32)
            d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
            inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
            q = np.round(b * inv)  # half to even, as vcvtps2dq
            x = (q * d.astype(np.float16).astype(np.float64)).reshape(shape)
        return x @ self.t[name].T

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):  # x: [T, heads, D]
        ang = np.outer(pos, self.inv_freq)  # [T, D/2]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
        half = self.head_dim // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def forward(self, ids, start, cache):
        T, D = len(ids), self.head_dim
        pos = np.arange(start, start + T)
        x = self.t["token_embd.weight"][ids]
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self.rms(x, self.t[p + "attn_norm.weight"])
            q = self.mm(h, p + "attn_q.weight").reshape(T, self.n_head, D)
            k = self.mm(h, p + "attn_k.weight").reshape(T, self.n_kv, D)
            v = self.mm(h, p + "attn_v.weight").reshape(T, self.n_kv, D)
            q, k = self.rope(q, pos), self.rope(k, pos)
            ck, cv = cache.setdefault(l, (np.zeros((0, self.n_kv, D)), np.zeros((0, self.n_kv, D))))
            ck, cv = np.concatenate([ck, k]), np.concatenate([cv, v])
            cache[l] = (ck, cv)
            g = self.n_head // self.n_kv
            kk, vv = np.repeat(ck, g, axis=1), np.repeat(cv, g, axis=1)  # [S, H, D]
            s = np.einsum("thd,shd->hts", q, kk) / np.sqrt(D)
            mask = np.arange(ck.shape[0])[None, :] > pos[:, None]
            s = np.where(mask[None], -np.inf, s)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", s, vv).reshape(T, -1)
            x = x + self.mm(o, p + "attn_output.weight")
            h = self.rms(x, self.t[p + "ffn_norm.weight"])
            gate, up = self.mm(h, p + "ffn_gate.weight"), self.mm(h, p + "ffn_up.weight")
            x = x + self.mm(gate / (1 + np.exp(-gate)) * up, p + "ffn_down.weight")
        h = self.rms(x[-1], self.t["output_norm.weight"])
        return self.mm(h[None, :], "output.weight")[0]

    def encode(self, text):
        """Greedy longest match over the byte-level BPE vocabulary (good enough for test prompts)."""
        vocab = {t: i for i, t in enumerate(self.tokens)}
        s, ids = text.replace(" ", "\u0120"), []
        while s:
            for n in range(min(len(s), 24), 0, -1):
                if s[:n] in vocab:
                    ids.append(vocab[s[:n]])
                    s = s[n:]
                    break
            else:
                raise ValueError(f"cannot encode {s!r}")
        return ids

    def decode(self, ids):
        return "".join(self.tokens[i] for i in ids).replace("\u0120", " ").replace("\u010a", "\n")


def greedy(model, prompt_ids, steps):
    cache, out, top = {}, [], []
    logits = model.forward(np.array(prompt_ids), 0, cache)
    pos = len(prompt_ids)
    for _ in range(steps):
        order = np.argsort(-logits)[:2]
        top.append([[int(i), float(logits[i])] for i in order])
        out.append(int(order[0]))
        logits = model.forward(np.array([out[-1]]), pos, cache)
        pos += 1
    return out, top


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--ids", action="append", default=[], help="comma-separated prompt ids")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out")
    ap.add_argument("--no-act-q8", dest="act_q8", action="store_false")
    args = ap.parse_args()
    model = GgufModel(args.gguf, args.act_q8)
    prompts = [model.encode(p) for p in args.prompt] + [[int(x) for x in s.split(",")] for s in args.ids]
    cases = []
    for ids in prompts:
        out, top = greedy(model, ids, args.steps)
        print(repr(model.decode(ids)), "->", repr(model.decode(out)))
        cases.append({"prompt_ids": ids, "greedy_ids": out, "step_top2": top, "text": model.decode(ids + out)})
    doc = {"model": args.gguf, "reference": "scripts/ref_forward.py (gguf.quants.dequantize + numpy float64)", "act_q8": args.act_q8, "cases": cases}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    else:
        print(json.dumps(doc))


if __name__ == "__main__":
    main()
