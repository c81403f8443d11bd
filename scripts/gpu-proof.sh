#!/usr/bin/env bash
# The GPU proof of issue 6 (benches/GPU.md). NOT YET RUN ON A GPU: written and dry-checked without one.
#
#   scripts/gpu-proof.sh prepare   # here, on the build machine: builds and bundles into gpu-carry/
#   scripts/gpu-proof.sh run       # there, on the GPU machine (repo root, gpu-carry/ carried)
#
# `run` expects python3 with torch, transformers and the NVIDIA CUDA 13 wheels (the GPU machine's
# image has them), and no network. It writes logs and RESULTS.md under $OUT (or /tmp/gpu-proof/out).
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=gpu-carry
MODEL_GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf

prepare() {
    grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >>.git/info/exclude
    rm -rf "$CARRY" && mkdir -p "$CARRY/bin"
    [[ -f $MODEL_GGUF ]] || make model
    # The tokenizer for the random model: the default model's, as Hugging Face files (CPU build).
    cargo run --release -p sluice-bench --example hf_tokenizer -- "$MODEL_GGUF" "$CARRY/tokenizer"

    eval "$(scripts/cuda-toolkit.sh --link)"
    export CUDA_COMPUTE_CAP=90
    cargo build --release --features cuda -p sluice-bench -p sluice-kernels \
        --bins --example greedy_logprobs --example paged_attention_bench
    # The kernel tests in the dev profile, so the CUDA bodies' debug-build value checks run too.
    local tests
    tests=$(cargo test -p sluice-kernels --features cuda --lib --no-run --message-format=json |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
    cp target/release/sluice-bench "$CARRY/bin/"
    cp target/release/examples/greedy_logprobs target/release/examples/paged_attention_bench "$CARRY/bin/"
    cp "$tests" "$CARRY/bin/kernels-tests"
    strip "$CARRY"/bin/*
    # The carry limit is 64 MiB: each binary is ~70 MB stripped (candle's PTX and kernels), ~9 MB in xz.
    tar -C "$CARRY" -cf - bin | xz -T0 -6 >"$CARRY/bin.tar.xz"
    rm -rf "$CARRY/bin"
    du -sh "$CARRY"
    echo "now: run with carry [\"$CARRY\"] and command 'scripts/gpu-proof.sh run' (see benches/GPU.md)"
}

run() {
    local out="${OUT:-/tmp/gpu-proof/out}" work=/tmp/gpu-proof
    mkdir -p "$out" "$work/bin"
    tar -C "$work" -xJf "$CARRY/bin.tar.xz"
    local bin="$work/bin"
    # The CUDA 13 libraries of the Python environment's NVIDIA wheels (cuBLAS, cuRAND, NVRTC, cudart).
    local libs
    libs=$(python3 -c 'import glob, os, nvidia
dirs = {os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/*/lib/lib*.so*")}
print(":".join(sorted(dirs)))')
    LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # The driver's libcuda.so.1 is normally on the loader's path; some images mount it here.
    [[ -d /usr/local/nvidia/lib64 ]] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/usr/local/nvidia/lib64"
    export LD_LIBRARY_PATH
    for b in "$bin"/*; do
        if ldd "$b" | grep "not found"; then
            echo "gpu-proof: $b is missing the libraries above (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" >&2
            exit 1
        fi
    done
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"

    echo "== 1. kernel tests: CUDA against the CPU reference"
    timeout 300 "$bin/kernels-tests" cuda --test-threads 1 2>&1 | tee "$out/1-kernel-tests.log"
    echo "== 2. a random 1B Llama (bf16): our logits and greedy tokens against transformers'"
    local model="$work/llama-1b"
    python3 - "$model" "$CARRY/tokenizer" "$work/prompts.jsonl" <<'PY'
import json, os, random, shutil, sys
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

model_dir, tok_dir, prompts_path = sys.argv[1:4]
tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
# Llama-3.2-1B's shape (no rope scaling) with the SmolLM2 vocabulary.
config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                     tie_word_embeddings=True)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(model_dir, safe_serialization=True)
# The keys our loader reads, at top level whatever this transformers version writes.
path = os.path.join(model_dir, "config.json")
cfg = json.load(open(path))
cfg.update(rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096, head_dim=64,
           tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
cfg.pop("rope_scaling", None)
json.dump(cfg, open(path, "w"), indent=1)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tok_dir, f), model_dir)
# Text prompts, and random ids long enough to span many KV blocks and a chunked prefill (> 512).
rng = random.Random(0)
texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
prompts = [tok.encode(t).ids for t in texts]
prompts += [[rng.randrange(config.vocab_size) for _ in range(n)] for n in (37, 300, 700)]
with open(prompts_path, "w") as f:
    for p in prompts:
        f.write(json.dumps(p) + "\n")
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters in {model_dir}")
PY
    echo "== (start-up) asking for a GPU that is not there fails clearly, non-zero"
    local rc=0
    echo "[1]" | timeout 120 "$bin/greedy_logprobs" "$model" cuda:7 bf16 1 >"$out/startup.log" 2>&1 || rc=$?
    echo "exit code $rc (want 1): $(tail -n 2 "$out/startup.log")"
    timeout 300 "$bin/greedy_logprobs" "$model" cuda bf16 32 <"$work/prompts.jsonl" >"$out/2-ours.jsonl"
    python3 - "$model" "$work/prompts.jsonl" "$out/2-ours.jsonl" <<'PY' | tee "$out/2-compare.txt"
import json, sys
import torch
from transformers import AutoModelForCausalLM

model_dir, prompts_path, ours_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
prompts = [json.loads(l) for l in open(prompts_path)]
ours = [json.loads(l) for l in open(ours_path)]
TIE = 0.05  # nats: a greedy mismatch is acceptable only where the reference's top two are this close
worst, total, n, failures = 0.0, 0.0, 0, []
for k, (prompt, mine) in enumerate(zip(prompts, ours)):
    # Teacher-forced on our tokens, so every position compares the same prefix.
    seq = torch.tensor([prompt + mine["tokens"]], device="cuda")
    with torch.no_grad():
        lp = torch.log_softmax(model(seq).logits[0].float(), -1)
    for i, tok in enumerate(mine["tokens"]):
        ref = lp[len(prompt) - 1 + i]
        for tid, l in mine["top"][i]:
            d = abs(ref[tid].item() - l)
            worst, total, n = max(worst, d), total + d, n + 1
        best = int(ref.argmax())
        if tok != best and ref[best].item() - ref[tok].item() > TIE:
            failures.append(f"prompt {k} step {i}: we chose {tok}, transformers {best}")
    with torch.no_grad():
        free = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=len(mine["tokens"]),
                              do_sample=False, min_new_tokens=len(mine["tokens"]))[0, len(prompt):].tolist()
    same = next((i for i, (a, b) in enumerate(zip(free, mine["tokens"])) if a != b), len(free))
    print(f"prompt {k} ({len(prompt)} tokens): greedy tokens agree for {same}/{len(free)}")
print(f"top-5 logprobs vs transformers: max |diff| {worst:.4f}, mean {total / max(n, 1):.4f} nats over {n}")
ok = not failures and worst < 0.25
for f in failures:
    print("MISMATCH", f)
print("logits check:", "PASS" if ok else "FAIL")
PY

    echo "== 3. engine throughput at batch 1, 64, 256"
    for c in 1 64 256; do
        local reqs=$((c == 1 ? 8 : 2 * c))
        timeout 300 "$bin/sluice-bench" engine --model "$model" --device cuda --dtype bf16 --concurrency "$c" \
            --num-requests "$reqs" --max-tokens 128 --max-num-seqs 256 --kv-cache-mib 16384 \
            --json "$out/3-bench-$c.json" | tee "$out/3-bench-$c.txt"
    done

    echo "== 4. paged attention bandwidth against a device copy"
    timeout 300 "$bin/paged_attention_bench" cuda | tee "$out/4-kernels.txt"

    python3 - "$model" "$out" <<'PY' | tee "$out/RESULTS.md"
import json, os, struct, sys
import torch

model_dir, out = sys.argv[1:3]
# Bytes of every stored tensor, from the safetensors headers (8-byte length, then JSON).
weight_bytes = 0
for f in os.listdir(model_dir):
    if f.endswith(".safetensors"):
        with open(os.path.join(model_dir, f), "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
        weight_bytes += sum(end - start for start, end in spans)
# Device-to-device copy bandwidth on this card, bytes read + written, median of 20 after warm-up.
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
times = []
for i in range(25):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); y.copy_(x); e.record(); torch.cuda.synchronize()
    if i >= 5:
        times.append(s.elapsed_time(e) / 1e3)
bw = 2 * x.numel() / sorted(times)[len(times) // 2]
floor_ms = weight_bytes / bw * 1e3
print(f"# GPU proof: {open(os.path.join(out, 'card.txt')).read().strip()}\n")
print(f"Weights read per decode step: {weight_bytes / 1e9:.2f} GB (bf16, tied embedding read once as lm_head).")
print(f"Copy bandwidth measured here: {bw / 1e12:.2f} TB/s. Decode step floor: {floor_ms:.3f} ms "
      f"= {1e3 / floor_ms:.0f} tok/s at batch 1.\n")
print("| batch | output tok/s | median TPOT ms | 1/TPOT vs floor | vs batch 1 |")
print("| --- | --- | --- | --- | --- |")
base = None
for c in (1, 64, 256):
    s = json.load(open(os.path.join(out, f"3-bench-{c}.json")))
    tps, tpot = s["output_throughput"], s["tpot"]["p50_ms"]
    base = base or tps
    print(f"| {c} | {tps:.0f} | {tpot:.3f} | {floor_ms / tpot:.0%} | {tps / base:.1f}x |")
print("\nTargets: batch-1 decode >= 60% of the floor; batch 256 >= 25x batch 1.\n")
print("Paged attention (step 4):\n\n```\n" + open(os.path.join(out, "4-kernels.txt")).read() + "```")
print("\nLogits (step 2):\n\n```\n" + open(os.path.join(out, "2-compare.txt")).read() + "```")
PY
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
