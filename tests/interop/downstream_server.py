"""A Cobo-style downstream callback server, written on Cobo's own SDK models (cobo-waas2).

It follows Cobo's Python callback template: Flask, POST /v2/check (and /v1/check) with the form
field TSS_JWT_MSG, a JWT verified RS256 with the caller's public key (here: the gateway's),
package_data = base64 of a TSSCallbackRequest, and an answer JWT signed RS256 with this server's
own key whose package_data is a TSSCallbackResponse.

    python downstream_server.py --listen 127.0.0.1:11021 --key risk-pri.pem \
        --gateway-pub gateway-pub.key [--policy approve|reject|whitelist] [--whitelist ADDR ...] \
        [--body-form raw|json] [--name NAME] [--record FILE] [--delay-ms MS]

Each record also holds the request's W3C `traceparent` header (None without one).
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
    TSSCallbackActionType,
    TSSCallbackRequest,
    TSSCallbackRequestType,
    TSSCallbackResponse,
    TSSKeyGenExtra,
    TSSKeyGenRequest,
    TSSKeyReshareExtra,
    TSSKeyReshareRequest,
    TSSKeyShareSignExtra,
    TSSKeyShareSignRequest,
    TSSKeySignExtra,
    TSSKeySignRequest,
)
from flask import Flask, Response, jsonify, request

STATUS_OK, STATUS_INVALID_REQUEST, STATUS_INVALID_TOKEN, STATUS_INTERNAL_ERROR = 0, 10, 20, 30

MODELS = {
    TSSCallbackRequestType.KEYGEN: (TSSKeyGenRequest, TSSKeyGenExtra),
    TSSCallbackRequestType.KEYSIGN: (TSSKeySignRequest, TSSKeySignExtra),
    TSSCallbackRequestType.KEYRESHARE: (TSSKeyReshareRequest, TSSKeyReshareExtra),
    TSSCallbackRequestType.KEYSHARESIGN: (TSSKeyShareSignRequest, TSSKeyShareSignExtra),
}


def destination_addresses(extra):
    """Destination addresses of a KeySign's transaction, read through the SDK models."""
    tx = getattr(extra, "transaction", None)
    dest = getattr(tx, "destination", None)
    inner = getattr(dest, "actual_instance", dest)
    out = []
    account = getattr(inner, "account_output", None)
    if account is not None and account.address:
        out.append(account.address)
    for utxo in getattr(inner, "utxo_outputs", None) or []:
        if utxo.address:
            out.append(utxo.address)
    return out


def create_app(name, private_key, gateway_pub, policy="approve", whitelist=(), body_form="raw", record=None,
               delay_ms=0):
    app = Flask(name)
    lock = threading.Lock()

    def sign(resp: TSSCallbackResponse):
        claims = {
            "package_data": base64.b64encode(resp.to_json().encode()).decode(),
            "iss": name,
            "exp": int(time.time()) + 120,
        }
        return jwt.encode(claims, private_key, algorithm="RS256")

    def answer(resp, http_status=200):
        token = sign(resp)
        if body_form == "json":
            return Response(json.dumps(token), status=http_status, mimetype="application/json")
        return Response(token, status=http_status, mimetype="text/plain")

    def write_record(entry):
        if record:
            with lock, open(record, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def decide(req: TSSCallbackRequest):
        if req.request_type == TSSCallbackRequestType.PING:
            return TSSCallbackActionType.APPROVE, "", None
        models = MODELS.get(req.request_type)
        if models is None:
            return TSSCallbackActionType.REJECT, f"unsupported request_type {req.request_type}", None
        detail = models[0].from_json(req.request_detail)
        extra = models[1].from_json(req.extra_info) if req.extra_info else None
        parsed = type(detail).__name__
        if policy == "reject":
            return TSSCallbackActionType.REJECT, "policy rejects everything", parsed
        if policy == "whitelist" and req.request_type == TSSCallbackRequestType.KEYSIGN:
            addresses = destination_addresses(extra)
            if not addresses:
                return TSSCallbackActionType.REJECT, "no destination address", parsed
            for a in addresses:
                if a not in whitelist:
                    return TSSCallbackActionType.REJECT, f"destination {a} is not whitelisted", parsed
        return TSSCallbackActionType.APPROVE, "", parsed

    @app.route("/ping", methods=["GET"])
    def ping():
        return jsonify({"server": name, "timestamp": int(time.time() * 1000)})

    @app.route("/v1/check", methods=["POST"])
    @app.route("/v2/check", methods=["POST"])
    def check():
        if delay_ms:
            time.sleep(delay_ms / 1000)
        raw = request.form.get("TSS_JWT_MSG", "")
        try:
            claims = jwt.decode(raw, gateway_pub, algorithms=["RS256"], options={"require": ["exp"]})
        except jwt.PyJWTError as e:
            write_record({"error": f"token: {e}"})
            # Like Cobo's reference servers: HTTP 400 with a signed status-20 body.
            return answer(TSSCallbackResponse(request_id="", status=STATUS_INVALID_TOKEN,
                                              action=TSSCallbackActionType.REJECT, error=str(e)), 400)
        package = base64.b64decode(claims["package_data"])
        try:
            req = TSSCallbackRequest.from_json(package.decode())
        except Exception as e:  # noqa: BLE001 - any parse failure is an invalid request
            return answer(TSSCallbackResponse(request_id="", status=STATUS_INVALID_REQUEST,
                                              action=TSSCallbackActionType.REJECT, error=str(e)), 400)
        try:
            action, error, parsed = decide(req)
        except Exception as e:  # noqa: BLE001
            return answer(TSSCallbackResponse(request_id=req.request_id, status=STATUS_INVALID_REQUEST,
                                              action=TSSCallbackActionType.REJECT, error=f"detail: {e}"))
        write_record({
            "request_id": req.request_id,
            "request_type": int(req.request_type.value) if hasattr(req.request_type, "value") else req.request_type,
            "sha256": hashlib.sha256(package).hexdigest(),
            "iss": claims.get("iss"),
            "model": parsed,
            "action": action.value,
            "traceparent": request.headers.get("traceparent"),
        })
        return answer(TSSCallbackResponse(request_id=req.request_id, status=STATUS_OK, action=action, error=error))

    return app


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:11021")
    p.add_argument("--key", required=True, help="this server's private key (PEM)")
    p.add_argument("--gateway-pub", required=True, help="the gateway's public key (PEM)")
    p.add_argument("--policy", choices=["approve", "reject", "whitelist"], default="approve")
    p.add_argument("--whitelist", nargs="*", default=[])
    p.add_argument("--body-form", choices=["raw", "json"], default="raw")
    p.add_argument("--name", default="cobo-python-server")
    p.add_argument("--record", help="append one JSON line per accepted request to this file")
    p.add_argument("--delay-ms", type=int, default=0, help="wait this long before answering")
    a = p.parse_args(argv)
    with open(a.key, "rb") as f:
        private_key = f.read()
    with open(a.gateway_pub, "rb") as f:
        gateway_pub = f.read()
    host, port = a.listen.rsplit(":", 1)
    app = create_app(a.name, private_key, gateway_pub, a.policy, a.whitelist, a.body_form, a.record, a.delay_ms)
    app.run(host=host, port=int(port), threaded=True)


if __name__ == "__main__":
    sys.exit(main())
