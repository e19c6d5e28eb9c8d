//! Tokens as a TSS Node or a callback server makes them, signed and verified with `jsonwebtoken`
//! (crypto that shares nothing with the gateway), and the callback answer they carry.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const B64: base64::engine::general_purpose::GeneralPurpose =
    base64::engine::general_purpose::STANDARD;

#[derive(Serialize, Deserialize, Debug)]
pub struct Claims {
    pub package_data: String,
    pub exp: u64,
    #[serde(default)]
    pub iss: String,
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// An RS256 token as a TSS Node (or a callback server) makes it.
pub fn token(key: &EncodingKey, payload: &[u8], iss: &str) -> String {
    token_with(key, Algorithm::RS256, payload, iss, now() + 120)
}

pub fn token_with(
    key: &EncodingKey,
    alg: Algorithm,
    payload: &[u8],
    iss: &str,
    exp: u64,
) -> String {
    let claims = Claims {
        package_data: B64.encode(payload),
        exp,
        iss: iss.into(),
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

/// Verifies an RS256 token and returns the decoded `package_data` bytes.
pub fn open(token: &str, key: &DecodingKey) -> Result<Vec<u8>, String> {
    let data = jsonwebtoken::decode::<Claims>(token, key, &Validation::new(Algorithm::RS256))
        .map_err(|e| e.to_string())?;
    B64.decode(data.claims.package_data)
        .map_err(|e| e.to_string())
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CallbackResponse {
    pub request_id: String,
    pub status: i64,
    pub action: String,
    #[serde(default)]
    pub error: String,
}

/// The `TSS_JWT_MSG` field of a form body, empty if it has none.
pub fn form_token(form: &[u8]) -> String {
    form_urlencoded::parse(form)
        .find(|(k, _)| k == "TSS_JWT_MSG")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// True if `text` holds something shaped like a JWT: a base64url JSON header, a dot, and a
/// base64url JSON payload (`eyJ…​.eyJ…`). Plain `eyJ` is not enough: a checkpoint's base64
/// signature contains it by chance in about one log in a few hundred.
pub fn contains_jwt(text: &str) -> bool {
    let b64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices("eyJ").any(|(i, _)| {
        let rest = &text[i..];
        let header_len = rest.find(|c: char| !b64url(c)).unwrap_or(rest.len());
        rest[header_len..].starts_with(".eyJ")
    })
}
