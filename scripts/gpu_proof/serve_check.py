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
                                 # the engine answers every request (not the response cache)
                                 {"Content-Type": "application/json", "Cache-Control": "no-cache"})
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
    # Prefix caching: the same long prompt twice, greedy; the second finds the first's blocks cached.
    long_msg = {"messages": [{"role": "system", "content": " ".join(f"Rule {i}: answer briefly." for i in range(60))},
                             {"role": "user", "content": "Name a colour."}],
                "max_tokens": 16, "temperature": 0, "logprobs": True}
    cold = json.loads(post(long_msg)[1])
    warm = json.loads(post(long_msg)[1])
    cached = (warm["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    lp = [[t["logprob"] for t in r["choices"][0]["logprobs"]["content"]] for r in (cold, warm)]
    ids = [[t["token"] for t in r["choices"][0]["logprobs"]["content"]] for r in (cold, warm)]
    same = next((i for i, (a, b) in enumerate(zip(*ids)) if a != b), len(ids[0]))
    diff = max((abs(a - b) for a, b in zip(lp[0][:same], lp[1][:same])), default=0.0)
    print(f"prefix cache: prompt {warm['usage']['prompt_tokens']} tokens, {cached} cached on the repeat; "
          f"same tokens for {same} of {len(ids[0])}, max |logprob difference| before that {diff:.4f}")
    if cached <= 0:
        failures.append("prefix cache: the repeated prompt found nothing cached")
    if diff > 0.25:
        failures.append("prefix cache: cached and cold logprobs differ by more than bf16 noise")
    # Structured outputs on the GPU: a JSON schema (greedy and sampled) and a choice.
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "n"], "additionalProperties": False}
    for temp in (0, 1.0):
        r = json.loads(post({**msg, "max_tokens": 40, "temperature": temp, "seed": 3, "response_format":
                             {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})[1])
        content = r["choices"][0]["message"]["content"]
        print(f"json_schema (temperature {temp}): {content!r}, finish {r['choices'][0]['finish_reason']}")
        try:
            value = json.loads(content)
            ok = set(value) == {"answer", "n"} and value["answer"] in ("yes", "no") and value["n"] in range(10)
        except ValueError:
            ok = False
        if not ok or r["choices"][0]["finish_reason"] != "stop":
            failures.append(f"json_schema at temperature {temp}: not a complete value of the schema")
    r = json.loads(post({**msg, "temperature": 1.0, "seed": 5,
                         "structured_outputs": {"choice": ["red", "green", "blue"]}})[1])
    print(f"choice: {r['choices'][0]['message']['content']!r}")
    if r["choices"][0]["message"]["content"] not in ("red", "green", "blue"):
        failures.append("choice: the answer is not one of the choices")
    metrics = get("/metrics")[1]
    print("\n".join(l for l in metrics.splitlines() if l.startswith(("sluice_kv_cache_usage", "sluice_batch_size_count",
                                                                         "sluice_generation_tokens_total",
                                                                         "sluice_request_success_total",
                                                                         "sluice_sampled_tokens_total",
                                                                         "sluice_cuda_graph_replays_total",
                                                                         "sluice_prefix_cache")))[:1800])
    # Graphs are on by default on CUDA; `--cuda-graphs false` turns them off.
    flag = extra.index("--cuda-graphs") if "--cuda-graphs" in extra else None
    graphs = flag is None or extra[flag + 1:flag + 2] != ["false"]
    replays = [float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("sluice_cuda_graph_replays_total")]
    if graphs and not any(replays):
        failures.append("CUDA graphs on: no decode step was replayed from a graph")
    if not graphs and any(replays):
        failures.append("--cuda-graphs false: decode steps were replayed from graphs")
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
