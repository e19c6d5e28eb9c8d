//! Inbound: what the TSS Node's request meets first. [`listener`] accepts connections (and shuts
//! down gracefully), [`routes`] maps paths to handlers, [`check`] is the callback handler, [`body`]
//! reads the request body within its bounds, [`admission`] sheds load beyond `max_in_flight`,
//! [`dedup`] answers a TSS Node's retry from its twin's evaluation, and [`tls`] serves HTTPS.

pub(crate) mod admission;
pub(crate) mod body;
pub(crate) mod check;
pub(crate) mod conn;
pub(crate) mod dedup;
pub(crate) mod event;
pub mod listener;
pub(crate) mod refusal;
pub(crate) mod routes;
pub(crate) mod tls;
