//! The status-20 answers (no valid token), signed in advance: nothing is known about such a
//! caller, so answering it must cost no RSA work (CONTRACT.md section 6).
//!
//! Guarantees: the answer's `error` is one of a few fixed texts, one per kind of refusal (the
//! specific reason goes to the log and the audit record only), so each text needs one token per
//! config generation; a token is renewed off the request path once half its lifetime has passed,
//! and is never handed out expired. Only the first refusal of a kind (or one after a long quiet
//! spell) waits for a signature, and concurrent ones wait for that same signature.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::protocol::keys::Signer;
use crate::protocol::{self, Action, CallbackResponse, Status, TokenError};

/// The form has no `TSS_JWT_MSG` field.
pub(crate) const FORM_MISSING: &str = "form field TSS_JWT_MSG missing";
/// The form has it more than once.
pub(crate) const FORM_TWICE: &str = "form field TSS_JWT_MSG given more than once";
const MALFORMED: &str = "token is not a JWT";
const ALGORITHM: &str = "token alg is not allowed (RS256 only)";
const SIGNATURE: &str = "token signature does not verify with the expected key";
const EXPIRED: &str = "token expired";
const CLAIMS: &str = "token claims invalid";

/// The fixed answer text for a token that did not verify.
pub(crate) fn of_token(e: &TokenError) -> &'static str {
    match e {
        TokenError::Malformed(_) => MALFORMED,
        TokenError::Algorithm(_) => ALGORITHM,
        TokenError::Signature => SIGNATURE,
        TokenError::Expired { .. } => EXPIRED,
        TokenError::Claims(_) => CLAIMS,
    }
}

/// One generation's status-20 tokens, by answer text.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    tokens: Arc<Mutex<HashMap<&'static str, Presigned>>>,
}

#[derive(Debug)]
struct Presigned {
    token: Arc<str>,
    /// Half its lifetime: from here on it is renewed in the background.
    renew_at: Instant,
    /// Not handed out from here on (a second before its `exp`).
    stale_at: Instant,
    renewing: bool,
}

/// What a token is signed with: one generation's key, `iss` and lifetime.
#[derive(Clone)]
pub(crate) struct Signing {
    pub(crate) signer: Signer,
    pub(crate) iss: String,
    pub(crate) expire_secs: i64,
}

// === impl Refusals ===

impl Refusals {
    /// The signed status-20 answer whose `error` is `text`. Empty (which no one accepts: fail
    /// closed) only if the signing pool could not sign.
    pub(crate) async fn token(
        &self,
        text: &'static str,
        signing: impl FnOnce() -> Signing,
    ) -> Arc<str> {
        let mut tokens = self.tokens.lock().await;
        let now = Instant::now();
        match tokens.get_mut(text) {
            Some(p) if now < p.renew_at => return p.token.clone(),
            Some(p) if now < p.stale_at => {
                if !p.renewing {
                    p.renewing = true;
                    tokio::spawn(renew(self.tokens.clone(), text, signing()));
                }
                return p.token.clone();
            }
            _ => {}
        }
        // None yet, or stale: signed here once; concurrent refusals wait for it on the lock.
        let p = presign(text, &signing()).await;
        let token = p.token.clone();
        tokens.insert(text, p);
        token
    }
}

/// Signs a fresh token for `text` and puts it in place of the old one.
async fn renew(
    tokens: Arc<Mutex<HashMap<&'static str, Presigned>>>,
    text: &'static str,
    signing: Signing,
) {
    let p = presign(text, &signing).await;
    tokens.lock().await.insert(text, p);
}

async fn presign(text: &'static str, s: &Signing) -> Presigned {
    let answer = CallbackResponse::new("", Status::InvalidToken, Action::Reject, text.to_owned());
    let json = serde_json::to_vec(&answer).unwrap_or_default();
    let signed = Instant::now();
    let token: Arc<str> =
        protocol::sign_token_pooled(&s.signer, json, s.iss.clone(), s.expire_secs)
            .await
            .into();
    let life = Duration::from_secs(s.expire_secs.max(1) as u64);
    Presigned {
        // An empty token (the pool could not sign) is tried again by the next refusal.
        renew_at: if token.is_empty() {
            signed
        } else {
            signed + life / 2
        },
        stale_at: if token.is_empty() {
            signed
        } else {
            signed + life.saturating_sub(Duration::from_secs(1))
        },
        token,
        renewing: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::keys::{self, Verifier};

    /// Same token while fresh; a new one (later `exp`) once half its lifetime has passed, signed
    /// in the background while the old one is still handed out; never an expired one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_are_reused_then_renewed_and_never_expired() {
        let dir = tempfile::tempdir().unwrap();
        let files = keys::generate(dir.path(), "gw").unwrap();
        let verifier = Verifier::load(&files.public).unwrap();
        let signing = Signing {
            signer: Signer::load(&files.private).unwrap(),
            iss: "gw".into(),
            expire_secs: 4,
        };
        let refusals = Refusals::default();
        let get = || refusals.token(EXPIRED, || signing.clone());
        let first = get().await;
        assert!(!first.is_empty());
        for _ in 0..20 {
            assert_eq!(get().await, first);
        }
        let claims = |t: &str| protocol::verify_token(t, &verifier, protocol::now_secs()).unwrap();
        let answer: CallbackResponse = serde_json::from_slice(
            &protocol::decode_package(&claims(&first).package_data).unwrap(),
        )
        .unwrap();
        assert_eq!(
            answer,
            CallbackResponse::new("", Status::InvalidToken, Action::Reject, EXPIRED.into())
        );
        let first_exp = claims(&first).exp;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let mut renewed = None;
        for _ in 0..300 {
            let t = get().await;
            // Whatever is handed out verifies and has not expired.
            let exp = claims(&t).exp;
            if t != first {
                assert!(exp > first_exp);
                renewed = Some(t);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let renewed = renewed.expect("renewed after half its lifetime");
        assert_eq!(get().await, renewed);
    }
}
