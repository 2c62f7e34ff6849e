# HF transformers generate() on the Llama-3.1-8B shape with random bf16 weights: the floor a
# plain framework gives, batch 1 and 32, prompt 512 random ids, 128 new tokens (min = max).
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(**json.load(open(sys.argv[1])))
torch.set_default_dtype(torch.bfloat16)
t0 = time.time()
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).eval()
print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, init {time.time()-t0:.1f} s", flush=True)
g = torch.Generator(device="cuda").manual_seed(0)
for bs in (1, 32):
    ids = torch.randint(0, 128000, (bs, 512), device="cuda", generator=g)
    kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
    model.generate(ids, **dict(kw, max_new_tokens=8, min_new_tokens=8))  # warm-up
    torch.cuda.synchronize(); t = time.time()
    out = model.generate(ids, **kw)
    torch.cuda.synchronize(); s = time.time() - t
    n = (out.shape[1] - 512) * bs
    print(f"HF generate batch {bs}: {n} tokens in {s:.2f} s = {n/s:.1f} tok/s (prefill 512 included)", flush=True)
