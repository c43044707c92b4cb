"""Processes for the router's end-to-end tests: a real etcd (Debian's etcd-server), real
`dlengine serve` engines on the tiny fixture model, and real `dlengine router` processes,
all on free loopback ports. Everything started here is stopped by `Cluster.close()`.

No tests live in this module; the `test_router_*.py` files import it.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DLENGINE = os.environ.get("DLENGINE_BIN", os.path.join(REPO, "target", "debug", "dlengine"))
MODEL_DIR = os.environ.get("DLENGINE_TEST_MODEL", os.path.join(REPO, "fixtures", "models", "llama-tiny"))
MODEL = "tiny"
NAMESPACE = "e2e"
LEASE_TTL = 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=10):
    """(status, parsed JSON or text) of one request; never raises on HTTP errors."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, ctype = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, ctype = e.code, e.read(), e.headers.get("content-type", "")
    text = raw.decode(errors="replace")
    if "json" in ctype or text[:1] in ("{", "["):
        try:
            return status, json.loads(text)
        except ValueError:
            pass
    return status, text


def wait_until(what, predicate, timeout=20.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def skip_reason():
    """Why these tests cannot run here, or None."""
    if shutil.which("etcd") is None:
        return "no etcd binary (install Debian's etcd-server)"
    if not os.access(DLENGINE, os.X_OK):
        return f"{DLENGINE} is not built (cargo build)"
    if not os.path.isfile(os.path.join(MODEL_DIR, "config.json")):
        return f"fixture model {MODEL_DIR} is missing"
    return None


class Process:
    def __init__(self, name, argv, log_dir):
        self.name = name
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        pid_file = os.environ.get("ROUTER_E2E_PIDS")
        if pid_file:
            with open(pid_file, "a") as f:
                f.write(f"{self.proc.pid}\n")

    def alive(self):
        return self.proc.poll() is None

    def kill9(self):
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self, timeout=30):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def tail(self, n=30):
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""


class Etcd:
    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "etcd")
        self.client_port, self.peer_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.workdir = workdir
        self.process = None
        self.start()

    def start(self):
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = ["etcd", "--name", "e2e", "--data-dir", os.path.join(self.dir, "data"),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"e2e={peer}", "--logger", "zap", "--log-level", "warn"]
        self.process = Process("etcd", argv, self.workdir)
        wait_until("etcd healthy", self.healthy)

    def healthy(self):
        try:
            status, body = http("GET", f"{self.endpoint}/health", timeout=1)
            return status == 200 and isinstance(body, dict) and body.get("health") == "true"
        except OSError:
            return False

    def kill(self):
        self.process.kill9()

    def restart_empty(self):
        self.kill()
        shutil.rmtree(os.path.join(self.dir, "data"), ignore_errors=True)
        self.start()

    def _range(self, prefix):
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        b64 = lambda s: base64.b64encode(s.encode()).decode()
        status, body = http("POST", f"{self.endpoint}/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
        assert status == 200, body
        return body.get("kvs", [])

    def registrations(self, prefix=f"/dlengine/{NAMESPACE}/"):
        """{key: record} under the prefix, read through etcd's JSON gateway."""
        return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"])) for kv in self._range(prefix)}

    def leases(self, prefix=f"/dlengine/{NAMESPACE}/"):
        """{key: lease id} under the prefix."""
        return {base64.b64decode(kv["key"]).decode(): kv.get("lease") for kv in self._range(prefix)}


class Engine:
    def __init__(self, cluster, name, extra=()):
        self.name, self.cluster, self.extra = name, cluster, list(extra)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = f"/dlengine/{NAMESPACE}/d/1/aggregated/{name}"
        self.start()

    def start(self):
        argv = [DLENGINE, "serve", MODEL_DIR, "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port),
                "--served-model-name", MODEL, "--etcd-endpoints", self.cluster.etcd.endpoint,
                "--namespace", NAMESPACE, "--deployment", "d", "--revision", "1", "--instance-id", self.name,
                "--lease-ttl-secs", str(LEASE_TTL), "--max-num-seqs", "16", *self.extra]
        self.process = Process(f"engine-{self.name}", argv, self.cluster.workdir)

    def wait_registered(self, timeout=60):
        wait_until(f"{self.name} registered", lambda: self.key in self.cluster.etcd.registrations() or self._check_alive(), timeout)

    def _check_alive(self):
        assert self.process.alive(), f"engine {self.name} exited:\n{self.process.tail()}"
        return False


class Router:
    def __init__(self, cluster, policy, extra=(), port=None):
        self.cluster = cluster
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [DLENGINE, "router", "--host", "127.0.0.1", "--port", str(self.port),
                "--etcd-endpoints", cluster.etcd.endpoint, "--namespace", NAMESPACE, "--policy", policy, *extra]
        self.process = Process(f"router-{self.port}-{int(time.time() * 1000)}", argv, cluster.workdir)

    def health(self):
        try:
            return http("GET", f"{self.url}/health", timeout=2)[1]
        except OSError:
            return None

    def wait_workers(self, n, timeout=30):
        def ready():
            assert self.process.alive(), f"router exited:\n{self.process.tail()}"
            health = self.health()
            return isinstance(health, dict) and health.get("workers") == n
        wait_until(f"router sees {n} workers", ready, timeout)

    def metrics(self):
        status, text = http("GET", f"{self.url}/metrics")
        assert status == 200
        return text

    def worker_requests(self):
        """{worker url: attempts sent} from the router's metrics."""
        counts = {}
        for line in self.metrics().splitlines():
            if line.startswith("dlengine_router_worker_requests_total{"):
                url = line.split('worker="', 1)[1].split('"', 1)[0]
                counts[url] = counts.get(url, 0) + float(line.rsplit(" ", 1)[1])
        return counts


class Cluster:
    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="dlengine-router-e2e-")
        self.etcd = Etcd(self.workdir)
        self.engines, self.routers = [], []

    def engine(self, name, extra=()):
        engine = Engine(self, name, extra)
        self.engines.append(engine)
        return engine

    def router(self, policy="round-robin", extra=(), port=None):
        router = Router(self, policy, extra, port)
        self.routers.append(router)
        return router

    def close(self):
        processes = [r.process for r in self.routers] + [e.process for e in self.engines] + [self.etcd.process]
        for p in processes:
            try:
                p.kill9()
            except Exception:
                pass
        # pytest shows a test's captured output only when it fails: the logs come with it.
        for p in processes:
            print(f"--- {p.name} (last lines)\n{p.tail(15)}")
        if os.environ.get("KEEP_E2E_LOGS"):
            print(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
