//! What operators run beside the gateway, not on the request path: [`probe`] plays a TSS Node
//! once, [`demo`] runs everything in one process, [`sample_server`] is a downstream callback
//! server for demos and tests, [`verify`] checks audit files, [`replay`] re-decides recorded
//! requests under a candidate config and [`reconcile`] finds executions nobody approved.

pub mod demo;
pub mod probe;
pub mod reconcile;
pub mod replay;
pub mod sample_server;
pub mod verify;
