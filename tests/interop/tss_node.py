"""Plays a Cobo TSS Node toward a callback server: sign a CallbackRequest RS256 with the node's
key, POST it as the TSS_JWT_MSG form field, accept either answer body form, verify the answer with
the server's public key and check its request_id.

    python tss_node.py --url http://127.0.0.1:11020/v2/check --key tss-node-pri.pem \
        --server-pub gateway-pub.key --fixture config/samples/key_sign.json
"""

import argparse
import base64
import json
import pathlib
import sys
import time
import uuid

import jwt
import requests
from cobo_waas2 import (
    TSSCallbackRequest,
    TSSCallbackResponse,
    TSSEvent,
    TSSEventData,
    TSSEventDataType,
    TSSEventType,
    TSSKeyGenEventData,
    TSSKeyGenRequest,
    TSSKeyReshareEventData,
    TSSKeyReshareRequest,
    TSSKeyShareSignEventData,
    TSSKeyShareSignRequest,
    TSSKeySignEventData,
    TSSKeySignRequest,
    TSSRequestTypeEenum,
    TSSStatus,
)

SAMPLES = pathlib.Path(__file__).resolve().parents[2] / "config" / "samples"

# Event kind -> (event data model, request detail model, data_type, sample CallbackRequest)
EVENT_KINDS = {
    "keygen": (TSSKeyGenEventData, TSSKeyGenRequest, TSSEventDataType.KEYGEN, "key_gen"),
    "keysign": (TSSKeySignEventData, TSSKeySignRequest, TSSEventDataType.KEYSIGN, "key_sign"),
    "keyreshare": (TSSKeyReshareEventData, TSSKeyReshareRequest, TSSEventDataType.KEYRESHARE, "key_reshare"),
    "keysharesign": (TSSKeyShareSignEventData, TSSKeyShareSignRequest, TSSEventDataType.KEYSHARESIGN,
                     "key_share_sign"),
}
STAGE_STATUS = {"created": TSSStatus.SCHEDULING, "updated": TSSStatus.PROCESSING, "failed": TSSStatus.FAILED,
                "succeeded": TSSStatus.COMPLETED}


def make_token(payload: bytes, node_key: bytes, iss="cobo-tss-node", expire_minutes=2) -> str:
    claims = {
        "package_data": base64.b64encode(payload).decode(),
        "exp": int(time.time()) + 60 * expire_minutes,
        "iss": iss,
    }
    return jwt.encode(claims, node_key, algorithm="RS256")


def read_answer(body: str, server_pub: bytes) -> TSSCallbackResponse:
    text = body.strip()
    token = json.loads(text) if text.startswith('"') else text
    claims = jwt.decode(token, server_pub, algorithms=["RS256"], options={"require": ["exp"]})
    return TSSCallbackResponse.from_json(base64.b64decode(claims["package_data"]).decode())


def send(url: str, payload: bytes, node_key: bytes, server_pub: bytes, token: str = None, timeout=10,
         headers=None):
    """Returns (http_status, TSSCallbackResponse)."""
    request_id = json.loads(payload)["request_id"]
    token = token or make_token(payload, node_key)
    r = requests.post(url, data={"TSS_JWT_MSG": token}, timeout=timeout, headers=headers)
    resp = read_answer(r.text, server_pub)
    if resp.request_id not in (request_id, ""):
        raise ValueError(f"answer is for {resp.request_id!r}, sent {request_id!r}")
    return r.status_code, resp


def make_event(event_type: str, request_id: str = None, node_id="coboNodeA1b2c3", event_id=None) -> bytes:
    """A TSSEvent as the node sends it, built with the SDK models: `ping` or
    `request.<kind>.<stage>`, its data taken from the sample CallbackRequest of that kind."""
    event_id = event_id or f"evt-{uuid.uuid4()}"
    data = None
    if event_type != "ping":
        _, kind, stage = event_type.split(".")
        model, detail_model, data_type, sample = EVENT_KINDS[kind]
        req = json.loads((SAMPLES / f"{sample}.json").read_bytes())
        data = TSSEventData(model(
            data_type=data_type,
            request_id=request_id or req["request_id"],
            request_type=TSSRequestTypeEenum(data_type.value),
            request_status=STAGE_STATUS[stage],
            extra_info=req["extra_info"],
            failed_reason="signing timed out" if stage == "failed" else None,
            request_detail=detail_model.from_json(req["request_detail"]),
        ))
    event = TSSEvent(event_id=event_id, created_timestamp=int(time.time() * 1000), node_id=node_id,
                     event_type=TSSEventType(event_type), data=data)
    return event.to_json().encode()


def send_event(url: str, payload: bytes, event_key: bytes = None, token: str = None, timeout=10, headers=None):
    """Posts an event as the node does (signed with its event key); returns the HTTP response.
    Event servers answer plain HTTP: 200 accepted, 400 refused."""
    token = token or make_token(payload, event_key)
    return requests.post(url, data={"TSS_JWT_MSG": token}, timeout=timeout, headers=headers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--server-pub", required=True)
    p.add_argument("--fixture", required=True)
    a = p.parse_args(argv)
    payload = open(a.fixture, "rb").read()
    TSSCallbackRequest.from_json(payload.decode())  # a well-formed request, per the SDK
    status, resp = send(a.url, payload, open(a.key, "rb").read(), open(a.server_pub, "rb").read())
    print(resp.to_json())
    return 0 if resp.status == 0 and resp.action == "APPROVE" else 1


if __name__ == "__main__":
    sys.exit(main())
