# Usage: python3 block_trace_summary.py TRACE.csv. Summarizes a block trace CSV (DYN_CUDA_BLOCK_TRACE, see
# docs/cuda_backend.md "Block trace"): kernels as runs of blocks with the same
# (grid, threads) in release order. Per kernel kind (medians over layers): share of the critical
# path (next kernel's first release - this one's first release) = work (last marked block end -
# first release) + handoff (next first release - last end); lead = first release - first resident.
import csv, sys, statistics as st
rows = list(csv.DictReader(open(sys.argv[1])))
ks = []
for r in rows:
    key = (int(r['grid']), int(r['threads']))
    res, rel, end = int(r['resident_ns']), int(r['released_ns']), int(r['ended_ns'])
    if ks and ks[-1]['key'] == key:
        k = ks[-1]; k['n'] += 1; k['last_rel'] = rel; k['first_res'] = min(k['first_res'], res); k['end'] = max(k['end'], end)
        k['rows'].append(r)
    else:
        ks.append(dict(key=key, n=1, first_rel=rel, last_rel=rel, first_res=res, end=end, rows=[r]))
names = []
def classify(i, k):
    g, t = k['key']
    prev = names[i-1] if i else None
    # Staged GEMVs (DYN_CUDA_GEMV_STAGED, the default since round 18): blocks of 384-768 threads,
    # one or two a multiprocessor; the norm before them is inside.
    if t in (384, 512, 640, 768) and g <= 300:
        if prev == 'o': return 'gateup'
        if i + 1 < len(ks) and ks[i+1]['key'][1] in (128, 256, 512) and ks[i+1]['key'][0] in (128, 256): return 'qkv'
        return 'lmhead'
    # The 8B shape's GEMVs at one row a block or (default) 2 or 4 rows sharing x (DYN_CUDA_GEMV_ROWS_X).
    if g in (6144, 3072, 1536) and t == 128: return 'qkv'
    if g in (4096, 2048, 1024) and t == 128:
        return 'down' if prev == 'gateup' else 'o'
    if g in (14336, 7168): return 'gateup'
    if g in (128256, 64128, 32064): return 'lmhead'
    if g == 1 and t == 1024: return 'norm'
    if g in (128, 256) and t in (128, 256, 512): return f'attn{g}x{t}'  # decode attention, 4-16 warps a block
    return f'g{g}x{t}'
for i, k in enumerate(ks): names.append(classify(i, k))
def name(i, k): return names[i]
by = {}
for i, k in enumerate(ks):
    nxt = ks[i+1]['first_rel'] if i + 1 < len(ks) else k['last_rel']
    k['share'] = nxt - k['first_rel']
    k['lead'] = k['first_rel'] - k['first_res']
    k['work'] = k['end'] - k['first_rel'] if k['end'] >= 0 else float('nan')
    k['handoff'] = nxt - k['end'] if k['end'] >= 0 else float('nan')
    by.setdefault(name(i, k), []).append(k)
span = ks[-1]['last_rel'] - ks[0]['first_rel']
print(f"kernels {len(ks)}, span first->last release {span/1e3:.1f} us")
print(f"{'kind':>12} {'count':>5} {'share':>7} {'sum':>7} {'work':>6} {'handoff':>7} {'lead':>6}  (us, medians; sum over the step)")
for n, v in sorted(by.items(), key=lambda kv: -sum(k['share'] for k in kv[1])):
    med = lambda f: st.median(k[f] for k in v) / 1e3
    print(f"{n:>12} {len(v):5d} {med('share'):7.2f} {sum(k['share'] for k in v)/1e3:7.1f} {med('work'):6.2f} {med('handoff'):7.2f} {med('lead'):6.2f}")
mid = [i for i, k in enumerate(ks) if name(i, k) == 'qkv']
if len(mid) > 16:
    a, b = mid[16], mid[17]
    print("layer 16:", " | ".join(f"{name(i, ks[i])} {ks[i]['share']/1e3:.2f} (work {ks[i]['work']/1e3:.2f})" for i in range(a - 1, b)))

# Inside kernels that mark points (decode attention: 0 = q rotated and the new token written,
# 1 = key loop done, 2 = after the cluster barrier): medians over all recorded blocks of each
# kind, us from release.
marks = {}
for r in rows:
    if int(r.get('mark0_ns', -1)) < 0: continue
    rel = int(r['released_ns'])
    m = [int(r[f'mark{j}_ns']) for j in range(3)] + [int(r['ended_ns'])]
    marks.setdefault((int(r['grid']), int(r['threads'])), []).append([(x - rel) if x >= 0 else float('nan') for x in m])
for key, v in marks.items():
    cols = list(zip(*v))
    print(f"marks g{key[0]}x{key[1]} ({len(v)} blocks): " + ", ".join(f"{n} {st.median(c)/1e3:.2f}" for n, c in zip(["mark0", "mark1", "mark2", "end"], cols)))

# The spread inside each launch of a kernel that marks points (decode attention records whole
# clusters: blockIdx.x % 8 == 0 and the last kv head): per launch the earliest, median and latest
# recorded block at each point, us from the launch's first release, then medians over the launches.
# A barrier that waits for the slowest block shows as max(mark1) well before mark2's minimum.
points = ['resident_ns', 'mark0_ns', 'mark1_ns', 'mark2_ns', 'ended_ns']
spread = {}
for i, k in enumerate(ks):
    blocks = [r for r in k['rows'] if int(r.get('mark0_ns', -1)) >= 0]
    if len(blocks) < 2: continue
    per = spread.setdefault(name(i, k), {p: ([], [], []) for p in points})
    for p in points:
        xs = [int(r[p]) - k['first_rel'] for r in blocks if int(r[p]) >= 0]
        if xs:
            per[p][0].append(min(xs)); per[p][1].append(st.median(xs)); per[p][2].append(max(xs))
for n, per in spread.items():
    print(f"spread {n} (min / median / max over a launch's recorded blocks): " +
          ", ".join(f"{p[:-3]} {st.median(a)/1e3:.2f}/{st.median(b)/1e3:.2f}/{st.median(c)/1e3:.2f}" for p, (a, b, c) in per.items() if a))
