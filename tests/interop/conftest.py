import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SAMPLES = ROOT / "config" / "samples"


def gateway_bin():
    path = pathlib.Path(os.environ.get("GATEWAY_BIN", ROOT / "target" / "release" / "tss-callback-gateway"))
    if not path.exists():
        pytest.fail(f"gateway binary {path} not found: run `cargo build --release` or set GATEWAY_BIN")
    return str(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise TimeoutError(url)


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


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.stop_all()


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
