//! The decision table of CONTRACT.md section 6, over real HTTP on loopback: a TSS Node client and
//! downstream callback servers that sign and verify with `jsonwebtoken`.

mod common;

use std::time::Duration;

use jsonwebtoken::Algorithm;

use common::downstream::{always, Answer, Downstream};
use common::gateway::{config_yaml, entry, entry_at, Gateway};
use common::keys::keys;
use common::node::send;
use common::requests::{request, request_id_of, request_of_type, sample};
use common::tokens::{now, B64};

const RULES: &str = "
embedded_risk_control_rules:
  enable: true
  key_gen:
    reject_all: false
    allow_list:
      - threshold: 2
        node_ids: [customerNodeG7h8i9, coboNodeA1b2c3, thirdPartyNodeD4e5f6]
  key_sign: { reject_all: false }
  key_reshare:
    reject_all: false
    allow_list:
      - xpubkey: xpub661MyMwAqRbcFtXgS5sYJABqqG9YLmC4Q1Rdap9gSE8NqtwybGhePY2gZ29ESFjqJoCu1Rupje8YtGqsefD265TMg7usUDFdp6W1EGMcet8
        new_threshold: 2
        new_node_ids: [coboNodeA1b2c3, thirdPartyNodeD4e5f6, customerNodeG7h8i9]
  key_share_sign: { reject_all: true }
";

async fn ds(name: &str, i: usize, answer: Answer) -> Downstream {
    Downstream::start(name, &keys().servers[i], always(answer), 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_approves_then_the_gateway_approves_with_the_node_bytes_forwarded() {
    let a = ds("alpha", 0, Answer::approve()).await;
    let b = ds("beta", 1, Answer::approve().raw()).await;
    let gw = Gateway::start(&[entry(&a, ""), entry(&b, "")], "").await;
    for name in ["key_gen", "key_sign", "key_reshare", "key_share_sign"] {
        // The fixtures' exact bytes, unparsed and unreformatted.
        let payload = sample(name);
        let r = send(&gw.url(), &payload).await;
        r.expect(0, "APPROVE", &[]);
        assert_eq!(r.http, 200);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(r.response.request_id, request_id_of(&payload));
        for d in [&a, &b] {
            let seen = d.seen().pop().unwrap();
            assert_eq!(
                seen.payload, payload,
                "{} got the node's exact bytes",
                d.name
            );
            assert_eq!(seen.iss, "test-gateway");
        }
    }
    assert_eq!(
        (a.calls(), b.calls(), a.unverified(), b.unverified()),
        (4, 4, 0, 0)
    );
    // /v1/check is the same route.
    let r = send(
        &format!("http://{}/v1/check", gw.addr),
        &request("key_sign", "v1"),
    )
    .await;
    r.expect(0, "APPROVE", &[]);
    assert_eq!(
        gw.metric(r#"tss_gateway_requests_total{outcome="approved",type="key_sign"}"#),
        2.0
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_downstream_requests_total{outcome="approved",server="alpha"}"#),
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_answers_at_once_and_cancels_the_rest() {
    let fast = ds(
        "fast-no",
        0,
        Answer::reject("amount above daily limit").after(20),
    )
    .await;
    let slow = ds("slow", 1, Answer::approve().after(3000)).await;
    let gw = Gateway::start(&[entry(&fast, ""), entry(&slow, "")], "").await;
    let r = send(&gw.url(), &request("key_sign", "short-circuit")).await;
    r.expect(0, "REJECT", &["fast-no: amount above daily limit"]);
    assert!(
        r.elapsed < Duration::from_millis(1500),
        "took {:?}",
        r.elapsed
    );
    assert_eq!(slow.calls(), 1, "the slow server was asked concurrently");
    assert_eq!(
        gw.metric(r#"tss_gateway_downstream_requests_total{outcome="cancelled",server="slow"}"#),
        1.0
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_requests_total{outcome="rejected",type="key_sign"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_asked_concurrently_not_one_after_another() {
    let a = ds("a", 0, Answer::approve().after(400)).await;
    let b = ds("b", 1, Answer::approve().after(400)).await;
    let c = ds("c", 2, Answer::approve().after(400)).await;
    let gw = Gateway::start(&[entry(&a, ""), entry(&b, ""), entry(&c, "")], "").await;
    let r = send(&gw.url(), &request("key_gen", "concurrent")).await;
    r.expect(0, "APPROVE", &[]);
    assert!(
        r.elapsed < Duration::from_millis(1000),
        "took {:?}",
        r.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_a_status_30_failure_naming_the_server() {
    let ok = ds("ok", 0, Answer::approve()).await;
    let hung = ds("hung", 1, Answer::hang()).await;
    let gw = Gateway::start(&[entry(&ok, ""), entry(&hung, "timeout_ms: 300")], "").await;
    let r = send(&gw.url(), &request("key_sign", "timeout")).await;
    r.expect(30, "REJECT", &["hung: timeout:"]);
    assert!(
        r.elapsed >= Duration::from_millis(300) && r.elapsed < Duration::from_millis(1500),
        "took {:?}",
        r.elapsed
    );
    assert!(
        !r.response.error.contains("ok:"),
        "only failing servers are named: {}",
        r.response.error
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_downstream_requests_total{outcome="timeout",server="hung"}"#),
        1.0
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_requests_total{outcome="failed",type="key_sign"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_bounds_the_whole_request() {
    let hung = ds("hung", 0, Answer::hang()).await;
    let gw = Gateway::start(&[entry(&hung, "timeout_ms: 400")], "deadline_ms: 400").await;
    let r = send(&gw.url(), &request("key_sign", "deadline")).await;
    r.expect(30, "REJECT", &["hung: timeout"]);
    assert!(
        r.elapsed < Duration::from_millis(1200),
        "took {:?}",
        r.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_failures_are_retried_with_backoff() {
    // The first connection is closed without an answer; the retry gets through.
    let flaky = Downstream::start("flaky", &keys().servers[0], always(Answer::approve()), 1).await;
    let gw = Gateway::start(&[entry(&flaky, "retries: 1")], "").await;
    let r = send(&gw.url(), &request("key_sign", "retry-ok")).await;
    r.expect(0, "APPROVE", &[]);
    assert_eq!((flaky.connections(), flaky.calls()), (2, 1));

    // Without retries the same failure is a status-30 transport error.
    let flaky0 =
        Downstream::start("flaky0", &keys().servers[1], always(Answer::approve()), 1).await;
    let gw0 = Gateway::start(&[entry(&flaky0, "retries: 0")], "").await;
    let r = send(&gw0.url(), &request("key_sign", "retry-none")).await;
    r.expect(30, "REJECT", &["flaky0: transport_error:"]);
    assert_eq!(flaky0.calls(), 0);

    // A refused connection is retried too, with backoff (50 ms, then 100 ms), then fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = format!("http://{}/v2/check", closed.local_addr().unwrap());
    drop(closed);
    let gw2 = Gateway::start(&[entry_at(&flaky, &refused, "retries: 2")], "").await;
    let r = send(&gw2.url(), &request("key_sign", "refused")).await;
    r.expect(30, "REJECT", &["flaky: transport_error:"]);
    assert!(
        r.elapsed >= Duration::from_millis(150),
        "no backoff: {:?}",
        r.elapsed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_are_not_transport_failures_are_not_retried() {
    let failing = ds("failing", 0, Answer::signed(30, "REJECT", "db down")).await;
    let gw = Gateway::start(&[entry(&failing, "retries: 3")], "").await;
    let r = send(&gw.url(), &request("key_sign", "no-retry")).await;
    r.expect(30, "REJECT", &["failing: error_status: status 30"]);
    assert_eq!(failing.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_answer_is_a_status_30_failure() {
    let k = keys();
    let cases: Vec<(&str, Answer, &str)> = vec![
        (
            "garbled",
            Answer::bytes(200, b"<html>hello</html>"),
            "garbled: bad_response:",
        ),
        (
            "not-utf8",
            Answer::bytes(200, &[0xff, 0xfe, 0x00, 0x80]),
            "not-utf8: bad_response:",
        ),
        (
            "unsigned-500",
            Answer::bytes(500, b"internal error"),
            "unsigned-500: http_error: HTTP 500",
        ),
        (
            "wrong-key",
            Answer::approve().signed_by(&k.intruder),
            "wrong-key: bad_signature:",
        ),
        (
            "other-server-key",
            Answer::approve().signed_by(&k.servers[3]),
            "other-server-key: bad_signature:",
        ),
        (
            "alg-hs256",
            Answer::approve().alg(Algorithm::HS256),
            "alg-hs256: bad_signature:",
        ),
        (
            "alg-rs512",
            Answer::approve().alg(Algorithm::RS512),
            "alg-rs512: bad_signature:",
        ),
        (
            "alg-ps256",
            Answer::approve().alg(Algorithm::PS256),
            "alg-ps256: bad_signature:",
        ),
        (
            "expired",
            Answer::approve().expired(),
            "expired: bad_signature:",
        ),
        (
            "replayed",
            Answer::approve().for_request("some-older-request"),
            "replayed: bad_response: request_id mismatch",
        ),
        (
            "status-10",
            Answer::signed(10, "REJECT", "bad input"),
            "status-10: error_status: status 10",
        ),
        (
            "status-20-approve",
            Answer::signed(20, "APPROVE", ""),
            "status-20-approve: error_status",
        ),
        (
            "unknown-action",
            Answer::signed(0, "MAYBE", ""),
            "unknown-action: bad_response: unknown action",
        ),
        (
            "http-400-signed",
            Answer::signed(20, "REJECT", "token").http(400),
            "http-400-signed: error_status: status 20",
        ),
    ];
    for (i, (name, answer, error)) in cases.into_iter().enumerate() {
        let bad = ds(name, i % 3, answer).await;
        let good = ds("good", 3, Answer::approve()).await;
        let gw = Gateway::start(&[entry(&bad, ""), entry(&good, "")], "").await;
        let r = send(&gw.url(), &request("key_sign", &format!("bad-{i}"))).await;
        r.expect(30, "REJECT", &[error]);
        assert_eq!(bad.calls(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alg_none_answers_are_refused() {
    // jsonwebtoken cannot make an unsigned token, so build one by hand.
    let b64url =
        |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    let resp = serde_json::json!({"request_id": "alg-none", "status": 0, "action": "APPROVE", "error": ""});
    let claims = serde_json::json!({"package_data": base64::Engine::encode(&B64, resp.to_string()), "exp": now() + 60, "iss": "x"});
    let unsigned = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    );
    let none = ds("none", 0, Answer::bytes(200, unsigned.as_bytes())).await;
    let gw = Gateway::start(&[entry(&none, "")], "").await;
    let r = send(&gw.url(), &request("key_sign", "alg-none")).await;
    r.expect(30, "REJECT", &["none: bad_signature:"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validly_signed_body_counts_under_any_http_status_and_in_either_form() {
    let raw400 = ds("raw-400", 0, Answer::approve().raw().http(400)).await;
    let json500 = ds("json-500", 1, Answer::approve().http(500)).await;
    let raw = ds("raw", 2, Answer::approve().raw()).await;
    let gw = Gateway::start(
        &[entry(&raw400, ""), entry(&json500, ""), entry(&raw, "")],
        "",
    )
    .await;
    send(&gw.url(), &request("key_sign", "forms"))
        .await
        .expect(0, "APPROVE", &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_servers_are_called_but_never_decide_or_delay() {
    let enforcer = ds("enforcer", 0, Answer::approve()).await;
    let naysayer = ds("naysayer", 1, Answer::reject("shadow says no").after(1500)).await;
    let gw = Gateway::start(
        &[entry(&enforcer, ""), entry(&naysayer, "mode: shadow")],
        "audit_log: audit.jsonl",
    )
    .await;
    let r = send(&gw.url(), &request("key_sign", "shadow")).await;
    r.expect(0, "APPROVE", &[]);
    assert!(
        r.elapsed < Duration::from_millis(1000),
        "waited for the shadow: {:?}",
        r.elapsed
    );
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(naysayer.calls(), 1);
    assert_eq!(
        gw.metric(r#"tss_gateway_downstream_requests_total{outcome="rejected",server="naysayer"}"#),
        1.0
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_callback_servers{mode="shadow"}"#),
        1.0
    );
    let line = &gw.audit_records()[0];
    let shadow = &line["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "naysayer")
        .unwrap();
    assert_eq!(
        (shadow["mode"].as_str(), shadow["outcome"].as_str()),
        (Some("shadow"), Some("pending"))
    );

    // A shadow server alone checks nothing: with rules off the config is refused.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        config_yaml(
            "127.0.0.1:1".parse().unwrap(),
            &[entry(&naysayer, "mode: shadow")],
            "",
        ),
    )
    .unwrap();
    let err = tss_callback_gateway::generation::Generation::load(&path, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nothing would be checked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_types_filter_who_is_asked_and_ping_goes_to_everyone() {
    let signer_only = ds("sign-only", 0, Answer::reject("never for key_gen")).await;
    let all = ds("all", 1, Answer::approve()).await;
    let gw = Gateway::start(
        &[
            entry(&signer_only, "request_types: [key_sign]"),
            entry(&all, ""),
        ],
        "",
    )
    .await;
    send(&gw.url(), &request("key_gen", "filter-gen"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(signer_only.calls(), 0);
    send(&gw.url(), &request("key_sign", "filter-sign"))
        .await
        .expect(0, "REJECT", &["sign-only: never for key_gen"]);
    // Ping reaches every server whatever its request_types; status 0 is enough, even REJECT.
    send(&gw.url(), &request("ping", "ping-1"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(signer_only.calls(), 2);
    assert_eq!(signer_only.seen()[1].request_type, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_fails_when_an_enforcing_server_answers_a_non_zero_status() {
    let sick = ds("sick", 0, Answer::signed(30, "REJECT", "maintenance")).await;
    let gw = Gateway::start(&[entry(&sick, "request_types: [key_sign]")], "").await;
    send(&gw.url(), &request("ping", "ping-sick")).await.expect(
        30,
        "REJECT",
        &["sick: error_status"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_rules_are_checked_first_and_a_rejection_calls_no_server() {
    let a = ds("a", 0, Answer::approve()).await;
    let gw = Gateway::start(&[entry(&a, "")], RULES).await;
    // Allowed by the rules, then approved downstream (node ids compare as sets).
    send(&gw.url(), &request("key_gen", "rules-ok"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(a.calls(), 1);

    let mut wrong_threshold: serde_json::Value =
        serde_json::from_slice(&sample("key_gen")).unwrap();
    let mut detail: serde_json::Value =
        serde_json::from_str(wrong_threshold["request_detail"].as_str().unwrap()).unwrap();
    detail["threshold"] = 1.into();
    wrong_threshold["request_detail"] = detail.to_string().into();
    wrong_threshold["request_id"] = "rules-threshold".into();
    let r = send(&gw.url(), &serde_json::to_vec(&wrong_threshold).unwrap()).await;
    r.expect(0, "REJECT", &["embedded risk control: "]);
    assert!(
        r.response.error.starts_with("embedded risk control: "),
        "{}",
        r.response.error
    );

    send(&gw.url(), &request("key_share_sign", "rules-reject-all"))
        .await
        .expect(0, "REJECT", &["embedded risk control: "]);
    // Unknown request types are rejected when the rules are on.
    send(&gw.url(), &request_of_type(4, "rules-unknown"))
        .await
        .expect(0, "REJECT", &["embedded risk control: "]);
    assert_eq!(
        a.calls(),
        1,
        "no server is called after an embedded rejection"
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_embedded_rejections_total{type="key_gen"}"#),
        1.0
    );
    assert_eq!(
        gw.metric(r#"tss_gateway_embedded_rejections_total{type="unknown"}"#),
        1.0
    );

    // A downstream rejection still counts after the rules pass.
    a.set_script(always(Answer::reject("nope")));
    send(&gw.url(), &request("key_reshare", "rules-then-ds"))
        .await
        .expect(0, "REJECT", &["a: nope"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_no_enforcing_server_subscribes_to_are_decided_by_the_rules_alone() {
    let signer_only = ds("sign-only", 0, Answer::reject("no")).await;
    let gw = Gateway::start(&[entry(&signer_only, "request_types: [key_sign]")], RULES).await;
    send(&gw.url(), &request("key_gen", "rules-alone"))
        .await
        .expect(0, "APPROVE", &[]);
    assert_eq!(signer_only.calls(), 0);

    // With rules off, such a type has no check at all and is not approved.
    let gw_off = Gateway::start(&[entry(&signer_only, "request_types: [key_sign]")], "").await;
    let r = send(&gw_off.url(), &request("key_gen", "no-check")).await;
    assert!(!r.approved(), "{:?}", r.response);
    let r = send(&gw_off.url(), &request_of_type(9, "unknown-type")).await;
    assert!(!r.approved(), "{:?}", r.response);
}
