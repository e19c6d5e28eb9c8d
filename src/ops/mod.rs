//! Operating the gateway: what it counts ([`metrics`]), what it records ([`audit`]), what it knows
//! of the downstreams' health ([`health`]) and how a new config takes over ([`reload`]).

pub(crate) mod audit;
pub mod health;
pub mod metrics;
pub mod reconcile;
pub mod reload;
