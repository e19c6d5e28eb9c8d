"""Events end to end: a simulated TSS Node signs TSSEvents (built with `cobo_waas2.TSSEvent`) with
its event key and posts them to the gateway, which delivers them, re-signed with its downstream
signing key, to event servers built on Cobo's SDK models: Python (`cobo_waas2.TSSEvent`, Flask,
PyJWT) and Go (the Go SDK's `TSSEvent`, golang-jwt). Each server verifies the token and decodes the
event, and records what arrived: the tests count those records."""

import base64
import collections
import hashlib
import json
import signal
import time

import jwt
import pytest

import tss_node
from events_world import MODELS, World, audit_events, backlog, event
from harness import SAMPLES, metric, pkcs1_pair, until

@pytest.fixture
def world(tmp_path, procs):
    return World(tmp_path, procs)


def test_every_event_reaches_a_python_and_a_go_event_server_byte_for_byte(world):
    py, go = world.event_server("python", "py-all"), world.event_server("go", "go-all")
    gw = world.gateway("gw", [(py, None), (go, None)])
    world.approve(gw, "key_sign", "req-signed")
    sent = dict(event(t, r) for t, r in [
        ("ping", None), ("request.keysign.created", "req-signed"), ("request.keysign.succeeded", "req-signed"),
        ("request.keygen.failed", "req-keygen"), ("request.keyreshare.updated", "req-reshare"),
        ("request.keysharesign.created", "req-share")])
    for payload in sent.values():
        r = world.send(gw, payload)
        assert r.status_code == 200, r.text
    # Recorded before the answer: one `event` audit record per event.
    assert sorted(e["event_id"] for e in audit_events(gw.audit)) == sorted(sent)
    for server in (py, go):
        until(30, f"{server.name} gets every event", lambda: set(server.event_ids()) == set(sent))
    until(30, "the outbox is empty", lambda: backlog(gw) == 0)
    for server in (py, go):
        assert not [r for r in server.records() if "refused" in r], server.records()
        got = server.accepted()
        assert collections.Counter(r["event_id"] for r in got) == collections.Counter(sent.keys())
        for r in got:
            payload = sent[r["event_id"]]
            doc = json.loads(payload)
            # The node's exact bytes, re-signed by the gateway (its service_name as iss) ...
            assert r["sha256"] == hashlib.sha256(payload).hexdigest(), (server.name, doc["event_type"])
            assert r["iss"] == "events-gateway"
            # ... decoded by the SDK's TSSEvent, data into the model of its kind.
            assert r["event_type"] == doc["event_type"]
            if doc["event_type"] != "ping":
                assert r["model"] == MODELS[doc["event_type"].split(".")[1]]
                assert r["request_id"] == doc["data"]["request_id"]
                # The SDKs' request_type here is the string enum (KeySign), not the callback's integer.
                assert r["request_type"] == doc["data"]["request_type"] == r["data_type"]
    m = gw.metrics()
    assert metric(m, "tss_gateway_events_total", outcome="accepted") == len(sent)
    for server in (py, go):
        assert metric(m, "tss_gateway_event_deliveries_total", server=server.name, outcome="delivered") == len(sent)


def test_event_types_choose_what_a_server_gets_and_unknown_types_go_to_the_unfiltered(world):
    py, go = world.event_server("python", "py-all"), world.event_server("go", "go-all")
    go_sign = world.event_server("go", "go-keysign-outcomes")
    gw = world.gateway("gw", [(py, None), (go, None),
                              (go_sign, ["request.keysign.succeeded", "request.keysign.failed"])])
    world.approve(gw, "key_sign", "req-filter")
    sent = dict(event(t, r) for t, r in [
        ("ping", None), ("request.keysign.created", "req-filter"), ("request.keysign.succeeded", "req-filter"),
        ("request.keysign.failed", "req-filter-2"), ("request.keygen.succeeded", "req-filter-kg")])
    # A type Cobo may add later: accepted, and delivered to the servers without a filter.
    doc = json.loads(tss_node.make_event("request.keysign.updated", "req-filter"))
    doc["event_type"] = "request.keysign.archived"
    future = json.dumps(doc).encode()
    sent[doc["event_id"]] = future
    for payload in sent.values():
        assert world.send(gw, payload).status_code == 200
    for server in (py, go):
        until(30, f"{server.name} gets every event", lambda: set(server.event_ids()) == set(sent))
    until(30, "the outbox is empty", lambda: backlog(gw) == 0)
    wanted = {e for e, p in sent.items() if json.loads(p)["event_type"] in
              ("request.keysign.succeeded", "request.keysign.failed")}
    assert len(wanted) == 2
    assert sorted(go_sign.event_ids()) == sorted(wanted)
    for server in (py, go):
        assert sorted(server.event_ids()) == sorted(sent)
        [r] = [r for r in server.accepted() if r["event_id"] == doc["event_id"]]
        assert r["sha256"] == hashlib.sha256(future).hexdigest()
    assert metric(gw.metrics(), "tss_gateway_events_total", type="other", outcome="accepted") == 1


def test_a_server_that_is_down_gets_every_event_once_back_across_a_gateway_crash(world):
    py = world.event_server("python", "py-up")
    go = world.event_server("go", "go-down", start=False)  # its port is chosen, nothing listens yet
    gw = world.gateway("gw", [(py, None), (go, None)])
    before = dict(event("request.keysign.updated", f"req-down-{i}") for i in range(3))
    for payload in before.values():
        assert world.send(gw, payload).status_code == 200
    # A server that keeps failing does not hold the others back.
    until(30, "the running server gets the events", lambda: set(py.event_ids()) == set(before))
    until(30, "the down server's backlog shows", lambda: metric(
        gw.metrics(), "tss_gateway_event_backlog", server="go-down") == len(before))
    # Answered 200 means recorded: a crash loses nothing.
    gw.stop(signal.SIGKILL)
    gw.start()
    after = dict(event("request.keysign.succeeded", f"req-down-{i}") for i in range(2))
    for payload in after.values():
        assert world.send(gw, payload).status_code == 200
    every = {**before, **after}
    until(30, "the running server gets the new events", lambda: set(py.event_ids()) == set(every))
    go.start()
    until(90, "the server, back, gets every event", lambda: set(go.event_ids()) == set(every))
    until(30, "the outbox is empty", lambda: backlog(gw) == 0)
    for server in (py, go):
        assert collections.Counter(server.event_ids()) == collections.Counter(every.keys()), server.name
        for r in server.accepted():
            assert r["sha256"] == hashlib.sha256(every[r["event_id"]]).hexdigest()


def test_bad_input_gets_400_and_is_neither_recorded_nor_delivered(world):
    py, go = world.event_server("python", "py-bad"), world.event_server("go", "go-bad")
    gw = world.gateway("gw", [(py, None), (go, None)], extra=["max_body_bytes: 65536"])
    event_key = world.event_pri.read_bytes()
    eid, good = event("request.keysign.succeeded", "req-bad")
    expired = jwt.encode({"package_data": base64.b64encode(good).decode(), "exp": int(time.time()) - 600,
                          "iss": "cobo-tss-node"}, event_key, algorithm="RS256")
    huge = json.loads(tss_node.make_event("request.keysign.failed", "req-huge"))
    huge["data"]["failed_reason"] = "x" * 100_000
    huge = json.dumps(huge).encode()
    bad = {
        # The node's callback key is not its event key.
        "signed with the callback key": tss_node.make_token(good, world.node_pri.read_bytes()),
        "signed by a stranger": tss_node.make_token(good, pkcs1_pair(world.keys, "stranger")[0].read_bytes()),
        "expired": expired,
        "a CallbackRequest, not a TSSEvent": tss_node.make_token((SAMPLES / "key_sign.json").read_bytes(), event_key),
        "a JSON array": tss_node.make_token(b"[1, 2, 3]", event_key),
        "not JSON": tss_node.make_token(b"event: keysign succeeded", event_key),
        "oversized": tss_node.make_token(huge, event_key),
    }
    for what, token in bad.items():
        r = world.send(gw, good, token=token)
        assert r.status_code == 400, (what, r.status_code, r.text[:200])
    assert audit_events(gw.audit) == []
    # A good event after them: once it is delivered and the outbox is empty, whatever the bad ones
    # had left would have arrived too.
    assert world.send(gw, good).status_code == 200
    for server in (py, go):
        until(30, f"{server.name} gets the good event", lambda: server.event_ids() == [eid])
    until(30, "the outbox is empty", lambda: backlog(gw) == 0)
    for server in (py, go):
        assert server.records() == server.accepted() and server.event_ids() == [eid], server.records()
    assert [e["event_id"] for e in audit_events(gw.audit)] == [eid]
    m = gw.metrics()
    assert metric(m, "tss_gateway_events_total", outcome="invalid_token") == 3
    assert metric(m, "tss_gateway_events_total", outcome="invalid_request") >= 3
    assert metric(m, "tss_gateway_events_total", outcome="accepted") == 1
