"""Interoperability: the gateway between a Python TSS Node client and Python callback servers built
on Cobo's SDK models (cobo-waas2), PyJWT and Flask. Nothing here shares code with the gateway; keys
cross the boundary in all four PEM forms."""

import hashlib
import json
import subprocess

import jwt
import pytest

from harness import SAMPLES, free_port, gateway_bin, keygen, pkcs1_pair, start_downstream, wait_http
import downstream_server
import tss_node

WHITELISTED = "0x2222222222222222222222222222222222222222"


@pytest.fixture
def world(tmp_path, procs):
    keys = tmp_path / "keys"
    keys.mkdir()
    # The node and one downstream use PKCS#1 keys made by Python; the rest come from `keygen`
    # (PKCS#8 private, SPKI public).
    node_pri, node_pub = pkcs1_pair(keys, "tss-node")
    gw_pri, gw_pub = keygen(keys, "gateway")
    a_pri, a_pub = keygen(keys, "raw-approver")
    b_pri, b_pub = pkcs1_pair(keys, "json-approver")
    c_pri, c_pub = keygen(keys, "whitelist")
    a_url, a_rec = start_downstream(procs, a_pri, gw_pub, "raw-approver", body_form="raw")
    b_url, b_rec = start_downstream(procs, b_pri, gw_pub, "json-approver", body_form="json")
    c_url, c_rec = start_downstream(procs, c_pri, gw_pub, "whitelist", policy="whitelist", whitelist=[WHITELISTED])

    def start_gateway(servers):
        port = free_port()
        lines = [f"listen: 127.0.0.1:{port}", "service_name: interop-gateway",
                 f"tss_node_public_key: {node_pub}", f"gateway_private_key: {gw_pri}",
                 "health_check_interval_ms: 0", "callback_servers:"]
        for name, url, pub in servers:
            lines += [f"  - name: {name}", f"    service_address: {url}", f"    pubkey_path: {pub}",
                      "    timeout_ms: 3000", "    retries: 0"]
        config = tmp_path / f"gateway-{port}.yaml"
        config.write_text("\n".join(lines) + "\n")
        check = subprocess.run([gateway_bin(), "check-config", "-c", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        procs.start([gateway_bin(), "run", "-c", str(config)])
        wait_http(f"http://127.0.0.1:{port}/healthz")
        return f"http://127.0.0.1:{port}/v2/check"

    class World:
        pass

    w = World()
    w.node_key = node_pri.read_bytes()
    w.gw_pub = gw_pub.read_bytes()
    w.start_gateway = start_gateway
    w.servers = {"raw-approver": (a_url, a_pub, a_rec), "json-approver": (b_url, b_pub, b_rec),
                 "whitelist": (c_url, c_pub, c_rec)}
    w.keys = keys
    return w


def records(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def sample(name, request_id=None, **extra_edit):
    data = json.loads((SAMPLES / f"{name}.json").read_bytes())
    if request_id:
        data["request_id"] = request_id
    return data


def test_every_sample_is_approved_and_reaches_the_cobo_servers_byte_for_byte(world):
    url = world.start_gateway([(n, u, p) for n, (u, p, _) in world.servers.items() if n != "whitelist"])
    for name in ["ping", "key_gen", "key_sign", "key_reshare", "key_share_sign"]:
        payload = (SAMPLES / f"{name}.json").read_bytes()
        status, resp = tss_node.send(url, payload, world.node_key, world.gw_pub)
        assert status == 200
        assert (resp.status, resp.action) == (0, "APPROVE"), resp
        assert resp.request_id == json.loads(payload)["request_id"]
        for server in ["raw-approver", "json-approver"]:
            rec = [r for r in records(world.servers[server][2]) if r.get("request_id") == resp.request_id]
            assert len(rec) == 1, (server, name)
            # The gateway forwarded the node's exact bytes, re-signed with its own key ...
            assert rec[0]["sha256"] == hashlib.sha256(payload).hexdigest()
            assert rec[0]["iss"] == "interop-gateway"
            # ... and the server parsed them with Cobo's SDK models.
            if name != "ping":
                assert rec[0]["model"].startswith("TSSKey"), rec[0]


def test_a_cobo_server_rejection_is_a_status_0_reject_naming_it(world):
    url = world.start_gateway([(n, u, p) for n, (u, p, _) in world.servers.items()])
    status, resp = tss_node.send(url, (SAMPLES / "key_sign.json").read_bytes(), world.node_key, world.gw_pub)
    assert (resp.status, resp.action) == (0, "REJECT")
    assert resp.error.startswith("whitelist: destination 0x1111"), resp.error
    # The same task to a whitelisted address is approved by all three.
    data = json.loads((SAMPLES / "key_sign.json").read_bytes())
    extra = json.loads(data["extra_info"])
    extra["transaction"]["destination"]["account_output"]["address"] = WHITELISTED
    data["extra_info"] = json.dumps(extra)
    data["request_id"] = "interop-whitelisted"
    status, resp = tss_node.send(url, json.dumps(data).encode(), world.node_key, world.gw_pub)
    assert (resp.status, resp.action) == (0, "APPROVE"), resp


def test_a_server_that_refuses_the_gateway_token_fails_the_request(world, procs):
    # This server was given the wrong public key for the gateway: it answers HTTP 400 with a
    # signed status-20 body, as Cobo's reference servers do.
    wrong_pri, wrong_pub = keygen(world.keys, "not-the-gateway")
    d_pri, d_pub = keygen(world.keys, "misconfigured")
    d_url, d_rec = start_downstream(procs, d_pri, wrong_pub, "misconfigured")
    a_url, a_pub, _ = world.servers["raw-approver"]
    url = world.start_gateway([("raw-approver", a_url, a_pub), ("misconfigured", d_url, d_pub)])
    status, resp = tss_node.send(url, (SAMPLES / "key_gen.json").read_bytes(), world.node_key, world.gw_pub)
    assert (resp.status, resp.action) == (30, "REJECT")
    assert "misconfigured: error_status: status 20" in resp.error, resp.error


def test_a_stopped_server_fails_the_request(world):
    port = free_port()  # nothing listens here
    a_url, a_pub, _ = world.servers["raw-approver"]
    url = world.start_gateway([("raw-approver", a_url, a_pub), ("stopped", f"http://127.0.0.1:{port}/v2/check", a_pub)])
    status, resp = tss_node.send(url, (SAMPLES / "key_reshare.json").read_bytes(), world.node_key, world.gw_pub)
    assert (resp.status, resp.action) == (30, "REJECT")
    assert "stopped: transport_error" in resp.error, resp.error


def test_a_token_the_node_did_not_sign_is_status_20(world):
    url = world.start_gateway([(n, u, p) for n, (u, p, _) in world.servers.items() if n != "whitelist"])
    intruder, _ = keygen(world.keys, "intruder")
    payload = (SAMPLES / "key_sign.json").read_bytes()
    token = tss_node.make_token(payload, intruder.read_bytes())
    status, resp = tss_node.send(url, payload, world.node_key, world.gw_pub, token=token)
    assert (status, resp.status, resp.action) == (200, 20, "REJECT")
    # HS256 keyed with the node's public key: the classic confusion attack.
    pub = (world.keys / "tss-node-pub-pkcs1.key").read_bytes()
    forged = jwt.api_jws.PyJWS()
    forged._algorithms["HS256"].prepare_key = lambda k: k  # PyJWT refuses PEM keys for HMAC otherwise
    claims = json.dumps({"package_data": __import__("base64").b64encode(payload).decode(), "exp": 4102444800})
    hs = forged.encode(claims.encode(), pub, algorithm="HS256")
    status, resp = tss_node.send(url, payload, world.node_key, world.gw_pub, token=hs)
    assert (resp.status, resp.action) == (20, "REJECT")
    assert "RS256" in resp.error


def test_the_python_client_and_server_agree_without_the_gateway(tmp_path, procs):
    """The harness itself: the Python TSS Node talks straight to a Cobo-style server."""
    keys = tmp_path
    node_pri, node_pub = pkcs1_pair(keys, "node")
    s_pri, s_pub = pkcs1_pair(keys, "server")
    url, _ = start_downstream(procs, s_pri, node_pub, "direct", body_form="json")
    status, resp = tss_node.send(url, (SAMPLES / "key_sign.json").read_bytes(), node_pri.read_bytes(), s_pub.read_bytes())
    assert (status, resp.status, resp.action) == (200, 0, "APPROVE")


def test_probe_talks_to_a_cobo_server_directly(tmp_path, procs):
    """The gateway's own TSS-Node side (`probe`) against a Cobo-style server."""
    node_pri, node_pub = keygen(tmp_path, "node")
    s_pri, s_pub = pkcs1_pair(tmp_path, "server")
    url, _ = start_downstream(procs, s_pri, node_pub, "direct", policy="reject")
    out = subprocess.run([gateway_bin(), "probe", "--url", url, "--key", str(node_pri), "--server-pub", str(s_pub),
                          "--type", "key_gen"], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["error"] == "policy rejects everything"


def test_the_server_module_has_the_cobo_models():
    assert downstream_server.MODELS, "cobo-waas2 models loaded"
