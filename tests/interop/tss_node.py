"""Plays a Cobo TSS Node toward a callback server: sign a CallbackRequest RS256 with the node's
key, POST it as the TSS_JWT_MSG form field, accept either answer body form, verify the answer with
the server's public key and check its request_id.

    python tss_node.py --url http://127.0.0.1:11020/v2/check --key tss-node-pri.pem \
        --server-pub gateway-pub.key --fixture config/samples/key_sign.json
"""

import argparse
import base64
import json
import sys
import time

import jwt
import requests
from cobo_waas2 import TSSCallbackRequest, TSSCallbackResponse


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


def send(url: str, payload: bytes, node_key: bytes, server_pub: bytes, token: str = None, timeout=10):
    """Returns (http_status, TSSCallbackResponse)."""
    request_id = json.loads(payload)["request_id"]
    token = token or make_token(payload, node_key)
    r = requests.post(url, data={"TSS_JWT_MSG": token}, timeout=timeout)
    resp = read_answer(r.text, server_pub)
    if resp.request_id not in (request_id, ""):
        raise ValueError(f"answer is for {resp.request_id!r}, sent {request_id!r}")
    return r.status_code, resp


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
