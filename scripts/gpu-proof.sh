#!/usr/bin/env bash
# The GPU proof of the CUDA path (benches/GPU.md).
#
#   scripts/gpu-proof.sh prepare   # here, on the build machine: builds and bundles into gpu-carry/
#   scripts/gpu-proof.sh run       # there, on the GPU machine (repo root, gpu-carry/ carried)
#   scripts/gpu-proof.sh baseline  # here, before a `prepare` of changed code: keeps the bench binaries
#                                  # of the current bundle, which `run` then times beside the new ones
#
# `run` expects python3 with torch, transformers and the NVIDIA CUDA 13 wheels (the GPU machine's
# image has them), and no network. It writes logs and RESULTS.md under $OUT (or /tmp/gpu-proof/out).
# GPU_PROOF_BUDGET caps the run's seconds (default 540); GPU_PROOF_STEPS, an extended regex, runs only
# the steps whose names match it (e.g. '^(model|ours|ours-graphs|graphs-exact|bench-(graphs-)?bf16-1)$').
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=gpu-carry
MODEL_GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf

prepare() {
    grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >>.git/info/exclude
    local keep
    keep=$(mktemp -d)
    [[ -f $CARRY/baseline.tar.xz ]] && mv "$CARRY/baseline.tar.xz" "$keep/"
    rm -rf "$CARRY" && mkdir -p "$CARRY/bin"
    [[ -f $keep/baseline.tar.xz ]] && mv "$keep/baseline.tar.xz" "$CARRY/"
    rmdir "$keep" 2>/dev/null || rm -rf "$keep"
    [[ -f $MODEL_GGUF ]] || make model
    # The tokenizer for the random model: the default model's, as Hugging Face files (CPU build).
    cargo run --release -p sluice-bench --example hf_tokenizer -- "$MODEL_GGUF" "$CARRY/tokenizer"
    # ...and as GGUF fields, with the `gguf` package, to write the random model as a Q4_1 GGUF there.
    # numpy and gguf come from a venv of their own here (the GPU machine has numpy, and gets gguf
    # carried).
    local py="${XDG_CACHE_HOME:-$HOME/.cache}/sluice/proof-venv"
    if ! "$py/bin/python" -c 'import numpy, gguf' 2>/dev/null; then
        python3 -m venv "$py"
        "$py/bin/pip" install --quiet --disable-pip-version-check numpy==2.2.6 gguf==0.19.0
    fi
    "$py/bin/python" scripts/gguf-from-hf.py --tokenizer-only "$MODEL_GGUF" "$CARRY/tokenizer.gguf"
    mkdir -p "$CARRY/py" && cp -r "$("$py/bin/python" -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')" "$CARRY/py/"
    find "$CARRY/py" -name __pycache__ -prune -exec rm -rf {} +

    eval "$(scripts/cuda-toolkit.sh --link)"
    export CUDA_COMPUTE_CAP=90
    cargo build --release --features cuda -p sluice-bench -p sluice-kernels -p sluice-server \
        --bins --example greedy_logprobs --example paged_attention_bench --example gemv_bench
    # The kernel tests in the dev profile, so the CUDA bodies' debug-build value checks run too.
    local tests
    tests=$(cargo test -p sluice-kernels --features cuda --lib --no-run --message-format=json |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
    cp target/release/sluice-bench target/release/sluice "$CARRY/bin/"
    cp target/release/examples/{greedy_logprobs,paged_attention_bench,gemv_bench} "$CARRY/bin/"
    cp "$tests" "$CARRY/bin/kernels-tests"
    strip "$CARRY"/bin/*
    # The carry limit is 64 MiB: each binary is ~70 MB stripped (candle's PTX and kernels), ~9 MB in xz.
    tar -C "$CARRY" -cf - bin | xz -T0 -6 >"$CARRY/bin.tar.xz"
    rm -rf "$CARRY/bin"
    du -sh "$CARRY"
    echo "now: run with carry [\"$CARRY\"] and command 'scripts/gpu-proof.sh run' (see benches/GPU.md)"
}

# The bench binaries of the bundle now in gpu-carry/ (built from the code before a change), as
# gpu-carry/baseline.tar.xz: `run` times them beside the new build on the same machine, so that a
# change is measured as a ratio within one run (about 10 MB of the 64 MiB carry).
baseline() {
    local tmp
    tmp=$(mktemp -d)
    tar -C "$tmp" -xJf "$CARRY/bin.tar.xz" bin/sluice-bench
    tar -C "$tmp" -cf - bin | xz -T0 -6 >"$CARRY/baseline.tar.xz"
    rm -rf "$tmp"
    du -sh "$CARRY/baseline.tar.xz"
}

# step NAME LIMIT CMD...: runs CMD for at most LIMIT seconds (fewer when the run's budget is nearly
# spent), its output in $LOGS/NAME.log; a failing step is recorded and the next one still runs.
step() {
    local name=$1 limit=$2 rc=0 t0=$SECONDS left
    shift 2
    if [[ -n ${GPU_PROOF_STEPS:-} && ! $name =~ $GPU_PROOF_STEPS ]]; then
        return 0
    fi
    left=$((BUDGET - SECONDS))
    if ((left < 15)); then
        echo "$name: skipped, the run's ${BUDGET}s budget is spent" | tee -a "$LOGS/steps.txt"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit}s)"
    timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    tail -n 12 "$LOGS/$name.log" | cut -c1-300
    echo "$name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOGS/steps.txt"
}

run() {
    set +e # every step runs, whatever the one before it did
    local out="${OUT:-/tmp/gpu-proof/out}" work=/tmp/gpu-proof
    LOGS=$work/logs
    BUDGET=${GPU_PROOF_BUDGET:-540}
    SECONDS=0
    rm -rf "$LOGS" && mkdir -p "$out" "$LOGS" "$work/bin"
    tar -C "$work" -xJf "$CARRY/bin.tar.xz"
    local bin="$work/bin" model="$work/llama-1b" gguf="$work/llama-1b-q4_1.gguf"
    # The CUDA 13 libraries of the Python environment's NVIDIA wheels (cuBLAS, cuRAND, NVRTC, cudart).
    local libs
    libs=$(python3 -c 'import glob, os, nvidia
dirs = {os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/*/lib/lib*.so*")}
dirs |= {os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/*/*/lib/lib*.so*")}
print(":".join(sorted(dirs)))') || libs=""
    LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # The driver's libcuda.so.1 is normally on the loader's path; some images mount it here.
    [[ -d /usr/local/nvidia/lib64 ]] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/usr/local/nvidia/lib64"
    export LD_LIBRARY_PATH PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/$CARRY/py${PYTHONPATH:+:$PYTHONPATH}"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
        for b in "$bin"/*; do ldd "$b" | grep "not found" | sed "s|^|$(basename "$b"): |"; done
    } 2>&1 | tee "$LOGS/card.txt" || true

    step kernels 90 "$bin/kernels-tests" cuda --test-threads 1
    # Small-batch projections: the GEMV kernel against cuBLAS on the 1B model's shapes.
    step gemv 60 "$bin/gemv_bench" cuda
    # The model is made once per machine: a later call on the same warm machine keeps it.
    if [[ -f $model/config.json && -f $work/prompts.jsonl ]]; then
        echo "model: kept from an earlier call on this machine" | tee -a "$LOGS/steps.txt"
    else
        step model 120 python3 scripts/gpu_proof/make_model.py "$model" "$CARRY/tokenizer" "$work/prompts.jsonl"
    fi
    step ours 90 sh -c "\"$bin/greedy_logprobs\" $model cuda bf16 32 <$work/prompts.jsonl >$LOGS/ours.jsonl"
    step compare 90 python3 scripts/gpu_proof/compare.py "$model" "$work/prompts.jsonl" "$LOGS/ours.jsonl"
    # Decode steps replayed as CUDA graphs (the default of `sluice serve` and `sluice-bench` on CUDA;
    # `greedy_logprobs` takes them with `--cuda-graphs`). One prompt at a time a replay runs the eager step's
    # kernels on the same inputs: the same bits. All prompts at once, a step is padded to its bucket,
    # and cuBLAS may take other kernels for another row count: bf16 noise, no more.
    local g="$bin/greedy_logprobs $model cuda bf16 32"
    step ours-graphs 90 sh -c "$g --cuda-graphs <$work/prompts.jsonl >$LOGS/ours-graphs.jsonl"
    step graphs-exact 30 python3 scripts/gpu_proof/same_weights.py "$LOGS/ours.jsonl" "$LOGS/ours-graphs.jsonl" \
        "graphs vs eager, one at a time" 0
    step ours-together 90 sh -c "$g --together <$work/prompts.jsonl >$LOGS/ours-together.jsonl"
    step ours-graphs-together 90 sh -c "$g --cuda-graphs --together <$work/prompts.jsonl >$LOGS/ours-graphs-together.jsonl"
    step graphs-together 30 python3 scripts/gpu_proof/same_weights.py "$LOGS/ours-together.jsonl" \
        "$LOGS/ours-graphs-together.jsonl" "graphs vs eager, all at once" 0.25
    # Eager steps and graphs (the default) side by side at each batch size.
    local c
    for c in 1 64 256; do
        step "bench-bf16-$c" 90 "$bin/sluice-bench" engine --model "$model" --device cuda --dtype bf16 \
            --concurrency "$c" --num-requests $((c == 1 ? 8 : 2 * c)) --max-tokens 128 --max-num-seqs 256 \
            --kv-cache-mib 16384 --cuda-graphs false --json "$LOGS/bench-bf16-$c.json"
        step "bench-graphs-bf16-$c" 90 "$bin/sluice-bench" engine --model "$model" --device cuda --dtype bf16 \
            --concurrency "$c" --num-requests $((c == 1 ? 8 : 2 * c)) --max-tokens 128 --max-num-seqs 256 \
            --kv-cache-mib 16384 --cuda-graphs --json "$LOGS/bench-graphs-bf16-$c.json"
    done
    # Graphs with cuBLAS at every batch (--gemv false) against the default (the GEMV kernel up to 8
    # rows), at batch 1 and 4.
    for c in 1 4; do
        ((c == 4)) && step "bench-graphs-bf16-$c" 60 "$bin/sluice-bench" engine --model "$model" --device cuda \
            --dtype bf16 --concurrency "$c" --num-requests $((2 * c)) --max-tokens 128 --max-num-seqs 256 \
            --kv-cache-mib 16384 --json "$LOGS/bench-graphs-bf16-$c.json"
        step "bench-cublas-bf16-$c" 60 "$bin/sluice-bench" engine --model "$model" --device cuda --dtype bf16 \
            --concurrency "$c" --num-requests $((c == 1 ? 8 : 2 * c)) --max-tokens 128 --max-num-seqs 256 \
            --kv-cache-mib 16384 --gemv false --json "$LOGS/bench-cublas-bf16-$c.json"
    done
    # The baseline build (`baseline` above), if carried, beside the new one: batch 1 and 256 with
    # graphs, twice each in turns.
    if [[ -f $CARRY/baseline.tar.xz ]]; then
        mkdir -p "$work/baseline" && tar -C "$work/baseline" -xJf "$CARRY/baseline.tar.xz"
        local round b
        for round in 1 2; do
            for c in 1 256; do
                for b in baseline new; do
                    local exe="$bin/sluice-bench"
                    [[ $b == baseline ]] && exe="$work/baseline/bin/sluice-bench"
                    step "ab-$b-graphs-bf16-$c-$round" 60 "$exe" engine --model "$model" --device cuda --dtype bf16 \
                        --concurrency "$c" --num-requests $((c == 1 ? 8 : 2 * c)) --max-tokens 128 \
                        --max-num-seqs 256 --kv-cache-mib 16384 --cuda-graphs --json "$LOGS/ab-$b-graphs-bf16-$c-$round.json"
                done
            done
        done
    fi
    # Where an eager decode step's GPU time goes, kernel by kernel (Nsight Compute's durations for
    # a window of ~3 steps of one greedy request; needs ncu, which the Firecracker image has).
    local ncu
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1 || true)
    if [[ -n $ncu ]]; then
        step profile 150 "$ncu" --clock-control none --csv --metrics gpu__time_duration.sum \
            --launch-skip 4000 --launch-count 480 "$bin/sluice-bench" engine --model "$model" --device cuda \
            --dtype bf16 --concurrency 1 --num-requests 1 --max-tokens 256 --kv-cache-mib 4096 --cuda-graphs false
        step profile-summary 20 python3 scripts/gpu_proof/kernel_profile.py "$LOGS/profile.log"
    fi
    # The server (prefix cache and structured outputs included), with graphs and without.
    step serve-graphs 80 python3 scripts/gpu_proof/serve_check.py "$bin/sluice" "$model" --dtype bf16
    cp "$work/serve.log" "$LOGS/serve-graphs-server.log" 2>/dev/null || true
    step serve 80 python3 scripts/gpu_proof/serve_check.py "$bin/sluice" "$model" --dtype bf16 --cuda-graphs false
    cp "$work/serve.log" "$LOGS/serve-server.log" 2>/dev/null || true
    # Sampled requests (top-p 0.95), rows read as heads from the device against whole rows. The random
    # model's raw logits are flat (std ~0.9): at temperature 0.1 its distributions are as peaked as
    # a trained model's and heads settle almost every draw; at 1.0 they are flat, most rows are
    # fetched whole, and this measures what that costs.
    local t ds
    for t in 0.1 1.0; do
        for ds in auto host; do
            step "bench-sampled-t$t-$ds-64" 60 "$bin/sluice-bench" engine --model "$model" --device cuda --dtype bf16 \
                --concurrency 64 --num-requests 128 --max-tokens 128 --max-num-seqs 256 --kv-cache-mib 16384 \
                --temperature "$t" --top-p 0.95 --device-sampling "$ds" --json "$LOGS/bench-sampled-t$t-$ds-64.json"
        done
    done
    # Once more, to see the run-to-run spread of the two timings above.
    step bench-bf16-1-again 60 "$bin/sluice-bench" engine --model "$model" --device cuda --dtype bf16 \
        --concurrency 1 --num-requests 8 --max-tokens 128 --kv-cache-mib 16384 --cuda-graphs false
    step attention 45 "$bin/paged_attention_bench" cuda
    # Prefix caching on the GPU: every prompt starts with the same 500 tokens, cache on against off.
    local pc
    for pc in true false; do
        step "bench-prefix-$pc-64" 60 "$bin/sluice-bench" engine --model "$model" --device cuda --dtype bf16 \
            --concurrency 64 --num-requests 128 --max-tokens 128 --max-num-seqs 256 --kv-cache-mib 16384 \
            --shared-prefix-len 500 --prefix-caching "$pc" --json "$LOGS/bench-prefix-$pc-64.json"
    done
    # Structured outputs on the GPU: JSON objects (a grammar mask every step, rows copied whole) against
    # free text, both sampled at temperature 0.7 (JSON requests end when their object is complete).
    local js
    for js in json free; do
        step "bench-$js-64" 60 "$bin/sluice-bench" engine --model "$model" --device cuda --dtype bf16 \
            --concurrency 64 --num-requests 128 --max-tokens 128 --max-num-seqs 256 --kv-cache-mib 16384 \
            --temperature 0.7 $([[ $js == json ]] && echo --json-object) --json "$LOGS/bench-$js-64.json"
    done
    # The same random model as a Q4_1 GGUF: candle's quantized matmul on CUDA against the same
    # weights dequantized to bf16 (--gpu-weights dense), and the GPU against our CPU path.
    step gguf 80 python3 scripts/gguf-from-hf.py "$model" "$CARRY/tokenizer.gguf" "$gguf"
    head -n 4 "$work/prompts.jsonl" >"$work/prompts-short.jsonl"
    local w
    for w in quantized dense; do
        step "ours-q4-$w" 60 sh -c "\"$bin/greedy_logprobs\" $gguf cuda bf16 32 $w <$work/prompts-short.jsonl >$LOGS/q4-$w.jsonl"
    done
    step ours-q4-cpu 60 sh -c "\"$bin/greedy_logprobs\" $gguf cpu f32 32 <$work/prompts-short.jsonl >$LOGS/q4-cpu.jsonl"
    step gguf-compare 30 sh -c "python3 scripts/gpu_proof/same_weights.py $LOGS/q4-quantized.jsonl $LOGS/q4-dense.jsonl 'quantized vs dense (CUDA)'; python3 scripts/gpu_proof/same_weights.py $LOGS/q4-quantized.jsonl $LOGS/q4-cpu.jsonl 'CUDA quantized vs CPU'"
    for w in quantized dense; do
        for c in 1 64; do
            step "bench-q4-$w-$c" 45 "$bin/sluice-bench" engine --model "$gguf" --device cuda --dtype bf16 \
                --gpu-weights "$w" --concurrency "$c" --num-requests $((c == 1 ? 4 : c)) --max-tokens 128 \
                --kv-cache-mib 8192 --json "$LOGS/bench-q4-$w-$c.json"
        done
    done
    # Asking for a GPU that is not there fails clearly, with exit code 1 (the server, and the engine).
    step startup-missing-gpu 40 "$bin/sluice" serve --model "$model" --device cuda:7 --port 8124
    step startup-missing-gpu-engine 40 sh -c "echo '[1]' | RUST_BACKTRACE=0 \"$bin/greedy_logprobs\" $model cuda:7 bf16 1"

    python3 scripts/gpu_proof/report.py "$model" "$LOGS" >"$LOGS/RESULTS.md" 2>"$LOGS/report.err" ||
        echo "report failed: $(tail -n 3 "$LOGS/report.err")"
    cp "$LOGS/RESULTS.md" "$LOGS/steps.txt" "$out/" 2>/dev/null || true
    tar -C "$work" -czf "$out/logs.tar.gz" logs
    echo "==== steps"
    cat "$LOGS/steps.txt"
    echo "==== RESULTS.md (head)"
    head -c 5000 "$LOGS/RESULTS.md" 2>/dev/null || true
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    baseline) baseline ;;
    *) echo "usage: $0 prepare|run|baseline" >&2; exit 2 ;;
esac
