"""What the event suites share: keys, an approving callback server, gateways with event servers,
and readers of what the gateway recorded."""

import json

import tss_node
from harness import SAMPLES, Gateway, event_server, keygen, metric, pkcs1_pair, start_downstream


MODELS = {"keygen": "TSSKeyGenEventData", "keysign": "TSSKeySignEventData", "keyreshare": "TSSKeyReshareEventData",
          "keysharesign": "TSSKeyShareSignEventData"}


class World:
    """Keys, an approving callback server, and a way to start gateways and event servers."""

    def __init__(self, tmp_path, procs):
        self.dir, self.procs = tmp_path, procs
        keys = tmp_path / "keys"
        keys.mkdir()
        self.keys = keys
        self.node_pri, self.node_pub = keygen(keys, "tss-node-callback")
        # The node's event key is a pair of its own (`event key create`): here made by Python.
        self.event_pri, self.event_pub = pkcs1_pair(keys, "tss-node-event")
        self.gw_pri, self.gw_pub = keygen(keys, "gateway")
        # Event servers and callback servers hold the public half of this one, not of gateway_private_key.
        self.req_pri, self.req_pub = keygen(keys, "gateway-requests")
        a_pri, self.approver_pub = keygen(keys, "approver")
        self.approver_url, _ = start_downstream(procs, a_pri, self.req_pub, "approver")

    def event_server(self, lang, name, start=True):
        return event_server(self.procs, lang, self.req_pub, self.dir, name, start=start)

    def gateway(self, name, servers, store=None, extra=()):
        """servers: [(EventServer, event_types or None)]."""
        lines = ["service_name: events-gateway", f"tss_node_public_key: {self.node_pub}",
                 f"gateway_private_key: {self.gw_pri}", f"downstream_signing_key: {self.req_pri}",
                 f"tss_node_event_public_key: {self.event_pub}", "health_check_interval_ms: 0",
                 f"audit_log: {self.dir / (name + '-audit.jsonl')}",
                 f"state_store: {store or self.dir / (name + '-state.db')}", *extra,
                 "callback_servers:", "  - name: approver", f"    service_address: {self.approver_url}",
                 f"    pubkey_path: {self.approver_pub}", "    timeout_ms: 3000", "    retries: 0"]
        if servers:
            lines.append("event_servers:")
        for s, types in servers:
            lines += [f"  - name: {s.name}", f"    service_address: {s.url}", "    timeout_ms: 3000"]
            if types:
                lines.append(f"    event_types: [{', '.join(types)}]")
        gw = Gateway(self.procs, self.dir, name, lines)
        gw.audit = self.dir / f"{name}-audit.jsonl"
        return gw.start()

    def send(self, gw, payload, token=None):
        return tss_node.send_event(gw.event_url, payload, self.event_pri.read_bytes(), token=token)

    def approve(self, gw, sample, request_id):
        data = json.loads((SAMPLES / f"{sample}.json").read_bytes())
        data["request_id"] = request_id
        status, resp = tss_node.send(gw.check_url, json.dumps(data).encode(), self.node_pri.read_bytes(),
                                     self.gw_pub.read_bytes())
        assert (status, resp.status, resp.action) == (200, 0, "APPROVE"), resp
        return resp


def audit_events(path):
    """The `event` records of an audit file: {event_id, event_type, node_id, request_id, request_type}."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        if isinstance(rec.get("event"), dict):
            out.append(rec["event"])
    return out


def backlog(gw):
    return metric(gw.metrics(), "tss_gateway_event_backlog")


def event(event_type, request_id=None):
    payload = tss_node.make_event(event_type, request_id)
    return json.loads(payload)["event_id"], payload
