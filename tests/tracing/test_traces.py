"""Traces end to end: the release gateway exports OTLP/HTTP to a real Jaeger (v2, in-memory), and
the span trees are read back through Jaeger's query API. Downstream callback servers and event
servers are the Cobo-SDK Python peers of tests/interop; they record the `traceparent` header they
receive. The simulated TSS Node may send a `traceparent` of its own."""

import json
import secrets
import time

import pytest

import tss_node
from harness import SAMPLES, Gateway, event_server, keygen, metric, pkcs1_pair, start_downstream, until
from jaeger import parent_id, tags


class World:
    """Keys, Python callback servers and event servers, and gateways exporting to Jaeger."""

    def __init__(self, tmp_path, procs):
        self.dir, self.procs = tmp_path, procs
        keys = tmp_path / "keys"
        keys.mkdir()
        self.keys = keys
        self.node_pri, self.node_pub = keygen(keys, "tss-node-callback")
        self.event_pri, self.event_pub = pkcs1_pair(keys, "tss-node-event")
        self.gw_pri, self.gw_pub = keygen(keys, "gateway")
        self.servers = []

    def downstream(self, name, policy="approve", delay_ms=0):
        pri, pub = keygen(self.keys, name)
        url, record = start_downstream(self.procs, pri, self.gw_pub, name, policy=policy, delay_ms=str(delay_ms))
        self.servers.append((name, url, pub))
        return record

    def gateway(self, name, endpoint, ratio=1.0, event_servers=(), extra=()):
        self.service = f"gw-{name}-{secrets.token_hex(3)}"
        lines = [f"service_name: {self.service}", f"tss_node_public_key: {self.node_pub}",
                 f"gateway_private_key: {self.gw_pri}", "health_check_interval_ms: 0",
                 f"audit_log: {self.dir / (name + '-audit.jsonl')}",
                 "tracing:", f"  otlp_endpoint: {endpoint}", f"  sample_ratio: {ratio}", *extra,
                 "callback_servers:"]
        for n, url, pub in self.servers:
            lines += [f"  - name: {n}", f"    service_address: {url}", f"    pubkey_path: {pub}",
                      "    timeout_ms: 5000", "    retries: 0"]
        if event_servers:
            lines += [f"tss_node_event_public_key: {self.event_pub}",
                      f"state_store: {self.dir / (name + '-state.db')}", "event_servers:"]
            for s in event_servers:
                lines += [f"  - name: {s.name}", f"    service_address: {s.url}", "    timeout_ms: 3000"]
        return Gateway(self.procs, self.dir, name, lines).start()

    def send(self, gw, sample, request_id, headers=None):
        data = json.loads((SAMPLES / f"{sample}.json").read_bytes())
        data["request_id"] = request_id
        return tss_node.send(gw.check_url, json.dumps(data).encode(), self.node_pri.read_bytes(),
                             self.gw_pub.read_bytes(), headers=headers)


@pytest.fixture
def world(tmp_path, procs):
    return World(tmp_path, procs)


def records_for(record, request_id):
    return until(10, f"{record.name} records {request_id}",
                 lambda: [r for r in map(json.loads, record.read_text().splitlines() if record.exists() else [])
                          if r.get("request_id") == request_id])


def trace_id_of(traceparent):
    assert traceparent, "no traceparent"
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2), traceparent
    return trace_id, span_id, flags


def test_a_node_traceparent_is_honoured_and_every_step_is_a_span(world, jaeger):
    records = {n: world.downstream(n) for n in ("risk-a", "risk-b")}
    gw = world.gateway("approve", jaeger.otlp_endpoint)
    node_trace, node_span = secrets.token_hex(16), secrets.token_hex(8)
    status, resp = world.send(gw, "key_sign", "req-traced",
                              headers={"traceparent": f"00-{node_trace}-{node_span}-01"})
    assert (status, resp.status, resp.action) == (200, 0, "APPROVE")

    # Each downstream got the node's trace id, with a span of the gateway's as parent.
    sent_parents = {}
    for name, record in records.items():
        (got,) = records_for(record, "req-traced")
        trace_id, span_id, flags = trace_id_of(got["traceparent"])
        assert (trace_id, flags) == (node_trace, "01")
        sent_parents[name] = span_id

    spans = jaeger.wait_trace(node_trace, lambda s: s.named("audit_write") and len(s.named("downstream_call")) == 2)
    root = spans.one("callback")
    assert parent_id(root) == node_span
    t = tags(root)
    assert (t["type"], t["request_id"], t["decision"], t["status"]) == ("key_sign", "req-traced", "APPROVE", 0)
    # The metric's outcome too: the dashboard's trace links search by type and outcome.
    assert t["outcome"] == "approved"
    for step in ("token_check", "embedded_rules", "duplicate_memory", "sign_request", "approvals_index",
                 "audit_write", "sign_answer"):
        assert len(spans.children(root, step)) == 1, step
    assert tags(spans.one("duplicate_memory"))["result"] == "evaluated"
    # The signing thread: the wait for it and the signature, under each signing step.
    for step in ("sign_request", "sign_answer"):
        (s,) = spans.children(root, step)
        assert {c["operationName"] for c in spans.children(s)} == {"signing_wait", "sign"}
    calls = spans.children(root, "downstream_call")
    assert sorted(tags(c)["server"] for c in calls) == ["risk-a", "risk-b"]
    for c in calls:
        ct = tags(c)
        assert (ct["outcome"], ct["attempt"], ct["retry"]) == ("approved", 1, False)
        assert ct["http.version"] in ("HTTP/1.1", "HTTP/1.0")
        assert "error" not in ct
        # The traceparent a downstream received names this attempt's span.
        assert sent_parents[ct["server"]] == c["spanID"]

    # What leaves for the collector: names, outcomes, ids and timings; never a token, key or payload.
    exported = json.dumps(spans.spans)
    for secret in ("eyJ", "BEGIN", "package_data", "TSS_JWT_MSG", "extra_info"):
        assert secret not in exported, secret

    # The decision log line carries the trace id.
    until(5, "decision logged", lambda: "decision" in gw.log.read_text())
    line = next(ln for ln in gw.log.read_text().splitlines() if "decision" in ln and "req-traced" in ln)
    assert f"trace_id={node_trace}" in line, line


def test_a_rejection_marks_its_call_and_the_cancelled_ones(world, jaeger):
    world.downstream("slow", delay_ms=3000)
    world.downstream("rejecter", policy="reject")
    gw = world.gateway("reject", jaeger.otlp_endpoint)
    started = time.time()
    status, resp = world.send(gw, "key_sign", "req-rejected")
    assert (resp.status, resp.action) == (0, "REJECT")
    assert time.time() - started < 2.5, "the rejection answered at once"
    trace = until(30, "the trace in jaeger", lambda: [
        t for t in jaeger.traces(world.service) if any(s["operationName"] == "downstream_call" for s in t["spans"])
        and any(tags(s).get("outcome") == "cancelled" for s in t["spans"])])[0]
    spans = jaeger.wait_trace(trace["traceID"], lambda s: s.named("audit_write"))
    root = spans.one("callback")
    t = tags(root)
    assert (t["decision"], t["status"], t["request_id"], t["outcome"]) == ("REJECT", 0, "req-rejected", "rejected")
    calls = {tags(c)["server"]: tags(c) for c in spans.children(root, "downstream_call")}
    assert calls["rejecter"]["outcome"] == "rejected"
    assert calls["rejecter"]["error"] is True
    assert calls["rejecter"]["otel.status_code"] == "ERROR"
    assert calls["slow"]["outcome"] == "cancelled"
    assert "error" not in calls["slow"]


def test_an_event_and_each_of_its_deliveries_share_one_trace(world, jaeger):
    world.downstream("risk")
    servers = [event_server(world.procs, "python", world.gw_pub, world.dir, n) for n in ("siem", "ledger")]
    gw = world.gateway("events", jaeger.otlp_endpoint, event_servers=servers,
                       extra=["downstream_signing_key: " + str(world.gw_pri)])
    node_trace, node_span = secrets.token_hex(16), secrets.token_hex(8)
    payload = tss_node.make_event("request.keysign.created", "req-event")
    event_id = json.loads(payload)["event_id"]
    r = tss_node.send_event(gw.event_url, payload, world.event_pri.read_bytes(),
                            headers={"traceparent": f"00-{node_trace}-{node_span}-01"})
    assert r.status_code == 200, r.text
    for s in servers:
        until(30, f"{s.name} gets the event", lambda s=s: event_id in s.event_ids())
        (got,) = [r for r in s.accepted() if r["event_id"] == event_id]
        assert trace_id_of(got["traceparent"])[0] == node_trace
    spans = jaeger.wait_trace(node_trace, lambda s: len(s.named("event_delivery")) == 2)
    root = spans.one("event")
    assert parent_id(root) == node_span
    rt = tags(root)
    assert (rt["event_id"], rt["event_type"], rt["request_id"], rt["http.status_code"]) == (
        event_id, "request.keysign.created", "req-event", 200)
    deliveries = spans.children(root, "event_delivery")
    assert sorted(tags(d)["server"] for d in deliveries) == ["ledger", "siem"]
    assert all(tags(d)["outcome"] == "delivered" for d in deliveries)


def test_sample_ratio_zero_records_nothing_but_still_propagates(world, jaeger):
    record = world.downstream("risk")
    gw = world.gateway("unsampled", jaeger.otlp_endpoint, ratio=0.0)
    for i in range(3):
        assert world.send(gw, "key_sign", f"req-unsampled-{i}")[1].action == "APPROVE"
    for i in range(3):
        (got,) = records_for(record, f"req-unsampled-{i}")
        assert trace_id_of(got["traceparent"])[2] == "00"
    time.sleep(2.5)
    assert jaeger.traces(world.service) == []


def test_with_the_collector_down_requests_are_decided_as_before_and_drops_are_counted(world, jaeger):
    world.downstream("risk")
    from harness import free_port

    gw = world.gateway("down", f"http://127.0.0.1:{free_port()}")
    for i in range(20):
        started = time.time()
        status, resp = world.send(gw, "key_sign", f"req-down-{i}")
        assert (status, resp.status, resp.action) == (200, 0, "APPROVE")
        assert time.time() - started < 1.0
    until(15, "dropped spans counted", lambda: metric(gw.metrics(), "tss_gateway_trace_spans_dropped_total") >= 20)
    assert gw.proc.poll() is None


def test_reload_applies_sample_ratio_at_once_and_the_endpoint_at_restart(world, jaeger):
    import signal

    record = world.downstream("risk")
    gw = world.gateway("reload", jaeger.otlp_endpoint, ratio=1.0)
    assert world.send(gw, "key_sign", "req-before")[1].action == "APPROVE"
    (got,) = records_for(record, "req-before")
    before = trace_id_of(got["traceparent"])
    assert before[2] == "01"
    text = gw.config.read_text()
    gw.config.write_text(text.replace("sample_ratio: 1.0", "sample_ratio: 0.0")
                         .replace(jaeger.otlp_endpoint, "http://127.0.0.1:9"))
    gw.proc.send_signal(signal.SIGHUP)
    until(10, "reloaded", lambda: "config reloaded" in gw.log.read_text())
    log = gw.log.read_text()
    assert "tracing.sample_ratio applied" in log
    assert "tracing.otlp_endpoint changed: takes effect at restart" in log
    assert world.send(gw, "key_sign", "req-after")[1].action == "APPROVE"
    (got,) = records_for(record, "req-after")
    assert trace_id_of(got["traceparent"])[2] == "00"
    # The running exporter still sends to Jaeger: the trace from before the reload is there.
    jaeger.wait_trace(before[0], lambda s: s.named("callback"))


def test_jaeger_killed_mid_test_changes_no_decision(world, tmp_path):
    from jaeger import Jaeger

    (tmp_path / "own-jaeger").mkdir()
    own = Jaeger(tmp_path / "own-jaeger").start()
    try:
        record = world.downstream("risk")
        gw = world.gateway("killed", own.otlp_endpoint)
        assert world.send(gw, "key_sign", "req-alive")[1].action == "APPROVE"
        (got,) = records_for(record, "req-alive")
        own.wait_trace(trace_id_of(got["traceparent"])[0], lambda s: s.named("callback"))
        own.stop()
        for i in range(20):
            started = time.time()
            status, resp = world.send(gw, "key_sign", f"req-after-kill-{i}")
            assert (status, resp.status, resp.action) == (200, 0, "APPROVE")
            assert time.time() - started < 1.0
        until(15, "dropped spans counted",
              lambda: metric(gw.metrics(), "tss_gateway_trace_spans_dropped_total", reason="export_failed") >= 20)
    finally:
        own.stop()


def test_a_collector_that_accepts_and_never_answers_delays_no_decision(world):
    """A hostile or hung collector: it takes the connection, reads the batch and answers nothing.
    Exports then wait out their timeout on the export thread, and their spans are dropped and
    counted (at the full queue too, under enough load), while every decision comes as fast as
    before."""
    import socket
    import threading
    from concurrent.futures import ThreadPoolExecutor

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []

    def swallow():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=lambda c=conn: [None for _ in iter(lambda: c.recv(65536), b"")],
                             daemon=True).start()

    threading.Thread(target=swallow, daemon=True).start()
    try:
        world.downstream("risk")
        gw = world.gateway("stalled", f"http://127.0.0.1:{listener.getsockname()[1]}")

        def one(i):
            started = time.time()
            status, resp = world.send(gw, "key_sign", f"req-stalled-{i}")
            assert (status, resp.status, resp.action) == (200, 0, "APPROVE")
            return time.time() - started

        with ThreadPoolExecutor(8) as pool:
            slowest = max(pool.map(one, range(200)))
        assert slowest < 2.0, f"a decision took {slowest:.2f} s behind a stalled collector"
        until(10, "the collector called", lambda: held)
        until(20, "spans dropped and counted",
              lambda: metric(gw.metrics(), "tss_gateway_trace_spans_dropped_total") > 0)
        assert gw.proc.poll() is None
    finally:
        listener.close()
        for c in held:
            c.close()
