//! What the gateway refuses from its own caller (statuses 20 and 10), the key forms it loads, and
//! the fail-closed property over every combination of downstream behaviours.

mod common;

use std::time::Duration;

use futures::StreamExt;

use jsonwebtoken::{Algorithm, EncodingKey};

use common::downstream::{always, Answer, Downstream, Script, Seen};
use common::gateway::{entry, Entry, Gateway};
use common::http::{get, get_json, http};
use common::keys::keys;
use common::node::{post_body, post_token, send, Reply};
use common::requests::request;
use common::tokens::{now, open, token, token_with, CallbackResponse, B64};

async fn approving_gateway() -> (Downstream, Gateway) {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "max_body_bytes: 65536").await;
    (a, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_get_status_20_and_reach_no_server() {
    let (a, gw) = approving_gateway().await;
    let k = keys();
    let payload = request("key_sign", "hostile");
    let b64url =
        |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    let claims = serde_json::json!({"package_data": base64::Engine::encode(&B64, &payload), "exp": now() + 60, "iss": "x"});
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    );
    // A valid RS256 signature under a header that claims another algorithm.
    let good = token(&k.node.encoding(), &payload, "tss-node");
    let (_, rest) = good.split_once('.').unwrap();
    let relabelled = format!("{}.{rest}", b64url(br#"{"alg":"RS384","typ":"JWT"}"#));

    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", unsigned, "RS256 only"),
        // The classic confusion attack: HMAC keyed with the node's public key.
        (
            "HS256 with the public key",
            token_with(
                &EncodingKey::from_secret(&k.node.public_pem()),
                Algorithm::HS256,
                &payload,
                "x",
                now() + 60,
            ),
            "RS256 only",
        ),
        (
            "RS512",
            token_with(
                &k.node.encoding(),
                Algorithm::RS512,
                &payload,
                "x",
                now() + 60,
            ),
            "RS256 only",
        ),
        (
            "PS256",
            token_with(
                &k.node.encoding(),
                Algorithm::PS256,
                &payload,
                "x",
                now() + 60,
            ),
            "RS256 only",
        ),
        ("relabelled RS384", relabelled, "RS256 only"),
        (
            "signed by another key",
            token(&k.intruder.encoding(), &payload, "x"),
            "signature",
        ),
        (
            "signed by the gateway's own key",
            token(&k.gateway.encoding(), &payload, "x"),
            "signature",
        ),
        (
            "expired",
            token_with(
                &k.node.encoding(),
                Algorithm::RS256,
                &payload,
                "x",
                now() - 5,
            ),
            "expired",
        ),
        ("garbage", "not-a-token".into(), "not a JWT"),
        ("four parts", format!("{good}.x"), "not a JWT"),
        ("empty", String::new(), "not a JWT"),
    ];
    for (what, t, why) in cases {
        let r = post_token(&gw.url(), &t).await;
        assert_eq!(r.http, 200, "{what}");
        r.expect(20, "REJECT", &[why]);
    }
    // Form problems are token problems too.
    post_body(&gw.url(), b"OTHER=1".to_vec())
        .await
        .expect(20, "REJECT", &["TSS_JWT_MSG missing"]);
    post_body(&gw.url(), Vec::new())
        .await
        .expect(20, "REJECT", &["TSS_JWT_MSG missing"]);
    let twice = format!("TSS_JWT_MSG={good}&TSS_JWT_MSG={good}");
    post_body(&gw.url(), twice.into_bytes())
        .await
        .expect(20, "REJECT", &["more than once"]);
    assert_eq!(a.calls(), 0);
    assert_eq!(
        gw.metric(r#"tss_gateway_requests_total{outcome="invalid_token",type="unknown"}"#),
        14.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_get_status_10() {
    let (a, gw) = approving_gateway().await;
    let node = keys().node.encoding();
    let raw_token = |package_data: &str| {
        let claims =
            serde_json::json!({"package_data": package_data, "exp": now() + 60, "iss": "x"});
        jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::RS256), &claims, &node).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("not base64", raw_token("%%% not base64 %%%"), "not base64"),
        (
            "not JSON",
            token(&node, b"hello", "x"),
            "not a CallbackRequest",
        ),
        (
            "no request_id",
            token(
                &node,
                br#"{"request_type": 2, "request_detail": "{}"}"#,
                "x",
            ),
            "request_id",
        ),
        (
            "no request_type",
            token(
                &node,
                br#"{"request_id": "x1", "request_detail": "{}"}"#,
                "x",
            ),
            "request_type",
        ),
        (
            "request_type a string",
            token(&node, br#"{"request_id": "x2", "request_type": "2"}"#, "x"),
            "request_type",
        ),
        (
            "deeply nested",
            token(
                &node,
                format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).as_bytes(),
                "x",
            ),
            "not a CallbackRequest",
        ),
        (
            "1 MB request_id",
            token(
                &node,
                format!(
                    r#"{{"request_id": "{}", "request_type": 2}}"#,
                    "x".repeat(1 << 20)
                )
                .as_bytes(),
                "x",
            ),
            "request_id",
        ),
    ];
    for (what, t, why) in cases {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("TSS_JWT_MSG", &t)
            .finish();
        let r = if body.len() > 65536 {
            // Above this gateway's max_body_bytes: use one that allows it.
            let big = Gateway::start(&[entry(&a, "")], "max_body_bytes: 4194304").await;
            post_body(&big.url(), body.into_bytes()).await
        } else {
            post_body(&gw.url(), body.into_bytes()).await
        };
        assert_eq!(r.http, 200, "{what}");
        r.expect(10, "REJECT", &[why]);
    }
    // The request_id of a payload that is JSON but not a valid request is echoed back.
    let r = send(
        &gw.url(),
        br#"{"request_id": "echo-me", "request_type": "two"}"#,
    )
    .await;
    r.expect(10, "REJECT", &[]);
    assert_eq!(r.response.request_id, "echo-me");
    assert_eq!(a.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_above_max_body_bytes_are_refused_without_being_read() {
    let (a, gw) = approving_gateway().await;
    // Declared too large: refused from Content-Length before the body is sent.
    let big = vec![b'a'; 10 << 20];
    let r = post_body(&gw.url(), big).await;
    r.expect(10, "REJECT", &["max_body_bytes"]);
    // Streamed without a length: refused once the limit is crossed.
    let chunks = futures::stream::iter((0..200).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 4096])));
    let resp = http()
        .post(gw.url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    // The gateway may answer and close before the client finishes sending; both are refusals.
    if let Ok(resp) = resp {
        let text = resp.text().await.unwrap();
        let t: String = serde_json::from_str(&text).unwrap();
        let answer: CallbackResponse =
            serde_json::from_slice(&open(&t, &keys().gateway.decoding()).unwrap()).unwrap();
        assert_eq!((answer.status, answer.action.as_str()), (10, "REJECT"));
    }
    // 10,000 form fields are read as one body, within the limit, and refused for the token.
    let fields: String = "a=&".repeat(10_000);
    post_body(&gw.url(), fields.into_bytes())
        .await
        .expect(20, "REJECT", &["TSS_JWT_MSG missing"]);
    // The gateway keeps serving.
    send(&gw.url(), &request("key_sign", "after-big"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(a.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pem_form_loads() {
    let k = keys();
    // Downstream keys in PKCS#1 public form, the node's in PKCS#1, the gateway's private in PKCS#1.
    let a = Downstream::start("pkcs1-pub", &k.servers[0], always(Answer::approve()), 0).await;
    let b = Downstream::start(
        "spki-pub",
        &k.servers[1],
        always(Answer::approve().raw()),
        0,
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: {addr}\ntss_node_public_key: {}\ngateway_private_key: {}\ncallback_servers:\n  - name: pkcs1-pub\n    service_address: {}\n    pubkey_path: {}\n  - name: spki-pub\n    service_address: {}\n    pubkey_path: {}\n",
        k.node.pkcs1_pub.display(),
        k.gateway.pkcs1.display(),
        a.url(),
        k.servers[0].pkcs1_pub.display(),
        b.url(),
        k.servers[1].spki.display(),
    );
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml).unwrap();
    let rt = tss_callback_gateway::generation::Generation::load(&path, 1).unwrap();
    let shared =
        tss_callback_gateway::Shared::new(rt, tss_callback_gateway::ops::metrics::Metrics::new())
            .unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(tss_callback_gateway::inbound::listener::serve(
        listener,
        shared,
        std::future::pending(),
    ));
    let r = send(
        &format!("http://{addr}/v2/check"),
        &request("key_gen", "pem-forms"),
    )
    .await;
    r.expect(0, "APPROVE", &[]);
    // The node may sign with a PKCS#1 private key too: same key, same verification.
    let t = token(
        &EncodingKey::from_rsa_pem(&std::fs::read(&k.node.pkcs1).unwrap()).unwrap(),
        &request("key_sign", "pkcs1-node"),
        "n",
    );
    post_token(&format!("http://{addr}/v2/check"), &t)
        .await
        .expect(0, "APPROVE", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_healthz_readyz_and_metrics_answer() {
    let (_a, gw) = approving_gateway().await;
    let ping = get_json(&format!("http://{}/ping", gw.addr)).await;
    assert_eq!(ping["server"], "test-gateway");
    assert!(ping["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    let (status, _) = get(&format!("http://{}/healthz", gw.addr)).await;
    assert_eq!(status, 200);
    let ready = get_json(&format!("http://{}/readyz", gw.addr)).await;
    assert_eq!(ready["config_generation"], 1);
    assert_eq!(ready["servers"][0]["name"], "a");
    let (_, m) = get(&format!("http://{}/metrics", gw.addr)).await;
    assert!(m.contains("tss_gateway_build_info{version=\""), "{m}");
    // A GET on the callback route is not a callback.
    assert_eq!(get(&gw.url()).await.0, 405);
}

/// Each of three enforcing servers behaves per request as the request_id says, and the rules
/// pass or reject: the gateway approves exactly when the rules pass and all three approve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_combination_of_behaviours_approves_unless_everything_approved() {
    const BEHAVIOURS: [&str; 7] = [
        "approve", "reject", "timeout", "garbage", "status30", "wrongkey", "replay",
    ];
    let script = |index: usize| -> Script {
        std::sync::Arc::new(move |seen: &Seen| {
            let parts: Vec<&str> = seen.request_id.split('.').collect();
            match parts[1 + index] {
                "approve" => Answer::approve(),
                "reject" => Answer::reject("no"),
                "timeout" => Answer::approve().after(2000),
                "garbage" => Answer::bytes(200, b"\"eyJhbGciOiJSUzI1NiJ9.e30.c2ln\""),
                "status30" => Answer::signed(30, "APPROVE", ""),
                "wrongkey" => Answer::approve().signed_by(&keys().intruder),
                _ => Answer::approve().for_request("another-request"),
            }
        })
    };
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(Downstream::start(&format!("s{i}"), &keys().servers[i], script(i), 0).await);
    }
    let rules =
        "embedded_risk_control_rules:\n  enable: true\n  key_share_sign: { reject_all: true }\n";
    let entries: Vec<Entry> = servers
        .iter()
        .map(|s| entry(s, "timeout_ms: 400"))
        .collect();
    let gw = Gateway::start(&entries, rules).await;
    let mut cases = Vec::new();
    for a in BEHAVIOURS {
        for b in BEHAVIOURS {
            for c in BEHAVIOURS {
                for kind in ["key_sign", "key_share_sign"] {
                    cases.push((format!("{kind}.{a}.{b}.{c}"), kind));
                }
            }
        }
    }
    let url = gw.url();
    // A TSS Node sends a handful of tasks at a time; 32 at once is already a busy node.
    let replies: Vec<Reply> = futures::stream::iter(cases.iter().map(|(id, kind)| {
        let url = url.clone();
        async move { send(&url, &request(kind, id)).await }
    }))
    .buffered(32)
    .collect()
    .await;
    let mut approvals = 0;
    for ((id, kind), r) in cases.iter().zip(replies) {
        let everything_approved =
            *kind == "key_sign" && id.split('.').skip(1).all(|b| b == "approve");
        assert_eq!(r.approved(), everything_approved, "{id}: {:?}", r.response);
        let any_reject = id.split('.').skip(1).any(|b| b == "reject");
        let expected_status = if *kind == "key_share_sign" || everything_approved || any_reject {
            0
        } else {
            30
        };
        assert_eq!(r.response.status, expected_status, "{id}: {:?}", r.response);
        approvals += usize::from(r.approved());
    }
    assert_eq!(approvals, 1);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
