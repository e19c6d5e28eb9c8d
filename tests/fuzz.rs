//! Fuzzing as property tests (proptest). cargo-fuzz needs a nightly toolchain and only stable is
//! available here, so the same targets run as bounded property tests in every `cargo test`:
//! inbound token and payload decoding, downstream answer decoding, config parsing. Set
//! `PROPTEST_CASES` for a longer run. A failure found becomes a named regression test below.

mod common;

use std::path::Path;

use common::*;
use proptest::prelude::*;
use tss_callback_gateway::client::{read_answer, RawAnswer};
use tss_callback_gateway::config::Config;
use tss_callback_gateway::keys::{Signer, Verifier};
use tss_callback_gateway::protocol::{self, CallbackRequest};

fn node_verifier() -> Verifier {
    Verifier::load(&keys().node.spki).unwrap()
}

fn server_signer() -> Signer {
    Signer::load(&keys().servers[0].pkcs8).unwrap()
}

fn server_verifier() -> Verifier {
    Verifier::load(&keys().servers[0].spki).unwrap()
}

/// Strings that look like tokens: three or so dot-separated base64url-ish parts, sometimes
/// real JSON headers.
fn tokenish() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_\\-\\.=]{0,400}",
        (
            prop_oneof![
                Just(r#"{"alg":"RS256"}"#.to_owned()),
                Just(r#"{"alg":"none"}"#.to_owned()),
                Just(r#"{"alg":"HS256","typ":"JWT"}"#.to_owned()),
                any::<String>()
            ],
            any::<Vec<u8>>(),
            any::<Vec<u8>>()
        )
            .prop_map(|(h, c, s)| {
                let e = |b: &[u8]| {
                    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b)
                };
                format!("{}.{}.{}", e(h.as_bytes()), e(&c), e(&s))
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary tokens never panic and never verify.
    #[test]
    fn inbound_tokens_never_verify_unless_signed(token in tokenish()) {
        let v = node_verifier();
        prop_assert!(protocol::verify_token(&token, &v, protocol::now_secs()).is_err());
    }

    /// Arbitrary payload bytes never panic the request parser, and what parses has the fields.
    #[test]
    fn payload_parsing_never_panics(bytes in prop_oneof![
        any::<Vec<u8>>(),
        "\\{\"request_id\": ?\"[a-z0-9\\-]{0,20}\", ?\"request_type\": ?-?[0-9]{1,20}(, ?\"request_detail\": ?\"[^\"\\\\]{0,40}\")?\\}".prop_map(String::into_bytes),
    ]) {
        if let Ok(r) = CallbackRequest::parse(&bytes) {
            prop_assert!(r.request_id.len() <= protocol::MAX_REQUEST_ID_BYTES);
        }
        let _ = protocol::decode_package(&String::from_utf8_lossy(&bytes));
    }

    /// Arbitrary answer bodies under any status never decode as a verified answer.
    #[test]
    fn garbage_answers_never_count(status in 100u16..600, body in prop_oneof![
        any::<Vec<u8>>(),
        tokenish().prop_map(String::into_bytes),
        tokenish().prop_map(|t| format!("\"{t}\"").into_bytes()),
    ]) {
        let v = server_verifier();
        let answer = RawAnswer { status, body };
        prop_assert!(read_answer(&answer, &v, Some("fuzz")).is_err());
    }

    /// A valid answer with bytes flipped or cut either fails or still says exactly what was signed.
    #[test]
    fn mutated_answers_never_change_meaning(flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4), cut in proptest::option::of(any::<prop::sample::Index>())) {
        let signed = br#"{"request_id":"fuzz","status":0,"action":"APPROVE","error":""}"#;
        let token = protocol::sign_token(&server_signer(), signed, "s", 120);
        let original = read_answer(&RawAnswer { status: 200, body: token.clone().into_bytes() }, &server_verifier(), Some("fuzz")).unwrap();
        let mut body = token.into_bytes();
        for (i, x) in flips {
            let i = i.index(body.len());
            body[i] ^= x;
        }
        if let Some(c) = cut {
            let c = c.index(body.len());
            body.truncate(c);
        }
        if let Ok(answer) = read_answer(&RawAnswer { status: 200, body }, &server_verifier(), Some("fuzz")) {
            prop_assert_eq!(answer, original);
        }
    }

    /// Arbitrary YAML never panics the config parser.
    #[test]
    fn config_parsing_never_panics(text in prop_oneof![
        any::<String>(),
        "(listen|deadline_ms|callback_servers|tss_node_public_key|embedded_risk_control_rules|max_body_bytes): ?[\\[\\]{}a-z0-9:\\- ]{0,30}\n?".prop_map(|s| s.repeat(3)),
    ]) {
        let _ = Config::parse(&text, Path::new("/tmp/fuzz.yaml"));
    }
}

/// Over HTTP: arbitrary payloads signed with the real node key, in front of a downstream that
/// rejects everything, are never approved and never crash the gateway. (A Ping, type 0, is the
/// one exception by contract: any status-0 answer approves it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_arbitrary_payloads_are_never_approved() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let no = Downstream::start("no", &keys().servers[0], always(Answer::reject("no")), 0).await;
    let gw = Gateway::start(
        &[entry(&no, "")],
        "embedded_risk_control_rules:\n  enable: true\n  key_gen: { reject_all: true }",
    )
    .await;
    let mut runner = TestRunner::deterministic();
    let strategy = prop_oneof![
        any::<Vec<u8>>(),
        (
            any::<String>(),
            prop_oneof![-3i64..0, 1i64..8],
            any::<String>()
        )
            .prop_map(|(id, t, d)| {
                serde_json::to_vec(
                    &serde_json::json!({"request_id": id, "request_type": t, "request_detail": d}),
                )
                .unwrap()
            }),
    ];
    for _ in 0..150 {
        let payload = strategy.new_tree(&mut runner).unwrap().current();
        let r = send(&gw.url(), &payload).await;
        let is_ping = CallbackRequest::parse(&payload).is_ok_and(|p| p.request_type == 0);
        assert!(
            !r.approved() || is_ping,
            "approved {:?}",
            String::from_utf8_lossy(&payload)
        );
        assert!(matches!(r.response.status, 0 | 10 | 30), "{:?}", r.response);
    }
    send(&gw.url(), &request("key_sign", "still-alive"))
        .await
        .expect(0, "REJECT", &["no: no"]);
}

// === regressions ===

/// A payload whose `request_type` is valid JSON but not an integer must be status 10 naming the
/// field. (Found by the hostile-input tests, not by these properties: the first error message
/// pointed at a column, not a field. The properties above have found no crash so far.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_request_type_of_the_wrong_type_is_named() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    send(&gw.url(), br#"{"request_id":"x","request_type":1.5}"#)
        .await
        .expect(10, "REJECT", &["request_type is not an integer"]);
}
