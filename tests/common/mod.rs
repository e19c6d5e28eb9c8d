//! Test harness: keys made by `openssl`, downstream callback servers and a TSS Node client that
//! sign and verify with `jsonwebtoken` (crypto that shares nothing with the gateway), and the
//! gateway itself served on loopback. One module a topic; tests import each item by its path.
#![allow(dead_code)]

pub mod downstream;
pub mod gateway;
pub mod http;
pub mod keys;
pub mod node;
pub mod pki;
pub mod requests;
pub mod tokens;
