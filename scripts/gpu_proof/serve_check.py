"""Step 5 of the GPU proof: the server on the GPU, as a client sees it. Starts `sluice serve` on CUDA
with the KV pool sized from free GPU memory (--gpu-memory-utilization's default), then: the start-up
log's KV line, GPU memory in use while serving, a chat completion, a streamed one, 32 at once, the
metrics, and a graceful SIGTERM.

    python3 serve_check.py SLUICE_BIN MODEL [extra serve args...]
"""
import concurrent.futures
import json
import signal
import subprocess
import sys
import time
import urllib.request

bin_, model, *extra = sys.argv[1:]
PORT = 8123
BASE = f"http://127.0.0.1:{PORT}"
log = open("/tmp/gpu-proof/serve.log", "w")
server = subprocess.Popen([bin_, "serve", "--model", model, "--device", "cuda", "--port", str(PORT), *extra],
                          stdout=log, stderr=subprocess.STDOUT)
failures = []


def get(path):
    with urllib.request.urlopen(BASE + path, timeout=30) as r:
        return r.status, r.read().decode()


def post(body, stream=False):
    req = urllib.request.Request(BASE + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, r.read().decode()


try:
    t0 = time.time()
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode} during start-up")
        try:
            if get("/health")[0] == 200:
                break
        except OSError:
            pass
        if time.time() - t0 > 120:
            raise SystemExit("server not ready after 120 s")
        time.sleep(0.5)
    print(f"ready after {time.time() - t0:.1f} s")
    used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()
    print(f"GPU memory while serving (used, total): {used}")
    msg = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24,
           "temperature": 0}
    status, body = post(msg)
    reply = json.loads(body)
    print("chat:", status, json.dumps(reply["choices"][0])[:300], reply["usage"])
    if reply["choices"][0]["finish_reason"] != "length" or reply["usage"]["completion_tokens"] != 24:
        failures.append("chat: expected 24 tokens and finish_reason length (random weights rarely stop)")
    status, body = post({**msg, "stream": True})
    chunks = [l[6:] for l in body.splitlines() if l.startswith("data: ")]
    print(f"stream: {status}, {len(chunks)} events, last {chunks[-1] if chunks else None}")
    if not chunks or chunks[-1] != "[DONE]":
        failures.append("stream: no [DONE]")
    text = "".join(json.loads(c)["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]
                   if json.loads(c).get("choices"))
    if text != reply["choices"][0]["message"]["content"]:
        failures.append("stream: streamed text differs from the non-streamed greedy reply")
    bodies = [{"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 64, "temperature": 0.7,
               "seed": i} for i in range(32)]
    t1 = time.time()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        replies = [json.loads(b) for _, b in pool.map(post, bodies)]
    toks = sum(r["usage"]["completion_tokens"] for r in replies)
    print(f"32 concurrent sampled requests: {toks} tokens in {time.time() - t1:.2f} s")
    if any(r["choices"][0]["finish_reason"] not in ("length", "stop") for r in replies):
        failures.append("concurrent: a request ended without a finish reason")
    metrics = get("/metrics")[1]
    print("\n".join(l for l in metrics.splitlines() if l.startswith(("sluice_kv_cache_usage", "sluice_batch_size_count",
                                                                         "sluice_generation_tokens_total",
                                                                         "sluice_request_success_total",
                                                                         "sluice_sampled_tokens_total",
                                                                         "sluice_cuda_graph_replays_total")))[:1500])
    if "--cuda-graphs" in extra and "sluice_cuda_graph_replays_total" not in metrics:
        failures.append("--cuda-graphs: no decode step was replayed from a graph")
finally:
    server.send_signal(signal.SIGTERM)
    try:
        rc = server.wait(timeout=40)
    except subprocess.TimeoutExpired:
        server.kill()
        rc = "killed after 40 s"
    log.close()
    lines = open("/tmp/gpu-proof/serve.log").read().splitlines()
    print("server log (KV, device, errors):")
    print("\n".join(l for l in lines if any(w in l for w in ("KV cache", "device", "ERROR", "WARN", "panic")))[:3000])
    print(f"server exit after SIGTERM: {rc}")
    if rc != 0:
        failures.append(f"server exit {rc}")
for f in failures:
    print("FAIL", f)
print("serve check:", "PASS" if not failures else "FAIL")
sys.exit(1 if failures else 0)
