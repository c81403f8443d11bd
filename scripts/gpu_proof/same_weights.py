"""Two runs of greedy_logprobs on the same prompts (e.g. quantized and dense weights, or the GPU and
the CPU): how far their top-5 logprobs are apart where both report a token, and where greedy parts.

    python3 same_weights.py A_JSONL B_JSONL LABEL [MAX_NATS]

With MAX_NATS it exits 1 when any compared logprob is further apart than that (0: bit for bit, as
for the same kernels on the same inputs).
"""
import json
import sys

a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
label = sys.argv[3]
assert len(a) == len(b) and a, f"{len(a)} against {len(b)} results"
worst, total, n = 0.0, 0.0, 0
for k, (x, y) in enumerate(zip(a, b)):
    same = next((i for i, (s, t) in enumerate(zip(x["tokens"], y["tokens"])) if s != t), len(x["tokens"]))
    # Positions up to the first difference share a prefix, so their logprobs are comparable.
    for i in range(min(same + 1, len(x["tokens"]))):
        ya = dict((tid, l) for tid, l in y["top"][i])
        for tid, l in x["top"][i]:
            if tid in ya:
                d = abs(ya[tid] - l)
                worst, total, n = max(worst, d), total + d, n + 1
    print(f"{label}: prompt {k}: greedy tokens agree for {same}/{len(x['tokens'])}")
print(f"{label}: top-5 logprobs apart: max {worst:.4f}, mean {total / max(n, 1):.4f} nats over {n}")
if len(sys.argv) > 4:
    limit = float(sys.argv[4])
    if worst > limit or n == 0:
        print(f"{label}: FAILED: max {worst} over the limit {limit} (or nothing compared)")
        sys.exit(1)
    print(f"{label}: within {limit}")
