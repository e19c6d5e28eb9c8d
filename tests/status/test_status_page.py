"""The status page in a real browser: the gateway binary runs with Cobo-SDK peers (an enforcing
callback server that is up, one that is down, a shadow one, an event server), a simulated TSS Node
sends signed requests and an event for a task it never got approved, and Debian's headless
Chromium (driven by playwright-core, `status_page.js`) opens `/status` at a desktop and a phone
viewport. What it shows is asserted here; the screenshots stay in $ARTIFACTS_DIR."""

import json
import os
import pathlib
import shutil
import subprocess

import pytest
import requests

import tss_node
from harness import ROOT, SAMPLES, Gateway, event_server, free_port, keygen, pkcs1_pair, start_downstream, until

HERE = pathlib.Path(__file__).resolve().parent
SECRET = "hunter2-status"
SCRIPT_ID = "<script>alert('x')</script>"


def artifacts_dir():
    return pathlib.Path(os.environ.get("ARTIFACTS_DIR", ROOT / "target" / "test-artifacts"))


def browse(url):
    """Runs status_page.js on url: what the browser saw, as a dict."""
    if not (HERE / "node_modules" / "playwright-core").exists():
        pytest.fail("playwright-core missing: run `npm ci --prefix tests/status` (scripts/test.sh does)")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which(chromium):
        pytest.fail(f"{chromium} not found: install Debian's chromium (scripts/test.sh does)")
    out = subprocess.run(["node", str(HERE / "status_page.js"), url, str(artifacts_dir())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def sample(name, request_id):
    data = json.loads((SAMPLES / f"{name}.json").read_bytes())
    data["request_id"] = request_id
    return json.dumps(data).encode()


@pytest.fixture
def world(tmp_path, procs):
    keys = tmp_path / "keys"
    keys.mkdir()
    node_pri, node_pub = keygen(keys, "tss-node-callback")
    event_pri, event_pub = pkcs1_pair(keys, "tss-node-event")
    gw_pri, gw_pub = keygen(keys, "gateway")
    req_pri, req_pub = keygen(keys, "gateway-requests")
    risk_pri, risk_pub = keygen(keys, "risk")
    shadow_pri, shadow_pub = keygen(keys, "shadow")
    gone_pub = keygen(keys, "gone")[1]
    risk_url, _ = start_downstream(procs, risk_pri, req_pub, "risk")
    shadow_url, _ = start_downstream(procs, shadow_pri, req_pub, "shadow", policy="reject")
    siem = event_server(procs, "python", req_pub, tmp_path, "siem")
    with_secret = lambda u: u.replace("http://", f"http://ops:{SECRET}@")  # noqa: E731
    admin = free_port()
    lines = [
        "service_name: status-gateway", f"tss_node_public_key: {node_pub}", f"gateway_private_key: {gw_pri}",
        f"downstream_signing_key: {req_pri}", f"tss_node_event_public_key: {event_pub}",
        f"admin_listen: 127.0.0.1:{admin}", "health_check_interval_ms: 300",
        f"audit_log: {tmp_path / 'audit.jsonl'}", f"state_store: {tmp_path / 'state.db'}",
        "callback_servers:",
        "  - name: risk", f"    service_address: {with_secret(risk_url)}", f"    pubkey_path: {risk_pub}",
        "    timeout_ms: 3000",
        # Down (a closed port), and asked only about KeyGen: KeySign is still decided by risk.
        "  - name: gone", f"    service_address: http://127.0.0.1:{free_port()}/v2/check",
        f"    pubkey_path: {gone_pub}", "    timeout_ms: 1000", "    retries: 0", "    request_types: [key_gen]",
        "  - name: shadow", f"    service_address: {shadow_url}", f"    pubkey_path: {shadow_pub}",
        "    mode: shadow", "    timeout_ms: 3000",
        "event_servers:", "  - name: siem", f"    service_address: {with_secret(siem.url)}", "    timeout_ms: 3000",
    ]
    gw = Gateway(procs, tmp_path, "gw", lines)
    gw.admin = f"http://127.0.0.1:{admin}"
    gw.start()
    until(30, "admin_listen up", lambda: _get(f"{gw.admin}/healthz") == 200)

    def send(name, request_id):
        return tss_node.send(gw.check_url, sample(name, request_id), node_pri.read_bytes(), gw_pub.read_bytes())

    def send_event(payload):
        return tss_node.send_event(gw.event_url, payload, event_pri.read_bytes())

    return {"gw": gw, "send": send, "send_event": send_event, "siem": siem, "dir": tmp_path}


def _get(url):
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return None


def test_the_status_page_in_a_browser_shows_health_decisions_and_alarms_and_nothing_secret(world):
    gw, siem = world["gw"], world["siem"]
    # Decisions: a KeySign approved (its request_id is markup), a KeyGen failed by the down server.
    status, resp = world["send"]("key_sign", SCRIPT_ID)
    assert (status, resp.status, resp.action) == (200, 0, "APPROVE"), resp
    status, resp = world["send"]("key_gen", "keygen-needs-gone")
    assert (resp.status, resp.action) == (30, "REJECT") and "gone" in resp.error, resp
    # Executed without approval: an alarm.
    payload = tss_node.make_event("request.keysign.succeeded", "never-approved-req")
    event_id = json.loads(payload)["event_id"]
    assert world["send_event"](payload).status_code == 200
    until(30, "the event at siem", lambda: event_id in siem.event_ids())

    def health_known():
        servers = requests.get(f"{gw.admin}/readyz", timeout=5).json()["servers"]
        return all(s["health"] is not None for s in servers)
    until(30, "every server health-checked", health_known)

    # Served on admin_listen only.
    assert _get(f"{gw.base}/status") == 404
    seen = browse(f"{gw.admin}/status")
    url = f"{gw.admin}/status"

    assert seen["status"] == 200
    assert seen["headers"]["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in seen["headers"]["content-security-policy"]
    assert seen["headers"]["cache-control"] == "no-store"
    # Nothing but the page itself was fetched: no CDN, no script, no font, no favicon elsewhere.
    assert set(seen["requests"]) == {url}, seen["requests"]
    assert not seen["consoleErrors"], seen["consoleErrors"]

    d = seen["desktop"]
    assert d["scripts"] == 0, "the page runs no script"
    assert d["readiness"] == "ready"
    servers = {r["server"]: r for r in d["servers"]}
    assert servers.keys() == {"risk", "gone", "shadow"}
    assert servers["gone"]["health"] == "down", servers["gone"]
    assert "down" in servers["gone"]["cells"]["Health"] and "transport_error" in servers["gone"]["cells"]["Health"]
    assert servers["risk"]["health"] == "up", servers["risk"]
    assert servers["risk"]["cells"]["Mode"] == "enforce" and servers["shadow"]["cells"]["Mode"] == "shadow"
    assert servers["gone"]["cells"]["Request types"] == "key_gen"
    # risk approved both the KeySign and the KeyGen (which failed on gone).
    assert "approved 2" in servers["risk"]["cells"]["Outcomes, 5 min"], servers["risk"]
    assert "http://***@127.0.0.1" in servers["risk"]["cells"]["Address"]
    events = {r["server"]: r for r in d["eventServers"]}
    assert events["siem"]["health"] == "up" and "delivered" in events["siem"]["cells"]["Last delivery"]
    assert events["siem"]["cells"]["Backlog"] == "0", events["siem"]
    assert "http://***@127.0.0.1" in events["siem"]["cells"]["Address"]

    # The decisions, newest first; the request_id shown as the text it is.
    rows = [r["cells"] for r in d["decisions"]]
    assert len(rows) == 2, rows
    first, second = rows
    assert (first["request_id"], first["Decision"]) == ("keygen-needs-gone", "REJECT"), first
    assert first["Status"].startswith("30") and "gone: transport_error" in first["Failing server / reason"], first
    assert (second["request_id"], second["Type"], second["Decision"]) == (SCRIPT_ID, "key_sign", "APPROVE"), second
    assert "<script>" not in d["html"].split("<body", 1)[1].replace("&lt;script&gt;", "")

    # The alarm: shown, prominent and red.
    assert d["alarms"]["isSection"], d["alarms"]
    assert "ALARM" in d["alarms"]["text"] and "never-approved-req" in d["alarms"]["text"], d["alarms"]
    r, g, b = (int(x) for x in d["alarms"]["color"][4:-1].split(",")[:3])
    assert r > 150 and g < 80 and b < 80, d["alarms"]["color"]

    assert d["generation"] == "1"
    assert len(d["configSha256"]) == 64
    assert int(d["auditSeq"]) >= 1
    # Refreshes itself: the meta refresh, and a reload observed.
    assert d["refresh"] == "5"
    assert seen["reloaded"], "the page did not reload itself within 12 s"

    # Nothing secret anywhere in what the browser got.
    for text in (d["html"], d["bodyText"]):
        assert SECRET not in text
        assert "BEGIN" not in text
        assert "eyJ" not in text

    # A phone: the page fits the width; only the tables scroll sideways, inside their boxes.
    ph = seen["phone"]
    assert ph["viewport"] == 390
    assert ph["pageScrollWidth"] <= ph["viewport"], ph
    assert all(s["overflowX"] == "auto" and s["right"] <= ph["viewport"] + 1 for s in ph["scrollers"]), ph
    assert any(s["scrollWidth"] > s["clientWidth"] for s in ph["scrollers"]), "wide tables scroll in their box"
    assert seen["phoneAlarmsVisible"], "the alarm is on the first screen of a phone"
    for shot in seen["screenshots"]:
        assert pathlib.Path(shot).stat().st_size > 10_000, shot
