//! Operating the gateway: what it counts ([`metrics`]), what it records ([`audit`]), what it knows
//! of the downstreams' health ([`health`]), how a new config takes over ([`reload`]) and the
//! traces it exports ([`traces`]).

pub(crate) mod audit;
pub mod health;
pub mod metrics;
pub mod reconcile;
pub mod reload;
pub mod traces;
