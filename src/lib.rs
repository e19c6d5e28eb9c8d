//! tss-callback-gateway: the one callback server a Cobo TSS Node talks to, which asks every
//! configured risk-control callback server at once and approves only if all of them (and the
//! node's embedded rules) do.
//!
//! The modules below are listed in the order a request meets them (one blank line apart, so that
//! rustfmt keeps that order): it arrives [`inbound`], its token and payload are read by
//! [`protocol`], [`rules`] apply, [`outbound`] asks the downstreams, `verdict` decides, [`ops`]
//! audits and counts it, and [`inbound`] signs the answer with the request's [`generation`].
//! [`tools`] are what operators run beside it.
// The module docs are for maintainers and name the private modules on purpose.
#![allow(rustdoc::private_intra_doc_links)]

// The YAML schema, defaults and validation with field-named errors.
pub mod config;

// One loaded config: keys parsed, clients built; signs with its own keys.
pub mod generation;

// The state every request shares, across generations.
mod gateway;

// The Cobo envelope, RS256 tokens and RSA keys.
pub mod protocol;

// Data: each server's verdict, the decision, and the pure `decide()`.
mod verdict;

// The embedded risk control rules (pure, no I/O).
pub mod rules;

// The listener, the callback route, body reading, duplicate memory, admission, TLS.
pub mod inbound;

// Fan-out and shadow calls, one call, the HTTP client, TLS toward downstreams.
pub mod outbound;

// Metrics, the audit log, health checks, hot reload, reconciliation.
pub mod ops;

// The state store: event outbox, approvals index, alarms (SQLite or PostgreSQL).
pub mod state;

// Probe, demo, sample servers, `audit verify`, `replay`: run by operators, not on the path.
pub mod tools;

pub use gateway::{OpenError, Shared};
