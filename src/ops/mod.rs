//! Operating the gateway: what it counts ([`metrics`]), what it records ([`audit`]), what it knows
//! of the downstreams' health ([`health`]), how a new config takes over ([`reload`]), the
//! traces it exports ([`traces`]) and the operator's page that shows it all ([`status`]).

pub(crate) mod audit;
pub mod health;
pub mod metrics;
pub mod reconcile;
pub mod reload;
pub(crate) mod status;
pub mod traces;
