"""Two gateway processes on one real PostgreSQL (Debian's package, a private cluster started by the
`postgres` fixture): what one replica approved, the other knows; an execution nobody approved
raises the alarm wherever its event lands; each event is delivered once while both run; while the
database is down nothing is approved and no event is accepted, and both recover when it is back."""

import collections
import json
import uuid

import pytest

import tss_node
from harness import SAMPLES, metric, until
from events_world import World, audit_events, backlog, event


@pytest.fixture
def ha(tmp_path, procs, postgres):
    w = World(tmp_path, procs)
    w.pg = postgres
    w.store = postgres.create_db(f"ha_{uuid.uuid4().hex[:12]}")
    w.events = w.event_server("go", "go-siem")
    w.a = w.gateway("gw-a", [(w.events, None)], store=w.store)
    w.b = w.gateway("gw-b", [(w.events, None)], store=w.store)
    return w


def alarms(gw):
    status, body = gw.readyz()
    return body.get("alarms") or []


def unapproved(gw):
    return metric(gw.metrics(), "tss_gateway_unapproved_executions_total")


def callback(w, gw, sample, request_id):
    data = json.loads((SAMPLES / f"{sample}.json").read_bytes())
    data["request_id"] = request_id
    return tss_node.send(gw.check_url, json.dumps(data).encode(), w.node_pri.read_bytes(), w.gw_pub.read_bytes())


def test_the_private_postgres_cluster_stops_and_starts_again(postgres):
    db = f"probe_{uuid.uuid4().hex[:8]}"
    postgres.create_db(db)
    assert postgres.sql("SELECT 1 + 1", db=db).strip() == "2"
    postgres.stop()
    with pytest.raises(RuntimeError):
        postgres.sql("SELECT 1", db=db)
    postgres.start()
    assert postgres.sql("SELECT current_database()", db=db).strip() == db


def test_an_approval_on_one_replica_covers_an_execution_reported_to_the_other(ha):
    ha.approve(ha.a, "key_sign", "req-approved-on-a")
    assert ha.send(ha.b, event("request.keysign.succeeded", "req-approved-on-a")[1]).status_code == 200
    # Never approved by anyone: the alarm, on whichever replica the event reaches.
    never_b, payload = event("request.keysign.succeeded", "req-never-approved-b")
    assert ha.send(ha.b, payload).status_code == 200
    until(30, "replica B raises the alarm",
          lambda: any(a["request_id"] == "req-never-approved-b" for a in alarms(ha.b)))
    never_a, payload = event("request.keygen.succeeded", "req-never-approved-a")
    assert ha.send(ha.a, payload).status_code == 200
    until(30, "replica A raises the alarm",
          lambda: any(a["request_id"] == "req-never-approved-a" for a in alarms(ha.a)))
    [b_alarm] = [a for a in alarms(ha.b) if a["request_id"] == "req-never-approved-b"]
    assert b_alarm["kind"] == "unapproved_execution" and b_alarm["event_id"] == never_b
    [a_alarm] = [a for a in alarms(ha.a) if a["request_id"] == "req-never-approved-a"]
    assert a_alarm["kind"] == "unapproved_execution" and a_alarm["event_id"] == never_a
    # The approved one raised nothing, on either replica; each replica counted its own alarm.
    for gw in (ha.a, ha.b):
        assert not [a for a in alarms(gw) if a["request_id"] == "req-approved-on-a"]
        assert unapproved(gw) == 1, gw.name
    # The alarm is in the audit chain of the replica that raised it.
    for gw, request_id in ((ha.a, "req-never-approved-a"), (ha.b, "req-never-approved-b")):
        recs = [json.loads(line) for line in gw.audit.read_text().splitlines()]
        assert [r["alarm"] for r in recs if isinstance(r.get("alarm"), dict)
                and r["alarm"].get("request_id") == request_id], gw.name


def test_each_event_is_delivered_once_while_both_replicas_run(ha):
    sent = {}
    for i in range(12):
        eid, payload = event("request.keysign.updated", f"req-once-{i}")
        assert ha.send(ha.a if i % 2 else ha.b, payload).status_code == 200
        sent[eid] = payload
    until(60, "every event delivered", lambda: set(ha.events.event_ids()) == set(sent))
    # With the server down, both replicas hold the same undelivered entries and retry them.
    ha.events.stop()
    for i in range(12, 24):
        eid, payload = event("request.keysign.updated", f"req-once-{i}")
        assert ha.send(ha.a if i % 2 else ha.b, payload).status_code == 200
        sent[eid] = payload
    ha.events.start()
    until(90, "every event delivered after the outage", lambda: set(ha.events.event_ids()) == set(sent))
    until(30, "both outboxes empty", lambda: backlog(ha.a) == 0 and backlog(ha.b) == 0)
    counts = collections.Counter(ha.events.event_ids())
    assert {e: n for e, n in counts.items() if n != 1} == {}
    assert set(counts) == set(sent)
    # The gateways agree: between them, one delivery per event.
    delivered = sum(metric(gw.metrics(), "tss_gateway_event_deliveries_total", outcome="delivered")
                    for gw in (ha.a, ha.b))
    assert delivered == len(sent)


def test_with_postgres_down_nothing_is_approved_and_both_recover(ha):
    ha.approve(ha.a, "key_sign", "req-before-outage")
    ha.pg.stop()
    try:
        for gw in (ha.a, ha.b):
            for sample in ("key_sign", "key_gen"):
                status, resp = callback(ha, gw, sample, f"req-outage-{gw.name}-{sample}")
                assert (status, resp.status, resp.action) == (200, 30, "REJECT"), (gw.name, resp)
            until(30, f"{gw.name} not ready", lambda: gw.readyz()[0] == 503)
            assert gw.readyz()[1]["ready"] is False
            eid, payload = event("request.keysign.succeeded", "req-before-outage")
            assert ha.send(gw, payload).status_code == 503
            assert eid not in [e["event_id"] for e in audit_events(gw.audit)]
    finally:
        ha.pg.start()
    for gw in (ha.a, ha.b):
        until(60, f"{gw.name} ready again", lambda: gw.readyz()[0] == 200)
        until(60, f"{gw.name} approves again", lambda: callback(ha, gw, "key_sign", f"req-after-{gw.name}")[1].action
              == "APPROVE")
        eid, payload = event("request.keysign.succeeded", f"req-after-{gw.name}")
        assert ha.send(gw, payload).status_code == 200
        until(30, f"the event accepted by {gw.name} is delivered", lambda: eid in ha.events.event_ids())
    # Only the events accepted after the outage were delivered, and nothing raised an alarm.
    for gw in (ha.a, ha.b):
        assert unapproved(gw) == 0
