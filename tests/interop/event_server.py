"""A TSS Node event server on Cobo's SDK models (cobo-waas2), in the manner of Cobo's reference
event servers (Go, Java) and written like Cobo's Python callback template (Flask, PyJWT).

POST /v2/event with the form field TSS_JWT_MSG: a JWT verified RS256 with the sender's public key
(here: the gateway's downstream signing key), package_data = base64 of a TSSEvent JSON, parsed
with `cobo_waas2.TSSEvent` and the event data's extra_info with the SDK's ...Extra model. It answers
plain HTTP: 200 accepted, 400 refused (bad token or payload). Every request is recorded as one
JSON line, refusals too, so tests can see what arrived and how many times (and its W3C
`traceparent` header, if any).

    python event_server.py --listen 127.0.0.1:11030 --gateway-pub gateway-requests-pub.key \
        [--name NAME] [--record FILE]
"""

import argparse
import base64
import hashlib
import json
import sys
import threading
import time

import jwt
from cobo_waas2 import (
    TSSEvent,
    TSSKeyGenExtra,
    TSSKeyReshareExtra,
    TSSKeyShareSignExtra,
    TSSKeySignExtra,
)
from flask import Flask, jsonify, request

EXTRA_MODELS = {
    "TSSKeyGenEventData": TSSKeyGenExtra,
    "TSSKeySignEventData": TSSKeySignExtra,
    "TSSKeyReshareEventData": TSSKeyReshareExtra,
    "TSSKeyShareSignEventData": TSSKeyShareSignExtra,
}


def parse_event(package: bytes):
    """The TSSEvent in package, read by the SDK, and a description of it for the record."""
    doc = json.loads(package)
    # The SDK maps a missing event_type to UNKNOWN; Cobo's Go SDK requires the property: so do we.
    if not isinstance(doc, dict) or "event_type" not in doc:
        raise ValueError("not a TSSEvent: no event_type")
    event = TSSEvent.from_json(package.decode())
    entry = {
        "event_id": event.event_id,
        "event_type": event.event_type.value if event.event_type is not None else None,
        "node_id": event.node_id,
        "created_timestamp": event.created_timestamp,
    }
    data = event.data.actual_instance if event.data is not None else None
    if data is not None:
        model = type(data).__name__
        entry.update({
            "model": model,
            "data_type": data.data_type.value if data.data_type is not None else None,
            "request_id": data.request_id,
            "request_type": data.request_type.value if data.request_type is not None else None,
            "request_status": int(data.request_status.value) if data.request_status is not None else None,
        })
        if data.extra_info:
            EXTRA_MODELS[model].from_json(data.extra_info)
    return entry


def create_app(name, gateway_pub, record=None):
    app = Flask(name)
    lock = threading.Lock()

    def write_record(entry):
        if record:
            with lock, open(record, "a") as f:
                f.write(json.dumps(entry) + "\n")

    @app.route("/ping", methods=["GET"])
    def ping():
        return jsonify({"server": name, "timestamp": int(time.time() * 1000)})

    @app.route("/v2/event", methods=["POST"])
    def event():
        raw = request.form.get("TSS_JWT_MSG", "")
        try:
            claims = jwt.decode(raw, gateway_pub, algorithms=["RS256"], options={"require": ["exp"]})
            package = base64.b64decode(claims["package_data"], validate=True)
        except (jwt.PyJWTError, KeyError, ValueError) as e:
            write_record({"server": name, "refused": f"token: {e}"})
            return jsonify(""), 400
        entry = {"server": name, "iss": claims.get("iss"), "sha256": hashlib.sha256(package).hexdigest(),
                 "traceparent": request.headers.get("traceparent")}
        try:
            entry.update(parse_event(package))
        except Exception as e:  # noqa: BLE001 - any parse failure is a refused payload
            entry["refused"] = f"TSSEvent: {e}"
            write_record(entry)
            return jsonify(""), 400
        write_record(entry)
        return jsonify(""), 200

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:11030")
    p.add_argument("--gateway-pub", required=True, help="public key of whoever signs the events (PEM)")
    p.add_argument("--name", default="cobo-python-event-server")
    p.add_argument("--record", help="append one JSON line per request to this file")
    a = p.parse_args(argv)
    with open(a.gateway_pub, "rb") as f:
        gateway_pub = f.read()
    host, port = a.listen.rsplit(":", 1)
    create_app(a.name, gateway_pub, a.record).run(host=host, port=int(port), threaded=True)


if __name__ == "__main__":
    sys.exit(main())
