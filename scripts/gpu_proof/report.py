"""The GPU proof's summary table (markdown on stdout) from the logs of gpu-proof.sh's steps.

    python3 report.py MODEL_DIR LOG_DIR
"""
import glob
import json
import os
import struct
import sys

import torch

model_dir, logs = sys.argv[1:3]


def read(name):
    path = os.path.join(logs, name)
    return open(path).read() if os.path.exists(path) else f"({name}: not run)\n"


# Bytes of every stored tensor, from the safetensors headers (8-byte length, then JSON).
weight_bytes = 0
for f in glob.glob(os.path.join(model_dir, "*.safetensors")):
    with open(f, "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    weight_bytes += sum(e - s for k, (s, e) in ((k, v["data_offsets"]) for k, v in header.items() if k != "__metadata__"))
# Device-to-device copy bandwidth on this card, bytes read + written, median of 20 after warm-up.
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
times = []
for i in range(25):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); y.copy_(x); e.record(); torch.cuda.synchronize()
    if i >= 5:
        times.append(s.elapsed_time(e) / 1e3)
bw = 2 * x.numel() / sorted(times)[len(times) // 2]
floor_ms = weight_bytes / bw * 1e3
print(f"# GPU proof: {read('card.txt').strip()}\n")
print(f"Weights read per decode step: {weight_bytes / 1e9:.2f} GB (bf16, tied embedding read once as lm_head).")
print(f"Copy bandwidth measured here: {bw / 1e12:.2f} TB/s. Decode step floor: {floor_ms:.3f} ms "
      f"= {1e3 / floor_ms:.0f} tok/s at batch 1.\n")
print("| run | batch | output tok/s | median TPOT ms | floor / TPOT | vs batch 1 |")
print("| --- | --- | --- | --- | --- | --- |")
for run, files in (("bf16 safetensors", "bench-bf16-*.json"), ("bf16, CUDA graphs", "bench-graphs-bf16-*.json"),
                   ("bf16, CUDA graphs, cuBLAS at every batch", "bench-cublas-bf16-*.json"),
                   ("top-p 0.95, T 0.1, heads", "bench-sampled-t0.1-auto-*.json"),
                   ("top-p 0.95, T 0.1, whole rows", "bench-sampled-t0.1-host-*.json"),
                   ("top-p 0.95, T 1.0, heads", "bench-sampled-t1.0-auto-*.json"),
                   ("top-p 0.95, T 1.0, whole rows", "bench-sampled-t1.0-host-*.json"),
                   ("500-token shared prefix, prefix cache on", "bench-prefix-true-*.json"),
                   ("500-token shared prefix, prefix cache off", "bench-prefix-false-*.json"),
                   ("T 0.7, JSON objects", "bench-json-*.json"), ("T 0.7, free text", "bench-free-*.json"),
                   ("GGUF q4_1, quantized", "bench-q4-quantized-*.json"),
                   ("GGUF q4_1, dense bf16", "bench-q4-dense-*.json")):
    base = None
    for path in sorted(glob.glob(os.path.join(logs, files)), key=lambda p: int(p.rsplit("-", 1)[1][:-5])):
        s = json.load(open(path))
        c, tps, tpot = s["concurrency"], s["output_throughput"], s["tpot"]["p50_ms"]
        base = base or (tps if c == 1 else None)
        versus = f"{tps / base:.1f}x" if base else "-"
        print(f"| {run} | {c} | {tps:.0f} | {tpot:.3f} | {floor_ms / tpot:.0%} | {versus} |")
print("\nTargets: batch-1 decode >= 60% of the floor; batch 256 >= 25x batch 1.\n")
# The baseline build against the new one (`gpu-proof.sh baseline`), in turns on this machine.
pairs = sorted(glob.glob(os.path.join(logs, "ab-new-graphs-bf16-*-*.json")),
               key=lambda p: [int(x) for x in p[:-5].rsplit("-", 2)[1:]])
if pairs:
    print("Baseline build against this build, CUDA graphs, in turns:\n")
    print("| batch | round | baseline tok/s (TPOT ms) | this build tok/s (TPOT ms) | this / baseline | floor / TPOT |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in pairs:
        old_path = path.replace("ab-new-", "ab-baseline-")
        if not os.path.exists(old_path):
            continue
        new_s, old_s = json.load(open(path)), json.load(open(old_path))
        c, r = path[:-5].rsplit("-", 2)[1:]
        n_tpot, o_tpot = new_s["tpot"]["p50_ms"], old_s["tpot"]["p50_ms"]
        print(f"| {c} | {r} | {old_s['output_throughput']:.0f} ({o_tpot:.3f}) | "
              f"{new_s['output_throughput']:.0f} ({n_tpot:.3f}) | "
              f"{new_s['output_throughput'] / old_s['output_throughput']:.3f} | "
              f"{floor_ms / o_tpot:.1%} → {floor_ms / n_tpot:.1%} |")
    print()
for title, name in (("Steps", "steps.txt"), ("Kernel tests (step 1)", "kernels.log"),
                    ("Logits against transformers (step 2)", "compare.log"),
                    ("CUDA graphs against eager steps", "graphs-exact.log"), ("...all prompts at once", "graphs-together.log"),
                    ("Paged attention bandwidth (step 4)", "attention.log"),
                    ("Small-batch projections: GEMV against cuBLAS", "gemv.log"),
                    ("An eager decode step's kernels at batch 1 (ncu)", "profile-summary.log"), ("Server, CUDA graphs (step 5)", "serve-graphs.log"),
                    ("Server, eager (step 5)", "serve.log"),
                    ("GGUF quantized against dense (step 6)", "gguf-compare.log")):
    text = read(name)
    if name == "kernels.log":
        text = "\n".join(l for l in text.splitlines() if "test " in l or "result" in l or "panicked" in l) + "\n"
    print(f"{title}:\n\n```\n{text[-4000:]}```\n")
