"""What the Python suites share: the gateway binary and its processes, keys, free ports, the peers
(Cobo-style callback and event servers in Python and Go) and a private PostgreSQL cluster.

`conftest.py` here and in `tests/events/` turn these into fixtures. Nothing here shares code with
the gateway: keys come from its `keygen` or from Python `cryptography`, tokens from PyJWT or Go's
golang-jwt."""

import glob
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SAMPLES = ROOT / "config" / "samples"
GOPEERS_SRC = ROOT / "tests" / "gopeers"


def gateway_bin():
    path = pathlib.Path(os.environ.get("GATEWAY_BIN", ROOT / "target" / "release" / "tss-callback-gateway"))
    if not path.exists():
        pytest.fail(f"gateway binary {path} not found: run `cargo build --release` or set GATEWAY_BIN")
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise TimeoutError(url)


def until(secs, what, cond, every=0.05):
    """Polls cond() until it returns something true and returns that; fails after secs with what."""
    deadline = time.time() + secs
    while True:
        got = cond()
        if got:
            return got
        if time.time() > deadline:
            pytest.fail(f"{what}: not within {secs} s")
        time.sleep(every)


def pkcs1_pair(directory, name):
    """A key pair written by Python `cryptography` in the PKCS#1 forms."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pri = directory / f"{name}-pri-pkcs1.pem"
    pub = directory / f"{name}-pub-pkcs1.key"
    pri.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1))
    return pri, pub


def keygen(directory, name):
    subprocess.run([gateway_bin(), "keygen", "--out", str(directory), "--name", name], check=True,
                   capture_output=True)
    return directory / f"{name}-pri.pem", directory / f"{name}-pub.key"


def records(path):
    """The JSON lines a peer recorded (none when it recorded nothing yet)."""
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            p.send_signal(sig)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def start_downstream(procs, key, gateway_pub, name, **opts):
    port = free_port()
    record = key.parent / f"{name}.record.jsonl"
    args = [sys.executable, str(HERE / "downstream_server.py"), "--listen", f"127.0.0.1:{port}", "--key", str(key),
            "--gateway-pub", str(gateway_pub), "--name", name, "--record", str(record)]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] + (v if isinstance(v, list) else [v])
    procs.start(args)
    wait_http(f"http://127.0.0.1:{port}/ping")
    return f"http://127.0.0.1:{port}/v2/check", record


# === Go peers (tests/gopeers, on Cobo's Go SDK) ===

_gopeers_dir = None


def gopeers_bin(name):
    """Path of a Go peer binary: from $GOPEERS_BIN (scripts/test.sh builds them once), else built
    here once per session into target/gopeers."""
    global _gopeers_dir
    if _gopeers_dir is None:
        env = os.environ.get("GOPEERS_BIN")
        if env:
            _gopeers_dir = pathlib.Path(env)
        else:
            _gopeers_dir = ROOT / "target" / "gopeers"
            if shutil.which("go") is None:
                pytest.fail("the Go peers need the Go toolchain (or $GOPEERS_BIN with them built)")
            subprocess.run(["go", "build", "-buildvcs=false", "-o", str(_gopeers_dir) + "/", "./..."],
                           cwd=GOPEERS_SRC, check=True)
    path = _gopeers_dir / name
    if not path.exists():
        pytest.fail(f"Go peer {path} not found: build tests/gopeers (scripts/test.sh does)")
    return str(path)


class EventServer:
    """A running event server (Python or Go) and what it recorded."""

    def __init__(self, procs, lang, gateway_pub, name, record, port=None):
        self.procs, self.lang, self.gateway_pub, self.name, self.record = procs, lang, gateway_pub, name, record
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v2/event"
        self.proc = None

    def start(self):
        listen = f"127.0.0.1:{self.port}"
        if self.lang == "go":
            args = [gopeers_bin("eventserver"), "--listen", listen]
        else:
            args = [sys.executable, str(HERE / "event_server.py"), "--listen", listen]
        args += ["--gateway-pub", str(self.gateway_pub), "--name", self.name, "--record", str(self.record)]
        self.proc = self.procs.start(args)
        wait_http(f"http://127.0.0.1:{self.port}/ping")
        return self

    def stop(self):
        self.procs.stop(self.proc)

    def records(self):
        return records(self.record)

    def accepted(self):
        return [r for r in self.records() if "refused" not in r]

    def event_ids(self):
        return [r["event_id"] for r in self.accepted()]


def event_server(procs, lang, gateway_pub, directory, name, start=True):
    s = EventServer(procs, lang, gateway_pub, name, directory / f"{name}.events.jsonl")
    return s.start() if start else s


def start_go_callback(procs, key, gateway_pub, name, policy="approve"):
    port = free_port()
    record = key.parent / f"{name}.record.jsonl"
    procs.start([gopeers_bin("callbackserver"), "--listen", f"127.0.0.1:{port}", "--key", str(key),
                 "--gateway-pub", str(gateway_pub), "--name", name, "--policy", policy, "--record", str(record)])
    wait_http(f"http://127.0.0.1:{port}/ping")
    return f"http://127.0.0.1:{port}/v2/check", record


# === The gateway as a process ===

class Gateway:
    """One gateway process on a config written from lines; it can be stopped and started again on
    the same config, state store and audit log."""

    def __init__(self, procs, directory, name, lines):
        self.procs, self.name = procs, name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = directory / f"{name}.yaml"
        self.config.write_text("\n".join([f"listen: 127.0.0.1:{self.port}"] + lines) + "\n")
        self.proc = None
        check = subprocess.run([gateway_bin(), "check-config", "-c", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr

    def start(self):
        self.log = self.config.with_suffix(f".{int(time.time() * 1000)}.log")
        self.proc = self.procs.start([gateway_bin(), "run", "-c", str(self.config)], stderr=open(self.log, "wb"))
        wait_http(f"{self.base}/healthz")
        return self

    def stop(self, sig=signal.SIGTERM):
        self.procs.stop(self.proc, sig)

    @property
    def check_url(self):
        return f"{self.base}/v2/check"

    @property
    def event_url(self):
        return f"{self.base}/v2/event"

    def readyz(self):
        r = requests.get(f"{self.base}/readyz", timeout=10)
        return r.status_code, r.json()

    def metrics(self):
        return parse_metrics(requests.get(f"{self.base}/metrics", timeout=10).text)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text format -> {(name, frozenset(labels)): value}."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[(m.group(1), frozenset(_LABEL.findall(m.group(3) or "")))] = float(m.group(4))
    return out


def metric(samples, name, **labels):
    """Sum of the samples of name whose labels include labels."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


# === A private PostgreSQL cluster (Debian's postgresql package) ===

class Postgres:
    """initdb into a temp dir and pg_ctl on a free loopback port, trust auth, a unix socket in the
    temp dir. PostgreSQL refuses to run as root: as uid 0 it runs as the `postgres` user."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(pathlib.Path(p).parts[-3]) if pathlib.Path(p).parts[-3].isdigit() else 0)
        if not bins:
            pytest.fail("PostgreSQL not installed (Debian package postgresql; scripts/test.sh installs it)")
        self.bin = pathlib.Path(bins[-1]).parent
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="tss-gateway-pg-"))
        self.data, self.sock, self.logfile = self.dir / "data", self.dir / "sock", self.dir / "postgres.log"
        self.sock.mkdir()
        self.port = free_port()
        self.as_user = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(self.sock, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")

    def _run(self, tool, *args):
        out = subprocess.run(self.as_user + [str(self.bin / tool), *args], capture_output=True, text=True)
        if out.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)}: {out.stdout}{out.stderr}\n{log[-2000:]}")
        return out.stdout

    def start(self):
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sock} -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.logfile), "-o", opts)
        return self

    def stop(self):
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.data))

    def sql(self, statement, db="postgres"):
        return self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db,
                         "-v", "ON_ERROR_STOP=1", "-At", "-c", statement)

    def create_db(self, name):
        self.sql(f'CREATE DATABASE "{name}"')
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self):
        try:
            self.stop()
        except RuntimeError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)
