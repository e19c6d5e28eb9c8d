//! The TSS Node's embedded risk control rules, in the node's own YAML shape. Pure functions: a
//! rule set and a request in, a verdict out.

use std::collections::BTreeSet;

use serde::Deserialize;

use crate::protocol::RequestType;

/// `embedded_risk_control_rules` as written in `cobo-tss-node-config.yaml`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    #[serde(default)]
    pub enable: bool,
    #[serde(default)]
    pub key_gen: Option<Section<KeyGenEntry>>,
    #[serde(default)]
    pub key_sign: Option<RejectOnly>,
    #[serde(default)]
    pub key_reshare: Option<Section<KeyReshareEntry>>,
    #[serde(default)]
    pub key_share_sign: Option<RejectOnly>,
}

/// One task type's rule: reject everything, or only what matches an allow-list entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, bound(deserialize = "E: Deserialize<'de>"))]
pub struct Section<E> {
    #[serde(default)]
    pub reject_all: bool,
    #[serde(default)]
    pub allow_list: Option<Vec<E>>,
}

/// KeySign's and KeyShareSign's rule. Cobo's schema has no allow-list for them (nothing in their
/// request could match an entry), so an `allow_list` here is refused as an unknown field rather
/// than accepted and never matched.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RejectOnly {
    #[serde(default)]
    pub reject_all: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyGenEntry {
    pub threshold: u64,
    pub node_ids: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyReshareEntry {
    pub xpubkey: String,
    pub new_threshold: u64,
    pub new_node_ids: Vec<String>,
}

/// What the embedded rules said about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleVerdict {
    /// Rules are not enabled.
    Off,
    Pass,
    /// Rejected; the text names the rule.
    Reject(String),
}

#[derive(Deserialize)]
struct KeyGenDetail {
    threshold: u64,
    node_ids: Vec<String>,
}

#[derive(Deserialize)]
struct KeyReshareDetail {
    root_pub_key: String,
    new_threshold: u64,
    new_node_ids: Vec<String>,
}

// === impl RuleSet ===

impl RuleSet {
    /// True when a rule applies to `kind`: its section rejects all or has an allow-list.
    pub fn checks(&self, kind: RequestType) -> bool {
        let (reject_all, allow_list) = match kind {
            RequestType::Ping => return false,
            RequestType::KeyGen => section_rule(self.key_gen.as_ref()),
            RequestType::KeySign => reject_only_rule(self.key_sign.as_ref()),
            RequestType::KeyReshare => section_rule(self.key_reshare.as_ref()),
            RequestType::KeyShareSign => reject_only_rule(self.key_share_sign.as_ref()),
        };
        reject_all || allow_list
    }

    /// Applies the rules to a request of raw type `code` whose `request_detail` is `detail`.
    pub fn check(&self, code: i64, detail: &str) -> RuleVerdict {
        if !self.enable {
            return RuleVerdict::Off;
        }
        let Some(kind) = RequestType::from_code(code) else {
            return RuleVerdict::Reject(format!("unknown request_type {code}"));
        };
        let result = match kind {
            RequestType::Ping => Ok(()),
            RequestType::KeyGen => check_section(
                kind,
                self.key_gen.as_ref(),
                detail,
                |e, d: &KeyGenDetail| {
                    e.threshold == d.threshold && same_set(&e.node_ids, &d.node_ids)
                },
            ),
            RequestType::KeySign => check_reject_only(kind, self.key_sign.as_ref()),
            RequestType::KeyReshare => check_section(
                kind,
                self.key_reshare.as_ref(),
                detail,
                |e, d: &KeyReshareDetail| {
                    e.xpubkey == d.root_pub_key
                        && e.new_threshold == d.new_threshold
                        && same_set(&e.new_node_ids, &d.new_node_ids)
                },
            ),
            RequestType::KeyShareSign => check_reject_only(kind, self.key_share_sign.as_ref()),
        };
        match result {
            Ok(()) => RuleVerdict::Pass,
            Err(rule) => RuleVerdict::Reject(rule),
        }
    }
}

fn section_rule<E>(section: Option<&Section<E>>) -> (bool, bool) {
    section.map_or((false, false), |s| (s.reject_all, s.allow_list.is_some()))
}

fn reject_only_rule(section: Option<&RejectOnly>) -> (bool, bool) {
    (section.is_some_and(|s| s.reject_all), false)
}

fn check_reject_only(kind: RequestType, section: Option<&RejectOnly>) -> Result<(), String> {
    if section.is_some_and(|s| s.reject_all) {
        Err(format!("{} reject_all", kind.name()))
    } else {
        Ok(())
    }
}

fn check_section<E, D: serde::de::DeserializeOwned>(
    kind: RequestType,
    section: Option<&Section<E>>,
    detail: &str,
    matches: impl Fn(&E, &D) -> bool,
) -> Result<(), String> {
    let name = kind.name();
    let Some(section) = section else {
        return Ok(());
    };
    if section.reject_all {
        return Err(format!("{name} reject_all"));
    }
    let Some(list) = &section.allow_list else {
        return Ok(());
    };
    let detail: D = serde_json::from_str(detail)
        .map_err(|e| format!("{name} allow_list: request_detail unreadable: {e}"))?;
    if list.iter().any(|entry| matches(entry, &detail)) {
        Ok(())
    } else {
        Err(format!("{name} not in allow_list"))
    }
}

fn same_set(a: &[String], b: &[String]) -> bool {
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> RuleSet {
        serde_norway::from_str(yaml).unwrap()
    }

    const CONTRACT_EXAMPLE: &str = r#"
enable: true
key_gen:        { reject_all: false, allow_list: [ { threshold: 2, node_ids: [A, B, C] } ] }
key_sign:       { reject_all: false }
key_reshare:    { reject_all: false, allow_list: [ { xpubkey: XPUB, new_threshold: 2, new_node_ids: [A, B, C] } ] }
key_share_sign: { reject_all: true }
"#;

    #[test]
    fn decision_table() {
        let r = rules(CONTRACT_EXAMPLE);
        let pass = RuleVerdict::Pass;
        let reject = |s: &str| RuleVerdict::Reject(s.to_owned());
        let cases: &[(i64, &str, RuleVerdict)] = &[
            (0, "", pass.clone()),
            (
                1,
                r#"{"threshold":2,"node_ids":["C","A","B"]}"#,
                pass.clone(),
            ),
            (
                1,
                r#"{"threshold":2,"node_ids":["A","B","C"],"curve":0}"#,
                pass.clone(),
            ),
            (
                1,
                r#"{"threshold":3,"node_ids":["A","B","C"]}"#,
                reject("key_gen not in allow_list"),
            ),
            (
                1,
                r#"{"threshold":2,"node_ids":["A","B","D"]}"#,
                reject("key_gen not in allow_list"),
            ),
            (
                1,
                r#"{"threshold":2,"node_ids":["A","B"]}"#,
                reject("key_gen not in allow_list"),
            ),
            (2, "anything", pass.clone()),
            (
                3,
                r#"{"root_pub_key":"XPUB","new_threshold":2,"new_node_ids":["B","C","A"]}"#,
                pass.clone(),
            ),
            (
                3,
                r#"{"root_pub_key":"OTHER","new_threshold":2,"new_node_ids":["A","B","C"]}"#,
                reject("key_reshare not in allow_list"),
            ),
            (
                3,
                r#"{"root_pub_key":"XPUB","new_threshold":1,"new_node_ids":["A","B","C"]}"#,
                reject("key_reshare not in allow_list"),
            ),
            (5, "{}", reject("key_share_sign reject_all")),
            (4, "{}", reject("unknown request_type 4")),
            (-1, "{}", reject("unknown request_type -1")),
        ];
        for (code, detail, want) in cases {
            assert_eq!(&r.check(*code, detail), want, "type {code} detail {detail}");
        }
        assert!(
            matches!(r.check(1, "not json"), RuleVerdict::Reject(s) if s.contains("unreadable"))
        );
    }

    #[test]
    fn no_allow_list_for_signing_types() {
        for section in ["key_sign", "key_share_sign"] {
            let yaml = format!("{{ enable: true, {section}: {{ allow_list: [ {{}} ] }} }}");
            let err = serde_norway::from_str::<RuleSet>(&yaml)
                .unwrap_err()
                .to_string();
            assert!(err.contains("allow_list"), "{err}");
        }
        let r = rules("{ enable: true, key_gen: { allow_list: [] }, key_sign: { reject_all: false }, key_reshare: { reject_all: true } }");
        let checked: Vec<bool> = RequestType::ALL.iter().map(|&t| r.checks(t)).collect();
        assert_eq!(checked, [false, true, false, true, false]);
        let r = rules("{ enable: true, key_share_sign: { reject_all: true } }");
        assert!(r.checks(RequestType::KeyShareSign) && !r.checks(RequestType::KeySign));
    }

    #[test]
    fn disabled_or_absent_sections() {
        let off = rules("{ enable: false, key_sign: { reject_all: true } }");
        assert_eq!(off.check(2, ""), RuleVerdict::Off);
        assert_eq!(off.check(4, ""), RuleVerdict::Off);
        let sparse = rules("{ enable: true, key_sign: { reject_all: true } }");
        assert_eq!(sparse.check(1, "garbage"), RuleVerdict::Pass);
        assert_eq!(
            sparse.check(2, ""),
            RuleVerdict::Reject("key_sign reject_all".into())
        );
        let empty_list = rules("{ enable: true, key_gen: { allow_list: [] } }");
        assert_eq!(
            empty_list.check(1, r#"{"threshold":2,"node_ids":["A"]}"#),
            RuleVerdict::Reject("key_gen not in allow_list".into())
        );
    }
}
