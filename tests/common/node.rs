//! The TSS Node: signs a request, posts it as a form, and verifies the gateway's signed answer
//! with the gateway's public key.

use std::time::{Duration, Instant};

use super::http::http;
use super::keys::keys;
use super::tokens::{open, token, CallbackResponse};

/// What the gateway answered.
#[derive(Debug)]
pub struct Reply {
    pub http: u16,
    pub response: CallbackResponse,
    pub elapsed: Duration,
    pub content_type: String,
}

impl Reply {
    pub fn approved(&self) -> bool {
        self.response.status == 0 && self.response.action == "APPROVE"
    }
    /// Asserts status and action, and that `error` contains every fragment.
    #[track_caller]
    pub fn expect(&self, status: i64, action: &str, fragments: &[&str]) {
        assert_eq!(
            (self.response.status, self.response.action.as_str()),
            (status, action),
            "unexpected answer {:?}",
            self.response
        );
        for f in fragments {
            assert!(
                self.response.error.contains(f),
                "error {:?} lacks {f:?}",
                self.response.error
            );
        }
    }
}

/// Posts a raw form body and verifies the gateway's answer with the gateway's public key.
pub async fn post_body(url: &str, body: Vec<u8>) -> Reply {
    let started = Instant::now();
    let resp = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let elapsed = started.elapsed();
    let token: String = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("answer {text:?} is not a JSON string: {e}"));
    let payload = open(&token, &keys().gateway.decoding())
        .expect("the gateway's answer verifies with its public key");
    let response = serde_json::from_slice(&payload).unwrap();
    Reply {
        http: status,
        response,
        elapsed,
        content_type,
    }
}

/// The form body that carries `token`.
pub fn form(token: &str) -> Vec<u8> {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("TSS_JWT_MSG", token)
        .finish()
        .into_bytes()
}

/// The form body a TSS Node posts for `payload`.
pub fn node_form(payload: &[u8]) -> Vec<u8> {
    form(&token(&keys().node.encoding(), payload, "tss-node"))
}

pub async fn post_token(url: &str, token: &str) -> Reply {
    post_body(url, form(token)).await
}

/// Sends `payload` as the TSS Node would.
pub async fn send(url: &str, payload: &[u8]) -> Reply {
    post_body(url, node_form(payload)).await
}
