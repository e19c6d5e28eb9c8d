"""A real Jaeger (v2, `cmd/jaeger` of github.com/jaegertracing/jaeger, pinned in tests/jaeger):
all-in-one with in-memory storage, OTLP/HTTP in and the query API out on free loopback ports."""

import os
import pathlib
import shutil
import subprocess
import time

import pytest
import requests

from harness import ROOT, free_port, until

JAEGER_SRC = ROOT / "tests" / "jaeger"

CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


def jaeger_bin():
    """$JAEGER_BIN (scripts/test.sh builds it once), else built here into target/jaeger."""
    env = os.environ.get("JAEGER_BIN")
    if env:
        path = pathlib.Path(env)
    else:
        path = ROOT / "target" / "jaeger" / "jaeger"
        if not path.exists():
            if shutil.which("go") is None:
                pytest.fail("Jaeger is built from tests/jaeger with the Go toolchain (or set $JAEGER_BIN)")
            subprocess.run(["go", "build", "-buildvcs=false", "-o", str(path),
                            "github.com/jaegertracing/jaeger/cmd/jaeger"], cwd=JAEGER_SRC, check=True)
    if not path.exists():
        pytest.fail(f"Jaeger binary {path} not found: scripts/test.sh builds it")
    return str(path)


class Jaeger:
    def __init__(self, directory):
        self.dir = pathlib.Path(directory)
        self.otlp, self.query = free_port(), free_port()
        self.config = self.dir / "jaeger.yaml"
        self.config.write_text(CONFIG.format(otlp=self.otlp, query=self.query, query_grpc=free_port()))
        self.proc = None

    @property
    def otlp_endpoint(self):
        return f"http://127.0.0.1:{self.otlp}"

    def start(self):
        self.log = open(self.dir / "jaeger.log", "wb")
        self.proc = subprocess.Popen([jaeger_bin(), "--config", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"jaeger exited: {(self.dir / 'jaeger.log').read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{self.query}/api/services", timeout=1).ok:
                    # The OTLP receiver takes connections too.
                    requests.post(f"{self.otlp_endpoint}/v1/traces", data=b"", timeout=1,
                                  headers={"content-type": "application/x-protobuf"})
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        pytest.fail("jaeger did not start within 60 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def traces(self, service):
        r = requests.get(f"http://127.0.0.1:{self.query}/api/traces", params={"service": service, "limit": 100},
                         timeout=10)
        return r.json().get("data") or [] if r.ok else []

    def trace(self, trace_id):
        r = requests.get(f"http://127.0.0.1:{self.query}/api/traces/{trace_id}", timeout=10)
        if not r.ok:
            return None
        data = r.json().get("data") or []
        return data[0] if data else None

    def wait_trace(self, trace_id, done, secs=30):
        """The trace once done(spans) holds: spans arrive in batches."""
        return until(secs, f"trace {trace_id} in jaeger", lambda: (
            (t := self.trace(trace_id)) is not None and done(Spans(t)) and Spans(t)))


class Spans:
    """A trace read back from Jaeger's query API: spans by name, tags as a dict."""

    def __init__(self, trace):
        self.trace_id = trace["traceID"]
        self.spans = trace["spans"]
        self.by_id = {s["spanID"]: s for s in self.spans}

    def named(self, name):
        return [s for s in self.spans if s["operationName"] == name]

    def one(self, name):
        got = self.named(name)
        assert len(got) == 1, (name, [s["operationName"] for s in self.spans])
        return got[0]

    def children(self, span, name=None):
        return [s for s in self.spans if parent_id(s) == span["spanID"]
                and (name is None or s["operationName"] == name)]


def tags(span):
    return {t["key"]: t["value"] for t in span.get("tags", [])}


def parent_id(span):
    for ref in span.get("references", []):
        if ref["refType"] == "CHILD_OF":
            return ref["spanID"]
    return None
