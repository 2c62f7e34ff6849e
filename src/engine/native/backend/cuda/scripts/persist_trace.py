#!/usr/bin/env python3
"""Reads the persistent kernel's per-block trace (DYN_CUDA_PERSIST_TRACE_FILE, plain or .gz) and
prints what round 11 of docs/benchmarks/cuda.md read from it, for the file's last launch:

  1. one layer's timeline: per phase, min / median / max over the blocks of its start, its input
     staged and its chunks done (us from the layer's first start);
  2. phase changes: per GEMV phase kind, the median block's input staged after the previous
     phase's last block was done with its chunks, and that block's end after its chunks;
  3. which multiprocessors are slow: per GEMV phase kind, each SM's mean lateness against the
     phase's median block, the split-half correlation over the layers (near 1: always the same
     SMs), and the earliest and latest SMs;
  4. the layer's phases from the inside (medians over blocks, us after the phase's start): input
     entries loaded, the norm's scale known, input staged, chunks done, the phase's end, chunks
     already landed when their warp came of those taken, and the stream rate from staged to done
     (the phase's weight bytes over the median block's time, TB/s).

Usage: persist_trace.py trace.csv[.gz] [--layer N]   (phases per layer found from the file)
"""
import argparse
import collections
import gzip
import statistics as st

CHUNK_BYTES = 8192  # a ring slot: kChunkBytes in cuda_persistent.cuh


def launches(path):
    opener = gzip.open if path.endswith(".gz") else open
    out, cur, hdr = [], [], None
    with opener(path, "rt") as f:
        for line in f:
            fields = line.strip().split(",")
            if fields[0] == "phase":
                if cur:
                    out.append(cur)
                cur, hdr = [], fields
                continue
            row = dict(zip(hdr, fields))
            for k in row:
                if k != "kind":
                    row[k] = int(row[k])
            cur.append(row)
    if cur:
        out.append(cur)
    return out


def kind(rows):
    r = rows[0]
    return "attention" if r["kind"] == "attn" else "gemv %dx%d" % (r["units"], r["cols"])


def q3(v):
    return "%7.1f /%7.1f /%7.1f" % (min(v), st.median(v), max(v))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--layer", type=int, default=1)
    args = ap.parse_args()
    rows = launches(args.trace)[-1]
    by = collections.defaultdict(list)
    for r in rows:
        by[r["phase"]].append(r)
    n = max(by) + 1
    attn = [p for p in range(n) if by[p][0]["kind"] == "attn"]
    per_layer = attn[1] - attn[0] if len(attn) > 1 else n
    first = attn[0] - 1 + args.layer * per_layer if attn else 0  # the layer's Q/K/V phase
    base = min(r["start"] for r in by[first])
    print("1. layer %d (us from its first start; min / median / max over blocks)" % args.layer)
    for p in range(first, min(n, first + per_layer + 1)):
        rs = by[p]
        line = "  %-20s start %s" % (kind(rs), q3([(r["start"] - base) / 1e3 for r in rs]))
        if rs[0]["kind"] == "gemv":
            line += "  staged %s" % q3([(r["start"] + r["staged"] - base) / 1e3 for r in rs])
            line += "  done %s" % q3([(r["chunks_done"] - base) / 1e3 for r in rs if r["chunks_done"]])
        else:
            line += "  end %s" % q3([(r["end"] - base) / 1e3 for r in rs])
        print(line)
    print("2. phase changes (median over phases, us)")
    change = collections.defaultdict(lambda: collections.defaultdict(list))
    for p in range(1, n):
        rs, prev = by[p], by[p - 1]
        if rs[0]["kind"] != "gemv":
            continue
        prev_done = max(r["chunks_done"] if prev[0]["kind"] == "gemv" else r["end"] for r in prev)
        last = max(prev, key=lambda r: r["chunks_done"] if prev[0]["kind"] == "gemv" else r["end"])
        c = change[kind(rs)]
        c["staged after the last writer"].append((st.median(r["start"] + r["staged"] for r in rs) - prev_done) / 1e3)
        if prev[0]["kind"] == "gemv":
            c["last writer's end after its chunks"].append((last["end"] - last["chunks_done"]) / 1e3)
    for k, c in change.items():
        print("  %-20s " % k + "; ".join("%s %.2f" % (m, st.median(v)) for m, v in c.items()))
    print("3. multiprocessors (lateness against the phase's median block, us)")
    late = collections.defaultdict(lambda: collections.defaultdict(list))
    for p in range(n):
        rs = by[p]
        if rs[0]["kind"] != "gemv":
            continue
        med = st.median(r["chunks_done"] for r in rs)
        for r in rs:
            late[kind(rs)][r["smid"]].append((r["chunks_done"] - med) / 1e3)
    for k, d in late.items():
        mean = {s: st.mean(v) for s, v in d.items()}
        corr = float("nan")
        halves = [(st.mean(v[0::2]), st.mean(v[1::2])) for v in d.values() if len(v) > 1]
        if len(halves) > 2:
            xs, ys = zip(*halves)
            mx, my = st.mean(xs), st.mean(ys)
            sxy = sum((x - mx) * (y - my) for x, y in halves)
            sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
            corr = sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else float("nan")
        order = sorted(mean, key=mean.get)
        print("  %-20s x%-3d split-half corr %.2f; earliest %s; latest %s" % (
            k, len(next(iter(d.values()))), corr,
            " ".join("%d:%.1f" % (s, mean[s]) for s in order[:6]),
            " ".join("%d:%.1f" % (s, mean[s]) for s in order[-6:])))
    print("4. layer %d's phases from the inside (medians over blocks, us after the phase's start)" % args.layer)
    for p in range(first, min(n, first + per_layer)):
        rs = by[p]
        if rs[0]["kind"] != "gemv":
            print("  %-20s end %.2f" % (kind(rs), st.median(r["end"] - r["start"] for r in rs) / 1e3))
            continue
        med = lambda f: st.median(f(r) for r in rs) / 1e3
        staged, done = med(lambda r: r["staged"]), med(lambda r: r["chunks_done"] - r["start"])
        # SwiGLU phases take two slots (gate, up) per unit and row chunk (the CSV does not say which
        # phases have SwiGLU; every block's slots taken, summed, does)
        row_slots = -(-rs[0]["cols"] * 2 // CHUNK_BYTES)
        weights = 2 if sum(r["taken"] for r in rs) >= 2 * row_slots * rs[0]["units"] else 1
        weight_bytes = rs[0]["units"] * rs[0]["cols"] * 2 * weights
        print("  %-20s loaded %5.2f  normed %5.2f  staged %5.2f  done %6.2f  end %6.2f  landed %d/%d  %.2f TB/s" % (
            kind(rs), med(lambda r: r.get("stage_loaded", 0)), med(lambda r: r.get("stage_normed", 0)), staged, done,
            med(lambda r: r["end"] - r["start"]), st.median(r["landed"] for r in rs), st.median(r["taken"] for r in rs),
            weight_bytes / max(done - staged, 1e-3) / 1e6))


if __name__ == "__main__":
    main()
