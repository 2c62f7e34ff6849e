#!/usr/bin/env python3
"""Generates tests/golden/tokenizer/*.jsonl: reference encodings/decodings from Hugging Face.

References:
  * every tokenizer.json under /work/shared/tokenizers, plus stories260K: `tokenizers`'
    Tokenizer.from_file (encode with add_special_tokens=True; decode with skip_special_tokens
    True and False).
  * the SmolLM2 GGUF: transformers' own GGUF tokenizer builder (convert_gguf_tokenizer) fed the
    file's metadata (read with the `gguf` package, so torch is not needed), with one correction:
    transformers does not know tokenizer.ggml.pre = "smollm" and falls back to GPT-2's split,
    while SmolLM2's original tokenizer.json and llama.cpp first isolate every digit
    (Digits(individual_digits=True) + ByteLevel). The golden uses the corrected pre-tokenizer;
    the header line reports on how many cases the two differ.

Cases: the first human turn of each ShareGPT conversation (text not stored; the test reads it
from the same file), a list of hard strings (stored), and id sequences decoded only (random ids,
lone byte tokens that form invalid UTF-8).

File format, one JSON object per line:
  line 1: {"name", "kind": "json"|"gguf", "path", "sharegpt", ...}
  then:   {"sharegpt": i} or {"text": "..."} or {"decode_only": true},
          "ids": "space separated", "dec": decode(skip=False), "dec_skip": decode(skip=True)
  "dec"/"dec_skip" are left out when they equal the text; "dec_pre"/"dec_skip_pre" instead give
  only what precedes the text when the decode is that plus the text (e.g. "<s>"). For
  decode_only cases "dec_skip" is left out when it equals "dec".

Usage: .venv/bin/python scripts/gen_tokenizer_goldens.py [--out tests/golden/tokenizer]
"""
import argparse
import json
import os
import random
import sys

from tokenizers import Tokenizer, pre_tokenizers

SHARED = "/work/shared"
SHAREGPT = f"{SHARED}/traces/sharegpt/ShareGPT_V3_filtered_1000.json"
GGUF_PATH = os.path.join(os.path.dirname(__file__), "..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

HARD_STRINGS = [
    "",
    " ",
    "  ",
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    "\t",
    "tab\tseparated\tvalues\t\t",
    "\n",
    "\n\n\n",
    "line one\nline two\r\nline three\rend",
    " \n \n\t \r\n  ",
    "Hello, world!",
    "Hello world",
    "hello",
    "HELLO WORLD",
    "I'm can't won't they'll we've she'd it's I'M CAN'T",
    "0",
    "1234567890",
    "3.14159265358979 and 2,718,281,828 and 1e-10",
    "year 2024: 12345678901234567890123",
    "٣٤٥ ١٢ ⅷ ² ½ 𝟙𝟚𝟛",
    "日本語のテキストです。漢字とひらがなとカタカナ。",
    "中文文本，包括标点符号！还有数字123。",
    "한국어 텍스트입니다. 안녕하세요!",
    "ᄒᆞᆫ글 조합형",
    "Emoji: 😀 😃 😄 👍🏽 🇺🇸 🏳️‍🌈 👨‍👩‍👧‍👦 ❤️",
    "🦙🦙🦙",
    "👩🏽‍💻 coding",
    "combining: e\u0301 a\u0300 n\u0303 o\u0308 \u0041\u030A",
    "precomposed: é à ñ ö Å",
    "Zalgo: Z\u0351\u036b\u0343a\u0357l\u0310g\u036ao\u0358",
    "עברית: שלום עולם",
    "العربية: مرحبا بالعالم",
    "mixed RTL: hello שלום world مرحبا",
    "Ελληνικά: Γειά σου Κόσμε ΣΊΣΥΦΟΣ",
    "Русский текст: Привет, мир!",
    "ﬁ ﬂ ﬀ ℌ ℍ Ⅻ ① ㎏ ｆｕｌｌｗｉｄｔｈ",
    "İstanbul ıi ß ẞ",
    "\u00a0non-breaking\u00a0spaces\u2003em\u3000ideographic",
    "zero\u200bwidth\u200cjoiners\u200d",
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!(\"{:?}\", v); }",
    "{\"key\": [1, 2, {\"nested\": null}], \"b\": true}",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com +1-555-0100",
    "!!!???...,,,;;;:::",
    "--- *** ___ ~~~ ``` '''",
    "a" * 300,
    "supercalifragilisticexpialidocious" * 8,
    "x" + "y" * 1000 + "z",
    "😀" * 50,
    " ".join(["word"] * 200),
    "Antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "Once upon a time, there was a little girl named Lily.",
    "  two leading spaces",
    "Tom and Sam's dog 123 jumped!\nNew line here",
    "Zebra ünïcödé 日本 emoji 🦙 done",
]

SPECIAL_TEMPLATES = [
    "{t}",
    "{t}{t}",
    "before{t}after",
    "before {t} after",
    "{t}\nline after special",
    "text ending with special{t}",
    " {t} ",
    "<|not_a_real_token|> <s x> </ s>",
]


def sharegpt_prompts():
    data = json.load(open(SHAREGPT))
    return [next(c["value"] for c in conv["conversations"] if c["from"] == "human") for conv in data]


def ids_str(ids):
    return " ".join(str(i) for i in ids)


def case_line(head, tok, ids, text=None):
    dec = tok.decode(ids, skip_special_tokens=False)
    dec_skip = tok.decode(ids, skip_special_tokens=True)
    rec = dict(head)
    rec["ids"] = ids_str(ids)
    for key, value in (("dec", dec), ("dec_skip", dec_skip)):
        if text is None:
            if key == "dec" or value != dec:
                rec[key] = value
        elif value != text:
            if value.endswith(text) and text:
                rec[key + "_pre"] = value[: len(value) - len(text)]
            else:
                rec[key] = value
    return json.dumps(rec, ensure_ascii=False)


def byte_token_ids(tok):
    """Ids of single-byte tokens: <0xHH> (byte fallback) or byte-level characters."""
    vocab = tok.get_vocab()
    out = {}
    for b in range(256):
        t = f"<0x{b:02X}>"
        if t in vocab:
            out[b] = vocab[t]
    if out:
        return out
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    for b, ch in bytes_to_unicode().items():
        if ch in vocab:
            out[b] = vocab[ch]
    return out


def decode_only_cases(tok, rng):
    """Id sequences that exercise the decoders: lone/invalid bytes, random ids, specials."""
    byte_ids = byte_token_ids(tok)
    seqs = []
    for bs in ([0xE2, 0x82], [0xFF], [0xE2, 0x82, 0xAC], [0xF0, 0x9F, 0xA6], [0xC3], [0x80, 0x80],
               [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0x41, 0xE2, 0x41], [0xF0, 0x9F, 0x98, 0x80, 0xF0]):
        if all(b in byte_ids for b in bs):
            seqs.append([byte_ids[b] for b in bs])
    size = tok.get_vocab_size(with_added_tokens=True)
    specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special][:8]
    special_ids = [tok.token_to_id(s) for s in specials]
    for _ in range(40):
        n = rng.randint(1, 24)
        seq = [rng.randrange(size) for _ in range(n)]
        if special_ids and rng.random() < 0.5:
            seq.insert(rng.randrange(len(seq) + 1), rng.choice(special_ids))
        seqs.append(seq)
    return seqs


def special_strings(tok):
    specials = sorted(t.content for t in tok.get_added_tokens_decoder().values())[:6]
    out = []
    for s in specials:
        for tmpl in SPECIAL_TEMPLATES:
            out.append(tmpl.format(t=s))
    return out


def gguf_reference(path):
    """transformers' GGUF tokenizer, and the same with SmolLM2's real (digit-isolating) split."""
    import gguf
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields.get(key)
        if f is None:
            return None
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[-1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        return f.parts[f.data[0]].tolist()[0]

    d = {
        "tokenizer_type": field("tokenizer.ggml.model"),
        "pre_tokenizer_type": field("tokenizer.ggml.pre"),
        "tokens": field("tokenizer.ggml.tokens"),
        "token_type": field("tokenizer.ggml.token_type"),
        "merges": field("tokenizer.ggml.merges"),
    }
    arch = field("general.architecture")
    as_transformers, _ = convert_gguf_tokenizer(arch, dict(d))
    corrected = Tokenizer.from_str(as_transformers.to_str())
    if d["pre_tokenizer_type"] in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"):
        corrected.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return as_transformers, corrected, d["pre_tokenizer_type"]


def write_golden(out_dir, name, kind, path, tok, prompts, alt=None):
    rng = random.Random(1234)
    lines = []
    differ = 0
    texts = [("sharegpt", i, t) for i, t in enumerate(prompts)]
    texts += [("text", None, t) for t in HARD_STRINGS + special_strings(tok)]
    for src, i, text in texts:
        ids = tok.encode(text, add_special_tokens=True).ids
        if alt is not None and alt.encode(text, add_special_tokens=True).ids != ids:
            differ += 1
        head = {"sharegpt": i} if src == "sharegpt" else {"text": text}
        lines.append(case_line(head, tok, ids, text))
    for seq in decode_only_cases(tok, rng):
        lines.append(case_line({"decode_only": True}, tok, seq))
    header = {"name": name, "kind": kind, "path": path, "sharegpt": SHAREGPT, "cases": len(lines)}
    if alt is not None:
        header["note"] = ("pre-tokenizer corrected to Digits(individual)+ByteLevel as SmolLM2/llama.cpp; "
                          f"transformers' GGUF tokenizer differs on {differ} of {len(texts)} encode cases")
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
        f.write(json.dumps(header, ensure_ascii=False) + "\n")
        for line in lines:
            f.write(line + "\n")
    print(f"{name}: {len(lines)} cases" + (f", transformers differs on {differ}" if alt is not None else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "golden", "tokenizer"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    prompts = sharegpt_prompts()
    sources = [(n, f"{SHARED}/tokenizers/{n}") for n in sorted(os.listdir(f"{SHARED}/tokenizers"))
               if os.path.isfile(f"{SHARED}/tokenizers/{n}/tokenizer.json")]
    sources.append(("stories260K", f"{SHARED}/models/stories260K/hf"))
    for name, d in sources:
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        write_golden(args.out, name, "json", d, tok, prompts)
    if os.path.exists(GGUF_PATH):
        as_transformers, corrected, pre = gguf_reference(GGUF_PATH)
        write_golden(args.out, "smollm2-gguf", "gguf", "models/SmolLM2-135M-Instruct.Q4_1.gguf", corrected, prompts,
                     alt=as_transformers)
    else:
        print(f"skipping the GGUF golden: {GGUF_PATH} is absent", file=sys.stderr)


if __name__ == "__main__":
    main()
