"""The peers themselves, and the Go callback server through the gateway.

The event servers (Python on `cobo_waas2.TSSEvent`, Go on the Go SDK's `TSSEvent`) are called
directly with tokens signed here, so that the suites built on them can trust what they record. The
Go callback server decodes requests with encoding/json as Cobo's Go template does; it shows that a
`Request_Type` key is read as `request_type` by the real Go decoder, and that the gateway refuses
such a payload (status 10) without calling it."""

import base64
import hashlib
import json

import subprocess
import time

import jwt
import pytest
import requests
from cobo_waas2 import TSSCallbackRequest

import tss_node
from harness import (SAMPLES, event_server, free_port, gateway_bin, keygen, pkcs1_pair, start_downstream,
                     start_go_callback, wait_http)


@pytest.fixture(params=["python", "go"])
def lang(request):
    return request.param


def test_an_event_server_accepts_a_signed_tssevent_and_refuses_bad_input(tmp_path, procs, lang):
    signer, signer_pub = keygen(tmp_path, "signer")
    other, _ = pkcs1_pair(tmp_path, "other")
    server = event_server(procs, lang, signer_pub, tmp_path, f"{lang}-events")
    good = tss_node.make_event("request.keysign.succeeded", "direct-1")
    r = tss_node.send_event(server.url, good, signer.read_bytes())
    assert r.status_code == 200, r.text
    [rec] = server.records()
    assert rec["event_id"] == json.loads(good)["event_id"]
    assert rec["event_type"] == "request.keysign.succeeded"
    assert rec["request_id"] == "direct-1"
    assert rec["model"] == "TSSKeySignEventData"
    assert rec["request_status"] == 190
    assert rec["request_type"] == "KeySign"
    assert rec["sha256"] == hashlib.sha256(good).hexdigest()

    expired = jwt.encode({"package_data": base64.b64encode(good).decode(), "exp": int(time.time()) - 120},
                         signer.read_bytes(), algorithm="RS256")
    bad = {
        "wrong key": tss_node.make_token(good, other.read_bytes()),
        "expired": expired,
        "not a TSSEvent": tss_node.make_token(b'{"request_id": "x", "request_type": 2}', signer.read_bytes()),
        "not JSON": tss_node.make_token(b"\x00not json", signer.read_bytes()),
    }
    for what, token in bad.items():
        r = tss_node.send_event(server.url, good, token=token)
        assert r.status_code == 400, what
    assert requests.post(server.url, data={}, timeout=10).status_code == 400  # no TSS_JWT_MSG
    recs = server.records()
    assert len(recs) == 2 + len(bad)
    assert all("refused" in r for r in recs[1:]), recs


def test_the_go_decoder_reads_a_case_variant_key_the_python_sdk_does_not(tmp_path, procs):
    """Called directly (the key it trusts signs the token), Cobo's Go template decoding reads
    `Request_Type` into request_type: a KeySign where a strict reader sees a Ping."""
    node, node_pub = keygen(tmp_path, "node")
    s_pri, s_pub = pkcs1_pair(tmp_path, "go-server")
    url, record = start_go_callback(procs, s_pri, node_pub, "go-direct")
    data = json.loads((SAMPLES / "key_sign.json").read_bytes())
    payload = json.dumps({"request_id": "case-direct", "request_type": 0, "Request_Type": 2,
                          "request_detail": data["request_detail"], "extra_info": data["extra_info"]}).encode()
    assert TSSCallbackRequest.from_json(payload.decode()).request_type == 0  # Python SDK: a Ping
    status, resp = tss_node.send(url, payload, node.read_bytes(), s_pub.read_bytes())
    assert (status, resp.status, resp.action) == (200, 0, "APPROVE")
    [rec] = [json.loads(line) for line in record.read_text().splitlines()]
    assert rec["request_id"] == "case-direct"
    assert rec["request_type"] == 2  # Go: a KeySign


@pytest.fixture
def go_world(tmp_path, procs):
    keys = tmp_path / "keys"
    keys.mkdir()
    node_pri, node_pub = pkcs1_pair(keys, "tss-node")
    gw_pri, gw_pub = keygen(keys, "gateway")
    py_pri, py_pub = keygen(keys, "python-approver")
    go_pri, go_pub = keygen(keys, "go-server")
    py_url, _ = start_downstream(procs, py_pri, gw_pub, "python-approver", body_form="raw")

    def start(policy):
        go_url, go_rec = start_go_callback(procs, go_pri, gw_pub, f"go-{policy}", policy=policy)
        port = free_port()
        lines = [f"listen: 127.0.0.1:{port}", "service_name: interop-gateway",
                 f"tss_node_public_key: {node_pub}", f"gateway_private_key: {gw_pri}",
                 "health_check_interval_ms: 0", "callback_servers:"]
        for name, url, pub in [("python-approver", py_url, py_pub), (f"go-{policy}", go_url, go_pub)]:
            lines += [f"  - name: {name}", f"    service_address: {url}", f"    pubkey_path: {pub}",
                      "    timeout_ms: 3000", "    retries: 0"]
        config = tmp_path / f"gateway-{policy}.yaml"
        config.write_text("\n".join(lines) + "\n")
        check = subprocess.run([gateway_bin(), "check-config", "-c", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        procs.start([gateway_bin(), "run", "-c", str(config)])
        wait_http(f"http://127.0.0.1:{port}/healthz")
        return f"http://127.0.0.1:{port}/v2/check", go_rec

    class W:
        pass

    w = W()
    w.start, w.node_key, w.gw_pub = start, node_pri.read_bytes(), gw_pub.read_bytes()
    return w


def go_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_go_callback_server_approves_through_the_gateway(go_world):
    url, rec = go_world.start("approve")
    for name in ["key_gen", "key_sign", "key_reshare", "key_share_sign"]:
        payload = (SAMPLES / f"{name}.json").read_bytes()
        status, resp = tss_node.send(url, payload, go_world.node_key, go_world.gw_pub)
        assert (status, resp.status, resp.action) == (200, 0, "APPROVE"), resp
        [r] = [r for r in go_records(rec) if r.get("request_id") == resp.request_id]
        # The node's exact bytes, re-signed by the gateway, read by the Go SDK model.
        assert r["sha256"] == hashlib.sha256(payload).hexdigest()
        assert r["iss"] == "interop-gateway"
        assert r["request_type"] == json.loads(payload)["request_type"]


def test_a_go_callback_server_rejection_is_a_status_0_reject_naming_it(go_world):
    url, rec = go_world.start("reject")
    status, resp = tss_node.send(url, (SAMPLES / "key_sign.json").read_bytes(), go_world.node_key, go_world.gw_pub)
    assert (status, resp.status, resp.action) == (200, 0, "REJECT")
    assert resp.error.startswith("go-reject: go policy rejects everything"), resp.error


def test_a_case_variant_key_is_refused_before_the_go_server_sees_it(go_world):
    url, rec = go_world.start("approve")
    data = json.loads((SAMPLES / "key_sign.json").read_bytes())
    for request_id, doc in {
        # A Ping to the gateway's exact-key reading, a KeySign to Go's.
        "case-ping-keysign": {"request_id": "case-ping-keysign", "request_type": 0, "Request_Type": 2,
                              "request_detail": data["request_detail"], "extra_info": data["extra_info"]},
        "case-only-variant": {"request_id": "case-only-variant", "Request_Type": 2,
                              "request_detail": data["request_detail"], "extra_info": data["extra_info"]},
        "case-detail": {"request_id": "case-detail", "request_type": 2, "request_detail": data["request_detail"],
                        "Extra_Info": data["extra_info"]},
    }.items():
        status, resp = tss_node.send(url, json.dumps(doc).encode(), go_world.node_key, go_world.gw_pub)
        assert (status, resp.status, resp.action) == (200, 10, "REJECT"), (request_id, resp)
    # The gateway answers only once it has decided: nothing was forwarded, health checks are off.
    assert go_records(rec) == []
