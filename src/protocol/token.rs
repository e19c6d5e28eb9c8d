//! RS256 tokens: the signed envelope that carries a CallbackRequest or CallbackResponse as base64
//! `package_data`, and the bounded pool that runs the request path's RSA signing.
//!
//! Token handling is deliberately narrow: exactly three dot-separated parts, a header whose `alg`
//! is `RS256` and nothing else, a valid signature by the one key the caller expects, an `exp` in
//! the future. Everything else is refused before the payload is looked at.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, Engine};
use serde::{Deserialize, Serialize};

use super::envelope::PayloadError;
use super::keys::{Signer, Verifier};

const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const B64STD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a token was refused (status 20 inbound; bad_signature/bad_response downstream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a JWT: {0}")]
    Malformed(String),
    #[error("token alg {0:?} is not allowed (RS256 only)")]
    Algorithm(String),
    #[error("token signature does not verify with the expected key")]
    Signature,
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    #[error("token claims invalid: {0}")]
    Claims(String),
}

/// The verified claims of a token.
#[derive(Debug, Clone)]
pub struct Claims {
    /// `package_data` as sent: base64 of the payload, decoded by [`decode_package`].
    pub package_data: String,
    pub iss: Option<String>,
    pub exp: i64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct RawClaims {
    package_data: String,
    exp: serde_json::Number,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    nbf: Option<serde_json::Number>,
}

#[derive(Serialize)]
struct OutClaims<'a> {
    package_data: &'a str,
    exp: i64,
    iss: &'a str,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Standard base64 with padding, as Cobo's templates put in `package_data`.
pub(crate) fn encode_package(bytes: &[u8]) -> String {
    B64STD.encode(bytes)
}

/// Decodes `package_data`: standard alphabet, padding optional.
pub fn decode_package(text: &str) -> Result<Vec<u8>, PayloadError> {
    B64STD
        .decode(text.trim())
        .map_err(|e| PayloadError::Base64(e.to_string()))
}

/// Signs `package` (raw bytes, base64-encoded here) into an RS256 token with `iss` and `exp`.
pub fn sign_token(signer: &Signer, package: &[u8], iss: &str, expire_secs: i64) -> String {
    let header = B64URL.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let package_data = encode_package(package);
    let claims = OutClaims {
        package_data: &package_data,
        exp: now_secs() + expire_secs,
        iss,
    };
    // Serializing a struct of strings and an integer cannot fail.
    let claims = serde_json::to_vec(&claims).unwrap_or_default();
    let mut token = String::with_capacity(header.len() + claims.len() * 4 / 3 + 360);
    token.push_str(&header);
    token.push('.');
    B64URL.encode_string(&claims, &mut token);
    let sig = signer.sign(token.as_bytes());
    token.push('.');
    B64URL.encode_string(&sig, &mut token);
    token
}

/// [`sign_token`] on the bounded signing pool ([`on_signing_pool`]), off the async
/// worker threads: what the request path uses. Returns an empty string (which no one accepts:
/// fail closed) only if the signing job could not run.
pub(crate) async fn sign_token_pooled(
    signer: &Signer,
    package: Vec<u8>,
    iss: String,
    expire_secs: i64,
) -> String {
    let signer = signer.clone();
    on_signing_pool(move || sign_token(&signer, &package, &iss, expire_secs))
        .await
        .unwrap_or_else(|| {
            tracing::error!("signing job failed; answering with an empty token");
            String::new()
        })
}

/// Verifies an RS256 token with `verifier` and returns its claims, `package_data` decoded.
pub fn verify_token(token: &str, verifier: &Verifier, now: i64) -> Result<Claims, TokenError> {
    let token = token.trim();
    let mut parts = token.splitn(4, '.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let header = B64URL
        .decode(h)
        .map_err(|e| TokenError::Malformed(format!("header is not base64url: {e}")))?;
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| TokenError::Malformed(format!("header is not JSON with alg: {e}")))?;
    if header.alg != "RS256" {
        return Err(TokenError::Algorithm(header.alg));
    }
    let sig = B64URL
        .decode(s)
        .map_err(|e| TokenError::Malformed(format!("signature is not base64url: {e}")))?;
    let signed_len = h.len() + 1 + c.len();
    if !verifier.verify(&token.as_bytes()[..signed_len], &sig) {
        return Err(TokenError::Signature);
    }
    let claims = B64URL
        .decode(c)
        .map_err(|e| TokenError::Claims(format!("not base64url: {e}")))?;
    let claims: RawClaims =
        serde_json::from_slice(&claims).map_err(|e| TokenError::Claims(e.to_string()))?;
    let exp =
        number_secs(&claims.exp).ok_or_else(|| TokenError::Claims("exp is not a number".into()))?;
    if exp <= now {
        return Err(TokenError::Expired { exp, now });
    }
    if let Some(nbf) = claims.nbf.as_ref().and_then(number_secs) {
        if nbf > now {
            return Err(TokenError::Claims(format!("not valid before {nbf}")));
        }
    }
    Ok(Claims {
        package_data: claims.package_data,
        iss: claims.iss,
        exp,
    })
}

fn number_secs(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| n.as_f64().map(|f| f.floor() as i64))
}

// === signing pool ===

/// Runs `work` (RSA private-key signing) on the signing pool ([`super::signing_pool`]), off the
/// async worker threads. `None` only if the job panicked or could not run; callers then fail
/// closed.
pub(crate) async fn on_signing_pool<T, F>(work: F) -> Option<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    super::signing_pool::run(work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Signer, Verifier) {
        let dir = tempfile::tempdir().unwrap();
        let files = crate::protocol::keys::generate(dir.path(), "k").unwrap();
        (
            Signer::load(&files.private).unwrap(),
            Verifier::load(&files.public).unwrap(),
        )
    }

    #[test]
    fn round_trip_and_refusals() {
        let (signer, verifier) = pair();
        let (_, other) = pair();
        let token = sign_token(&signer, b"{\"a\":1}", "me", 120);
        let claims = verify_token(&token, &verifier, now_secs()).unwrap();
        assert_eq!(decode_package(&claims.package_data).unwrap(), b"{\"a\":1}");
        assert_eq!(claims.iss.as_deref(), Some("me"));

        assert_eq!(
            verify_token(&token, &other, now_secs()).unwrap_err(),
            TokenError::Signature
        );
        assert!(matches!(
            verify_token(&token, &verifier, now_secs() + 121),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            verify_token("a.b", &verifier, 0),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify_token(&format!("{token}.x"), &verifier, 0),
            Err(TokenError::Malformed(_))
        ));

        // Same claims and signature under a header that names another algorithm.
        let (_, claims_and_sig) = token.split_once('.').unwrap();
        for alg in ["none", "HS256", "RS512", "PS256", "rs256"] {
            let h = B64URL.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            assert_eq!(
                verify_token(&format!("{h}.{claims_and_sig}"), &verifier, now_secs()).unwrap_err(),
                TokenError::Algorithm(alg.into())
            );
        }

        // A flipped bit in the claims breaks the signature.
        let (h, rest) = token.split_once('.').unwrap();
        let (c, s) = rest.split_once('.').unwrap();
        let mut c = c.to_owned().into_bytes();
        c[5] ^= 1;
        let tampered = format!("{h}.{}.{s}", String::from_utf8(c).unwrap());
        assert!(verify_token(&tampered, &verifier, now_secs()).is_err());
    }

    /// A token with exactly these claims, signed RS256.
    fn with_claims(signer: &Signer, claims: &str) -> String {
        let signed = format!(
            "{}.{}",
            B64URL.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            B64URL.encode(claims)
        );
        let sig = B64URL.encode(signer.sign(signed.as_bytes()));
        format!("{signed}.{sig}")
    }

    #[test]
    fn nbf_and_exp_boundaries() {
        let (signer, verifier) = pair();
        let now = 1_700_000_000i64;
        let pd = encode_package(b"{}");
        let check = |exp: &str, nbf: Option<&str>| {
            let nbf = nbf.map_or(String::new(), |n| format!(r#","nbf":{n}"#));
            let claims = format!(r#"{{"package_data":"{pd}","exp":{exp}{nbf}}}"#);
            verify_token(&with_claims(&signer, &claims), &verifier, now)
        };
        let later = (now + 60).to_string();
        // nbf in the past, now, or within the same second: valid.
        for nbf in [now - 10, now] {
            assert!(check(&later, Some(&nbf.to_string())).is_ok(), "nbf {nbf}");
        }
        assert!(check(&later, Some(&format!("{now}.5"))).is_ok());
        // nbf in the future: not yet valid.
        for nbf in [
            format!("{}", now + 1),
            format!("{}", now + 3600),
            format!("{now}9.5"),
        ] {
            assert_eq!(
                check(&later, Some(&nbf)).unwrap_err(),
                TokenError::Claims(format!(
                    "not valid before {}",
                    nbf.parse::<f64>().unwrap().floor() as i64
                ))
            );
        }
        // exp exactly now is expired; one second later is not.
        assert_eq!(
            check(&now.to_string(), None).unwrap_err(),
            TokenError::Expired { exp: now, now }
        );
        assert_eq!(
            check(&format!("{now}.9"), None).unwrap_err(),
            TokenError::Expired { exp: now, now }
        );
        assert!(check(&(now + 1).to_string(), None).is_ok());
        assert!(matches!(
            check("\"soon\"", None),
            Err(TokenError::Claims(_))
        ));
    }
}
