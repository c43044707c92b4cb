"""Prefill/decode disaggregation on two GPUs of one node (run on nvidia-h200-x2).

Starts an aggregated engine on GPU 0 as the reference, then a prefill engine on GPU 0
and a decode engine on GPU 1 (separate processes; KV over CUDA IPC, then over TCP with
4 connections and with 1), and
reports: whether greedy outputs through prefill -> decode equal the aggregated ones (with
the descriptor sent after the first token, "late", and before it, "early"), the KV import
bandwidth decode logged for a late 16K-token import (from admission to the engine seeing it
done, and the copy alone as the device timed it) against a peer copy of the same bytes
measured here with torch, and the TTFT disaggregation adds at several prompt lengths
(client-side, over kept-alive HTTP connections, as a router holds them). TCP pulls are
set against loopback TCP measured here (threads moving the same bytes through sockets,
1 and 4 connections: what the kernel allows before any KV work). The early flow
is driven here the way the router drives it: prefill's first line (the descriptor) goes to
decode at once, and prefill's second line is read after decode's first chunk.

Beside each transport it measures what a late 16K-token import costs the requests
already decoding on decode: the inter-token gaps of a stream running there while the
import lands, against its median gap. With BEFORE_BIN (an older build) the TCP flow is
run a second time with decode from that build, for a comparison inside one run.

usage: pd_bench.py MODEL_DIR DLENGINE_BIN OUT_JSON [BEFORE_BIN]
"""

import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

MODEL, BIN, OUT = sys.argv[1:4]
BEFORE_BIN = sys.argv[4] if len(sys.argv) > 4 else None
LOG_DIR = os.path.dirname(OUT)
LENGTHS = [1024, 4096, 16384]
REPEATS = 5


CONNECTIONS = {}


class HTTPError(Exception):
    pass


def post(port, body):
    """POSTs to /v1/completions over a kept-alive connection (as a router holds them)."""
    conn = CONNECTIONS.setdefault(port, http.client.HTTPConnection("127.0.0.1", port, timeout=300))
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise HTTPError(f"HTTP {r.status}: {r.read().decode()}")
    return r


def post_json(port, body):
    r = post(port, body)
    return json.loads(r.read())


def first_chunk_seconds(port, body):
    """Seconds until the first SSE data line of a streamed request."""
    start = time.perf_counter()
    r = post(port, dict(body, stream=True))
    while line := r.readline():
        if line.startswith(b"data: {"):
            elapsed = time.perf_counter() - start
            r.read()
            return elapsed
    raise RuntimeError("no data chunk")


def start(name, port, extra, binary=BIN):
    log = open(os.path.join(LOG_DIR, f"pd-{name}.log"), "w")
    argv = [binary, "serve", MODEL, "--device", "cuda", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", "m", "--max-model-len", "20000", "--max-num-batched-tokens", "16384",
            "--gpu-memory-utilization", "0.8", *extra]
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return p
        except Exception:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited; see pd-{name}.log")
            time.sleep(1)
    raise RuntimeError(f"{name} did not become healthy")


def prompt(n, salt):
    return [(i * 7919 + salt * 104729) % 150000 + 100 for i in range(n)]


SALTS = iter(range(1000, 10**9))


def fresh_prompt(n):
    """A prompt no engine has seen (nor a prefix of it): a timed request that hit a
    prefix cache (prefill's, or since imports register their blocks, decode's) would
    measure the cache, not the prefill or the transfer."""
    return prompt(n, next(SALTS))


def greedy(p, max_tokens):
    return {"model": "m", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


LATE = {"do_remote_decode": True}
EARLY = {"do_remote_decode": True, "early_descriptor": True}


def early_descriptor(pp, body):
    """Sends an early prefill order; returns its descriptor and the response whose second
    line is still to come."""
    r = post(pp, dict(body, kv_transfer_params=EARLY))
    return json.loads(r.readline())["kv_transfer_params"], r


def pd_generate(pp, dp, body, early):
    if not early:
        pre = post_json(pp, dict(body, kv_transfer_params=LATE))
        return post_json(dp, dict(body, kv_transfer_params=pre["kv_transfer_params"]))
    descriptor, rest = early_descriptor(pp, body)
    out = post_json(dp, dict(body, kv_transfer_params=descriptor))
    rest.read()
    return out


def pd_ttft(pp, dp, body, early):
    start = time.perf_counter()
    if not early:
        pre = post_json(pp, dict(body, kv_transfer_params=LATE))
        return time.perf_counter() - start + first_chunk_seconds(dp, dict(body, kv_transfer_params=pre["kv_transfer_params"]))
    descriptor, rest = early_descriptor(pp, body)
    elapsed = time.perf_counter() - start + first_chunk_seconds(dp, dict(body, kv_transfer_params=descriptor))
    rest.read()
    return elapsed


def decode_gaps_during_import(pp, dp):
    """Inter-token gaps of a stream decoding on decode while a late 16K-token import lands
    beside it: the largest during the import, the largest before it, the median, and the
    sum of the excess over the median during the import (time the import took from it)."""
    times = []

    def stream():
        conn = http.client.HTTPConnection("127.0.0.1", dp, timeout=300)
        body = dict(greedy(fresh_prompt(16), 3000), stream=True)
        conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        r = conn.getresponse()
        while line := r.readline():
            if line.startswith(b"data: {"):
                times.append(time.perf_counter())
            if len(times) and done.is_set():
                break
        conn.close()

    done = threading.Event()
    t = threading.Thread(target=stream)
    t.start()
    while len(times) < 100:
        time.sleep(0.01)
    body = greedy(fresh_prompt(LENGTHS[-1]), 2)
    pre = post_json(pp, dict(body, kv_transfer_params=LATE))
    begin = time.perf_counter()  # prefill is done: what follows is decode's import
    post_json(dp, dict(body, kv_transfer_params=pre["kv_transfer_params"]))
    end = time.perf_counter()
    time.sleep(0.1)
    done.set()
    t.join()
    gaps = [(b - a, b) for a, b in zip(times, times[1:])]
    median = statistics.median(g for g, _ in gaps)
    during = [g for g, at in gaps if begin <= at <= end]
    before = [g for g, at in gaps if at < begin]
    return {"median_gap_ms": 1e3 * median, "max_gap_before_ms": 1e3 * max(before), "max_gap_during_import_ms": 1e3 * max(during, default=0),
            "import_ms": 1e3 * (end - begin), "excess_during_import_ms": 1e3 * sum(max(0, g - median) for g in during)}


def median_of(f):
    f()  # warm-up
    return statistics.median(f() for _ in range(REPEATS))


def peer_copy_ceiling(nbytes):
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    dst.copy_(src)
    torch.cuda.synchronize(0), torch.cuda.synchronize(1)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(1)
        times.append(time.perf_counter() - t)
    return nbytes / min(times) / 1e9


def loopback_tcp_gb_per_s(nbytes, connections):
    """Best of 3: `nbytes` sent over `connections` loopback sockets at once, one thread
    per side and connection, received into preallocated memory."""
    share = nbytes // connections
    payload = bytearray(share)
    sinks = [bytearray(share) for _ in range(connections)]

    def send(sock):
        sock.sendall(payload)
        sock.close()

    def receive(sock, sink):
        view, got = memoryview(sink), 0
        while got < share:
            got += sock.recv_into(view[got:], min(share - got, 16 << 20))
        sock.close()

    best = 0.0
    for _ in range(3):
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        pairs = []
        for _ in range(connections):
            client = socket.create_connection(("127.0.0.1", port))
            server, _ = listener.accept()
            pairs.append((server, client))
        listener.close()
        threads = [threading.Thread(target=send, args=(s,)) for s, _ in pairs]
        threads += [threading.Thread(target=receive, args=(c, sink)) for (_, c), sink in zip(pairs, sinks)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        best = max(best, share * connections / (time.perf_counter() - t) / 1e9)
    return best


def log_figures(log_name, message):
    """The numeric fields of each line of a server log that carries `message`."""
    text = open(os.path.join(LOG_DIR, log_name)).read()
    rows = []
    for line in text.splitlines():
        if message in line:
            # Numbers only (an address like 127.0.0.1 is not one).
            nums = re.findall(r"\b(\w+)=(-?[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?)(?=\s|$)", re.sub(r"\x1b\[[0-9;]*m", "", line))
            rows.append({k: float(v) for k, v in nums})
    return rows


result = {"model": MODEL, "lengths": LENGTHS}
agg = start("aggregated", 8201, ["--cuda-device", "0"])
# Each flow checks its own prompts: a prompt prefill has cached computes only its last
# tokens, whose bf16 numerics may differ from the reference's whole-prompt forward.
checks = {flow: [(prompt(n, s + salt), 32) for s, n in enumerate([7, 100, 1000, 3000])] for flow, salt in [("late", 10), ("early", 20)]}
reference = {flow: [post_json(8201, greedy(p, m))["choices"][0]["text"] for p, m in c] for flow, c in checks.items()}
result["aggregated_ttft_ms"] = {n: 1e3 * median_of(lambda: first_chunk_seconds(8201, greedy(fresh_prompt(n), 2))) for n in LENGTHS}
agg.terminate(), agg.wait()
CONNECTIONS.clear()

DECODE_FLAGS = {
    "cuda-ipc": ["--kv-transport", "cuda-ipc"],
    "tcp": ["--kv-transport", "tcp", "--kv-tcp-connections", "4"],
    "tcp-1": ["--kv-transport", "tcp", "--kv-tcp-connections", "1"],
}
DECODE_BIN = {transport: BIN for transport in DECODE_FLAGS}
if BEFORE_BIN:
    DECODE_FLAGS["tcp-before"], DECODE_BIN["tcp-before"] = DECODE_FLAGS["tcp"], BEFORE_BIN
for transport, flags in DECODE_FLAGS.items():
    pre = start(f"prefill-{transport}", 8202, ["--cuda-device", "0", "--mode", "prefill"])
    dec = start(f"decode-{transport}", 8203, ["--cuda-device", "1", "--mode", "decode"] + flags, DECODE_BIN[transport])
    r = {}
    for flow, early in [("late", False), ("early", True)]:
        got = [pd_generate(8202, 8203, greedy(p, m), early)["choices"][0]["text"] for p, m in checks[flow]]
        r[flow] = {"outputs_equal": got == reference[flow], "mismatches": sum(a != b for a, b in zip(got, reference[flow]))}
        r[flow]["ttft_ms"] = {n: 1e3 * median_of(lambda: pd_ttft(8202, 8203, greedy(fresh_prompt(n), 2), early)) for n in LENGTHS}
        r[flow]["added_ttft_ms"] = {n: r[flow]["ttft_ms"][n] - result["aggregated_ttft_ms"][n] for n in LENGTHS}
    r["decode_gaps"] = decode_gaps_during_import(8202, 8203)
    pd_generate(8202, 8203, greedy(fresh_prompt(LENGTHS[-1]), 2), False)  # a late import: its log line is a bandwidth
    r["imports"] = log_figures(f"pd-decode-{transport}.log", "imported KV")[-1:]
    r["device_copies"] = log_figures(f"pd-decode-{transport}.log", "peer copy done")[-1:]
    r["tcp_pulls"] = log_figures(f"pd-decode-{transport}.log", "pulled KV over TCP")[-1:]
    r["tcp_served"] = log_figures(f"pd-prefill-{transport}.log", "served a KV pull")[-4:] if r["tcp_pulls"] else []
    leases = urllib.request.urlopen("http://127.0.0.1:8202/metrics").read().decode()
    r["prefill_leases_after"] = [l for l in leases.splitlines() if l.startswith("dlengine_kv_leases ")]
    result[transport] = r
    for p in (pre, dec):
        p.terminate(), p.wait()
    CONNECTIONS.clear()
    print(json.dumps({transport: r}, indent=1), flush=True)

largest = max(result["cuda-ipc"]["imports"], key=lambda x: x.get("bytes", 0), default=None)
if largest:
    result["peer_copy_ceiling_gb_per_s"] = peer_copy_ceiling(int(largest["bytes"]))
    result["cuda_ipc_fraction_of_ceiling"] = largest["gb_per_s"] / result["peer_copy_ceiling_gb_per_s"]
    copy = result["cuda-ipc"]["device_copies"]
    if copy:  # the copy alone, timed on the device: no admission, table upload or polling
        result["cuda_ipc_device_copy_fraction_of_ceiling"] = copy[-1]["gb_per_s"] / result["peer_copy_ceiling_gb_per_s"]
if result["tcp"]["tcp_pulls"]:
    nbytes = int(result["tcp"]["tcp_pulls"][-1]["bytes"])
    result["loopback_tcp_gb_per_s"] = {n: loopback_tcp_gb_per_s(nbytes, n) for n in (1, 4)}
json.dump(result, open(OUT, "w"), indent=1)
print(json.dumps({k: v for k, v in result.items() if k not in DECODE_FLAGS}, indent=1))
