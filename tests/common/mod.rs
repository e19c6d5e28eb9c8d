//! Test harness: keys made by `openssl`, downstream callback servers and a TSS Node client that
//! sign and verify with `jsonwebtoken` (crypto that shares nothing with the gateway), and the
//! gateway itself served on loopback. One module a topic; tests import each item by its path.
#![allow(dead_code)]

pub mod downstream;
pub mod events;
pub mod gateway;
pub mod http;
pub mod keys;
pub mod node;
pub mod pki;
pub mod requests;
pub mod tokens;

/// SHA-256 hex of `bytes`, computed here (not by the gateway's code).
pub fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Polls `done` every 20 ms until it holds, failing after `secs` seconds with `what`.
pub async fn until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
