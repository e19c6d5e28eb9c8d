//! What travels between the TSS Node, the gateway and the downstreams: the Cobo envelope
//! ([`envelope`]), the RS256 token that carries it ([`token`]) and the RSA keys that sign and
//! verify it ([`keys`]); private-key signatures run on [`signing_pool`]'s threads.

mod envelope;
pub mod event;
pub mod keys;
pub(crate) mod signing_pool;
mod token;

pub(crate) use envelope::{type_name, FORM_FIELD};
pub use envelope::{
    Action, CallbackRequest, CallbackResponse, PayloadError, RequestType, Status,
    MAX_REQUEST_ID_BYTES,
};
pub(crate) use token::sign_token_pooled;
pub use token::{decode_package, now_secs, sign_token, verify_token, Claims, TokenError};
