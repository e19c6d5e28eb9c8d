//! Fuzzing as property tests. cargo-fuzz needs a nightly toolchain (libFuzzer's sanitizer
//! coverage flags) and only the stable toolchain is available here, so the same targets run as
//! bounded proptest properties in every `cargo test`: inbound token and payload decoding (in
//! process and over HTTP), downstream answer decoding, the embedded rules, config parsing.
//!
//! Each property runs `PROPTEST_CASES` cases (proptest's default, 256). `PROPTEST_CASES=100000
//! cargo test --release --test fuzz` is the long run. Failures are not persisted to files: a
//! failure found becomes a named regression test at the bottom of this file.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use jsonwebtoken::EncodingKey;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use tss_callback_gateway::config::{Config, Mode};
use tss_callback_gateway::outbound::client::{read_answer, CallError, RawAnswer};
use tss_callback_gateway::protocol::keys::{Signer, Verifier};
use tss_callback_gateway::protocol::{self, CallbackRequest};
use tss_callback_gateway::rules::{RuleSet, RuleVerdict};

use common::downstream::{always, Answer, Downstream, Script, Seen};
use common::gateway::{entry, Gateway};
use common::keys::keys;
use common::node::{post_body, send};
use common::requests::{request, request_of_type};
use common::tokens::token;

/// proptest's defaults (`PROPTEST_CASES` honoured), without regression files.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// === keys, parsed once ===

fn node_key() -> &'static EncodingKey {
    static K: OnceLock<EncodingKey> = OnceLock::new();
    K.get_or_init(|| keys().node.encoding())
}

fn node_verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::load(&keys().node.spki).unwrap())
}

fn server_signer() -> &'static Signer {
    static S: OnceLock<Signer> = OnceLock::new();
    S.get_or_init(|| Signer::load(&keys().servers[0].pkcs8).unwrap())
}

fn server_verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::load(&keys().servers[0].spki).unwrap())
}

const APPROVAL: &[u8] = br#"{"request_id":"fuzz","status":0,"action":"APPROVE","error":""}"#;

/// A valid approval for request `fuzz` by server 0, signed once.
fn signed_approval() -> &'static str {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(|| protocol::sign_token(server_signer(), APPROVAL, "s", 3600))
}

// === strategies ===

fn b64url(b: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b)
}

/// Strings that look like tokens: three or so dot-separated base64url-ish parts, sometimes
/// with real JWT headers naming RS256, none or HS256.
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
            .prop_map(|(h, c, s)| format!(
                "{}.{}.{}",
                b64url(h.as_bytes()),
                b64url(&c),
                b64url(&s)
            )),
    ]
}

/// Any JSON document, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field of a CallbackRequest-shaped object: absent, of the right shape, or of any shape.
fn field(right: BoxedStrategy<Value>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        6 => right.prop_map(Some),
        2 => json_value().prop_map(Some),
    ]
}

/// Objects shaped like a CallbackRequest, each field sometimes missing or of another type.
fn request_like() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        8 => ".{0,40}".prop_map(Value::from),
        1 => "x{1020,1030}".prop_map(Value::from),
    ]
    .boxed();
    let kind = prop_oneof![
        8 => (-1i64..7).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => Just(json!(2.0)),
        1 => Just(json!("2")),
    ]
    .boxed();
    let text = prop_oneof![
        json_value().prop_map(|v| Value::from(v.to_string())),
        ".{0,30}".prop_map(Value::from),
    ]
    .boxed();
    (field(id), field(kind), field(text.clone()), field(text)).prop_map(
        |(id, kind, detail, extra)| {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("request_id", id),
                ("request_type", kind),
                ("request_detail", detail),
                ("extra_info", extra),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        },
    )
}

/// Payload bytes: anything, any JSON, or something close to a CallbackRequest.
fn payloadish() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => any::<Vec<u8>>(),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        4 => request_like().prop_map(|v| v.to_string().into_bytes()),
    ]
}

/// The oracle, written independently of the gateway: what a valid CallbackRequest is.
/// Returns its `request_id` and `request_type`.
fn valid_request(payload: &[u8]) -> Option<(String, i64)> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let obj = v.as_object()?;
    let id = obj.get("request_id")?.as_str()?;
    let kind = obj.get("request_type")?.as_i64()?;
    let text_or_null = |k: &str| obj.get(k).is_none_or(|x| x.is_null() || x.is_string());
    (id.len() <= protocol::MAX_REQUEST_ID_BYTES
        && text_or_null("request_detail")
        && text_or_null("extra_info"))
    .then(|| (id.to_owned(), kind))
}

/// A config in the gateway's YAML shape with every value drawn from a small set of good and
/// bad ones, so that validation (not just the YAML parser) is exercised.
fn configish() -> impl Strategy<Value = String> {
    let scalar = || {
        prop_oneof![
            Just("0".to_owned()),
            Just("1".to_owned()),
            Just("300".to_owned()),
            Just("8000".to_owned()),
            Just("700000".to_owned()),
            Just("-1".to_owned()),
            Just("18446744073709551616".to_owned()),
            Just("''".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            Just("~".to_owned()),
            Just("true".to_owned()),
            "[a-z0-9_:/\\.\\-]{0,24}",
        ]
    };
    let server = (
        prop_oneof![
            Just("risk".to_owned()),
            Just("Risk!".to_owned()),
            Just(String::new()),
            "[a-z]{1,3}"
        ],
        prop_oneof![
            Just("http://127.0.0.1:11021/v2/check".to_owned()),
            Just("https://risk.example/v2/check".to_owned()),
            Just("ftp://x/".to_owned()),
            Just("http://".to_owned()),
            Just("not a url".to_owned()),
        ],
        prop::option::of(scalar()),
        prop::option::of(scalar()),
        prop::option::of(prop_oneof![
            Just("[key_sign]".to_owned()),
            Just("[]".to_owned()),
            Just("[ping, key_gen, nope]".to_owned())
        ]),
        prop::option::of(prop_oneof![
            Just("enforce".to_owned()),
            Just("shadow".to_owned()),
            Just("maybe".to_owned())
        ]),
        prop::option::of(scalar()),
    )
        .prop_map(|(name, url, timeout, retries, types, mode, unknown)| {
            let mut s = format!(
                "  - name: '{name}'\n    service_address: '{url}'\n    pubkey_path: k.pem\n"
            );
            for (k, v) in [
                ("timeout_ms", timeout),
                ("retries", retries),
                ("request_types", types),
                ("mode", mode),
                ("surprise", unknown),
            ] {
                if let Some(v) = v {
                    s.push_str(&format!("    {k}: {v}\n"));
                }
            }
            s
        });
    (
        prop::collection::vec(
            (
                prop_oneof![
                    Just("listen"),
                    Just("service_name"),
                    Just("token_expire_minutes"),
                    Just("deadline_ms"),
                    Just("max_body_bytes"),
                    Just("audit_log"),
                    Just("health_check_interval_ms"),
                    Just("unknown_key"),
                ],
                scalar(),
            ),
            0..4,
        ),
        prop::option::of(prop_oneof![
            Just("{ enable: true, key_sign: { reject_all: true } }".to_owned()),
            Just("{ enable: false }".to_owned()),
            Just("{ enable: true, key_gen: { allow_list: [ { threshold: 2 } ] } }".to_owned()),
            scalar(),
        ]),
        prop::collection::vec(server, 0..3),
        any::<bool>(),
    )
        .prop_map(|(top, rules, servers, keys)| {
            let mut y = String::new();
            if keys {
                y.push_str("tss_node_public_key: n.pem\ngateway_private_key: g.pem\n");
            }
            for (k, v) in top {
                y.push_str(&format!("{k}: {v}\n"));
            }
            if let Some(r) = rules {
                y.push_str(&format!("embedded_risk_control_rules: {r}\n"));
            }
            if !servers.is_empty() {
                y.push_str("callback_servers:\n");
                for s in servers {
                    y.push_str(&s);
                }
            }
            y
        })
}

/// Flips bytes of `body` and perhaps cuts it.
fn mutate(
    mut body: Vec<u8>,
    flips: Vec<(prop::sample::Index, u8)>,
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    for (i, x) in flips {
        let i = i.index(body.len());
        body[i] ^= x;
    }
    if let Some(c) = cut {
        let c = c.index(body.len());
        body.truncate(c);
    }
    body
}

fn flips() -> impl Strategy<Value = Vec<(prop::sample::Index, u8)>> {
    prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)
}

// === in-process properties ===

proptest! {
    #![proptest_config(config())]

    /// Arbitrary tokens never panic the verifier and never verify.
    #[test]
    fn inbound_tokens_never_verify_unless_signed(token in tokenish()) {
        prop_assert!(protocol::verify_token(&token, node_verifier(), protocol::now_secs()).is_err());
    }

    /// Any payload the node key signs verifies, decodes to the exact bytes signed, and parses
    /// (without panicking) exactly when the independent oracle calls it a CallbackRequest.
    #[test]
    fn signed_payloads_decode_exactly_and_parse_only_when_valid(payload in payloadish()) {
        let t = token(node_key(), &payload, "tss-node");
        let claims = protocol::verify_token(&t, node_verifier(), protocol::now_secs()).unwrap();
        let bytes = protocol::decode_package(&claims.package_data).unwrap();
        prop_assert_eq!(&bytes, &payload);
        match (CallbackRequest::parse(&bytes), valid_request(&bytes)) {
            (Ok(r), Some((id, kind))) => {
                prop_assert_eq!(r.request_id, id);
                prop_assert_eq!(r.request_type, kind);
            }
            (Err(_), None) => {}
            (parsed, oracle) => prop_assert!(false, "parse {:?} but oracle {:?}", parsed, oracle),
        }
    }

    /// A node token with bytes flipped or cut either fails or still carries exactly what the
    /// node signed.
    #[test]
    fn tampered_inbound_tokens_never_carry_other_content(
        flips in flips(),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let payload = request_of_type(2, "tamper");
        let t = token(node_key(), &payload, "tss-node");
        let body = mutate(t.into_bytes(), flips, cut);
        let text = String::from_utf8_lossy(&body);
        if let Ok(claims) = protocol::verify_token(&text, node_verifier(), protocol::now_secs()) {
            prop_assert_eq!(protocol::decode_package(&claims.package_data).unwrap(), payload);
        }
    }

    /// Arbitrary answer bodies under any HTTP status never decode as a verified answer.
    #[test]
    fn garbage_answers_never_count(status in 100u16..600, body in prop_oneof![
        any::<Vec<u8>>(),
        tokenish().prop_map(String::into_bytes),
        tokenish().prop_map(|t| format!("\"{t}\"").into_bytes()),
    ]) {
        let answer = RawAnswer { status, body };
        prop_assert!(read_answer(&answer, server_verifier(), Some("fuzz")).is_err());
    }

    /// A valid answer with bytes flipped or cut either fails or still says exactly what was
    /// signed.
    #[test]
    fn mutated_answers_never_change_meaning(
        flips in flips(),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        json_form in any::<bool>(),
    ) {
        let t = signed_approval();
        let body = if json_form { format!("\"{t}\"") } else { t.to_owned() };
        let original = read_answer(
            &RawAnswer { status: 200, body: body.clone().into_bytes() },
            server_verifier(),
            Some("fuzz"),
        )
        .unwrap();
        let body = mutate(body.into_bytes(), flips, cut);
        if let Ok(answer) = read_answer(&RawAnswer { status: 200, body }, server_verifier(), Some("fuzz")) {
            prop_assert_eq!(answer, original);
        }
    }

    /// A validly signed status-0 answer about another request never counts: a replayed
    /// approval (or rejection) is a bad_response.
    #[test]
    fn answers_about_another_request_never_count(
        asked in ".{0,40}",
        answered in ".{0,40}",
        approve in any::<bool>(),
        status in 100u16..600,
    ) {
        prop_assume!(asked != answered);
        let action = if approve { "APPROVE" } else { "REJECT" };
        let resp = json!({"request_id": answered, "status": 0, "action": action, "error": ""});
        let t = protocol::sign_token(server_signer(), resp.to_string().as_bytes(), "s", 60);
        let r = read_answer(&RawAnswer { status, body: t.into_bytes() }, server_verifier(), Some(&asked));
        prop_assert!(matches!(r, Err(CallError::BadResponse(ref e)) if e.contains("request_id mismatch")), "{:?}", r);
    }

    /// With the contract's example rules, a key_gen passes only if its request_detail says
    /// threshold 2 and node ids {A, B, C}; unknown types never pass; nothing panics.
    #[test]
    fn embedded_rules_pass_only_what_the_allow_list_names(
        code in prop_oneof![Just(1i64), Just(3i64), any::<i64>()],
        detail in prop_oneof![
            json_value().prop_map(|v| v.to_string()),
            (prop_oneof![Just(json!(2)), Just(json!(2.0)), Just(json!(3)), json_value()],
             prop::collection::vec(prop_oneof![Just("A"), Just("B"), Just("C"), Just("D")], 0..5),
             prop::option::of(json_value()))
                .prop_map(|(t, ids, extra)| {
                    let mut v = json!({"threshold": t, "node_ids": ids, "root_pub_key": "XPUB",
                        "new_threshold": t, "new_node_ids": ids});
                    if let Some(e) = extra { v["curve"] = e; }
                    v.to_string()
                }),
            any::<String>(),
        ],
    ) {
        let rules: RuleSet = serde_norway::from_str(
            "enable: true\nkey_gen: { allow_list: [ { threshold: 2, node_ids: [A, B, C] } ] }\n\
             key_reshare: { allow_list: [ { xpubkey: XPUB, new_threshold: 2, new_node_ids: [A, B, C] } ] }\n\
             key_share_sign: { reject_all: true }",
        )
        .unwrap();
        let verdict = rules.check(code, &detail);
        let abc: BTreeSet<&str> = ["A", "B", "C"].into();
        let matches = |t: &str, ids: &str| {
            let v: Value = serde_json::from_str(&detail).unwrap_or_default();
            let set: Option<BTreeSet<&str>> =
                v[ids].as_array().and_then(|a| a.iter().map(Value::as_str).collect());
            v[t].as_u64() == Some(2) && set == Some(abc.clone())
        };
        let may_pass = match code {
            0 | 2 => true,
            1 => matches("threshold", "node_ids"),
            3 => matches("new_threshold", "new_node_ids"),
            _ => false,
        };
        prop_assert!(verdict != RuleVerdict::Pass || may_pass, "{code} {detail} passed");
    }

    /// Arbitrary text never panics the config parser.
    #[test]
    fn arbitrary_text_never_panics_the_config_parser(text in any::<String>()) {
        let _ = Config::parse(&text, Path::new("/tmp/fuzz.yaml"));
    }

    /// Configs of the right shape with good and bad values never panic, and what is accepted
    /// holds the invariants the rest of the gateway relies on.
    #[test]
    fn accepted_configs_hold_their_invariants(text in configish()) {
        if let Ok(c) = Config::parse(&text, Path::new("/etc/gw/fuzz.yaml")) {
            prop_assert!((1..=600_000).contains(&c.deadline_ms), "{}", text);
            prop_assert!((1..=60).contains(&c.token_expire_minutes), "{}", text);
            prop_assert!(c.max_body_bytes >= 1024, "{}", text);
            let mut names = BTreeSet::new();
            for s in &c.callback_servers {
                prop_assert!(names.insert(s.name.clone()), "duplicate {}: {}", s.name, text);
                prop_assert!(!s.name.is_empty() && s.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'), "{}", text);
                prop_assert!(s.timeout_ms >= 1 && s.timeout_ms <= c.deadline_ms, "{}", text);
                prop_assert!(s.retries <= 10, "{}", text);
                prop_assert!(!s.request_types.is_empty(), "{}", text);
                prop_assert!(s.service_address.starts_with("http://") || s.service_address.starts_with("https://"), "{}", text);
                prop_assert!(s.pubkey_path.is_absolute(), "{}", text);
            }
            prop_assert!(
                c.embedded_risk_control_rules.enable
                    || c.callback_servers.iter().any(|s| s.mode == Mode::Enforce),
                "nothing checked: {}", text
            );
        }
    }
}

// === over HTTP ===

/// What the HTTP property sends: a payload the node key signs, or a raw form body.
#[derive(Debug, Clone)]
enum Input {
    Signed {
        payload: Vec<u8>,
        downstream_approves: bool,
    },
    Body(Vec<u8>),
}

/// Over HTTP, against one in-process gateway (embedded rules on, key_gen rejected) in front of
/// a downstream that approves exactly the requests whose request_id starts with `y`: the gateway
/// approves exactly the valid requests of a passing type that the downstream approved (any
/// status-0 answer approves a Ping), refuses everything else with status 0 or 10 (20 for bodies
/// without a valid token), and keeps serving. Cases shrink to a minimal failing input.
#[test]
fn over_http_only_valid_requests_the_downstream_approved_are_approved() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let script: Script = std::sync::Arc::new(|seen: &Seen| {
        if seen.request_id.starts_with('y') {
            Answer::approve()
        } else {
            Answer::reject("no")
        }
    });
    let (ds, gw) = rt.block_on(async {
        let ds = Downstream::start("ds", &keys().servers[0], script, 0).await;
        let gw = Gateway::start(
            &[entry(&ds, "")],
            "embedded_risk_control_rules:\n  enable: true\n  key_gen: { reject_all: true }",
        )
        .await;
        (ds, gw)
    });
    // Every request_id is made unique so no two cases meet in the duplicate-retry cache.
    let serial = AtomicUsize::new(0);
    let strategy = prop_oneof![
        4 => (payloadish(), any::<bool>()).prop_map(|(payload, downstream_approves)| Input::Signed { payload, downstream_approves }),
        1 => prop_oneof![
            any::<Vec<u8>>(),
            tokenish().prop_map(|t| format!("TSS_JWT_MSG={t}").into_bytes()),
        ].prop_map(Input::Body),
    ];
    let mut runner = TestRunner::new(config());
    let result = runner.run(&strategy, |input| {
        let reply = match input {
            Input::Signed {
                payload,
                downstream_approves,
            } => {
                let mut payload = payload;
                if let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&payload) {
                    if let Some(Value::String(id)) = m.get("request_id") {
                        let prefix = if downstream_approves { 'y' } else { 'n' };
                        let n = serial.fetch_add(1, Ordering::Relaxed);
                        let id = format!("{prefix}{n}-{id}");
                        m.insert("request_id".into(), Value::from(id));
                        payload = Value::Object(m).to_string().into_bytes();
                    }
                }
                let reply = rt.block_on(send(&gw.url(), &payload));
                // Ping approves on any status-0 answer; key_gen and unknown types are rejected
                // by the embedded rules; the rest is the downstream's call.
                let expected = valid_request(&payload).map(|(id, kind)| match kind {
                    0 => true,
                    2 | 3 | 5 => id.starts_with('y'),
                    _ => false,
                });
                let text = String::from_utf8_lossy(&payload);
                match expected {
                    Some(approve) => {
                        prop_assert_eq!(
                            reply.approved(),
                            approve,
                            "{} -> {:?}",
                            text,
                            reply.response
                        );
                        prop_assert_eq!(
                            reply.response.status,
                            0,
                            "{} -> {:?}",
                            text,
                            reply.response
                        );
                    }
                    None => {
                        prop_assert!(
                            !reply.approved(),
                            "APPROVED {} -> {:?}",
                            text,
                            reply.response
                        );
                        prop_assert_eq!(
                            reply.response.status,
                            10,
                            "{} -> {:?}",
                            text,
                            reply.response
                        );
                    }
                }
                reply
            }
            Input::Body(body) => {
                let reply = rt.block_on(post_body(&gw.url(), body.clone()));
                prop_assert!(
                    !reply.approved() && matches!(reply.response.status, 10 | 20),
                    "{:?} -> {:?}",
                    String::from_utf8_lossy(&body),
                    reply.response
                );
                reply
            }
        };
        prop_assert_eq!(reply.http, 200);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    rt.block_on(async {
        send(&gw.url(), &request("key_sign", "y-still-alive"))
            .await
            .expect(0, "APPROVE", &[]);
    });
    assert_eq!(ds.unverified(), 0);
}

// === hostile configs ===

/// A YAML alias bomb ("billion laughs") in a config is refused quickly, not expanded.
#[test]
fn a_yaml_alias_bomb_is_refused_quickly() {
    let mut y = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        y.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
    }
    y.push_str("listen: *a9\n");
    let started = std::time::Instant::now();
    let err = Config::parse(&y, Path::new("/tmp/bomb.yaml")).unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.to_string().is_empty());
}

/// Deeply nested YAML is refused, not a stack overflow.
#[test]
fn deeply_nested_yaml_is_refused() {
    for nested in [
        format!("listen: {}{}", "[".repeat(10_000), "]".repeat(10_000)),
        format!("listen: {}x{}", "{a: ".repeat(10_000), "}".repeat(10_000)),
        "[".repeat(100_000),
        format!(
            "listen:\n{}",
            (0..5_000)
                .map(|i| format!("{}- \n", " ".repeat(i)))
                .collect::<String>()
        ),
    ] {
        assert!(Config::parse(&nested, Path::new("/tmp/deep.yaml")).is_err());
    }
}

// === regressions ===

/// A payload whose `request_type` is valid JSON but not an integer must be status 10 naming the
/// field. (Found by the hostile-input tests rather than by these properties: the first error
/// message pointed at a column, not a field.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_request_type_of_the_wrong_type_is_named() {
    let a = Downstream::start("a", &keys().servers[0], always(Answer::approve()), 0).await;
    let gw = Gateway::start(&[entry(&a, "")], "").await;
    send(&gw.url(), br#"{"request_id":"x","request_type":1.5}"#)
        .await
        .expect(10, "REJECT", &["request_type is not an integer"]);
}

/// Found by `signed_payloads_decode_exactly_and_parse_only_when_valid` (minimal input
/// `["",0]`) and by the HTTP property (`["",-2199904208140557645]` answered status 0 where 10
/// was due). serde's derived `Deserialize` accepts a JSON array for a struct, by field order,
/// so `CallbackRequest::parse` reads `["", 0]` as a Ping and `["arr-1", 2, "{}", "{}"]` as a
/// KeySign. The contract's CallbackRequest is a JSON object with named fields: such a payload
/// lacks `request_id` and `request_type` and is due status 10 before any server is asked.
/// Observed: the gateway forwards the array. A downstream that expects an object refuses it
/// (and the gateway fails it with 30), but one that reads it the gateway's way (as the crate's
/// own `sample_server` does, through the same parser) approves it, and so does the gateway:
/// `["arr-1",2,"{}","{}"]` is answered status 0 APPROVE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_json_array_is_not_a_callback_request() {
    assert!(CallbackRequest::parse(br#"["",0]"#).is_err());
    // A downstream that reads arrays as the gateway does and approves.
    let lenient = Downstream::start(
        "lenient",
        &keys().servers[0],
        always(Answer::approve().for_request("arr-1")),
        0,
    )
    .await;
    let gw = Gateway::start(&[entry(&lenient, "")], "").await;
    for payload in [&br#"["arr-1",2,"{}","{}"]"#[..], br#"["",0]"#] {
        send(&gw.url(), payload).await.expect(10, "REJECT", &[]);
    }
    assert_eq!(lenient.calls(), 0);
}

/// Found while writing `deeply_nested_yaml_is_refused`, with a deeper input: YAML flow nesting costs quadratic time in the
/// YAML parser (serde_norway over unsafe-libyaml-norway): 10,000 levels take 0.2 s, 40,000 take
/// 3.4 s, 100,000 (a 200 KB file) take 20 s in a release build. The config is operator input, so
/// this is not reachable by a TSS Node or a downstream; but `check-config` and a hot reload of
/// such a file spin for that long, and the reload runs on a runtime worker thread (twice: once
/// to load, once to list the files to watch). A size or nesting bound before parsing, and the
/// reload on a blocking thread, would close it.
#[test]
fn regression_a_deeply_nested_config_is_refused_quickly() {
    let nested = format!("listen: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let started = std::time::Instant::now();
    assert!(Config::parse(&nested, Path::new("/tmp/deep.yaml")).is_err());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "refused after {:?}",
        started.elapsed()
    );
}
