//! One audit line as verification reads it, and the checks of a checkpoint's signature and of
//! a `key_rotated` record's two signatures.

use std::borrow::Cow;

use base64::Engine;
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::ops::audit::{checkpoint_message, key_id, key_rotation_message};
use crate::protocol::keys::Verifier;

/// The reason of the checkpoint that opens a file the gateway began because it found one it
/// could not prove its own (CONTRACT.md section 8).
pub(super) const DISCONTINUITY: &str = "discontinuity";

/// The fields verification reads; the rest of a record is covered by its hash.
#[derive(Deserialize)]
pub(super) struct Line<'a> {
    #[serde(borrow, default)]
    pub(super) ts: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) seq: Option<u64>,
    #[serde(borrow, default)]
    pub(super) prev: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(super) checkpoint: Option<CheckpointFields<'a>>,
    #[serde(borrow, default)]
    pub(super) key_rotated: Option<KeyRotatedFields<'a>>,
    /// With `status`, marks a decision record (one answer to the node).
    #[serde(default)]
    request_id: Option<IgnoredAny>,
    #[serde(default)]
    status: Option<IgnoredAny>,
}

#[derive(Deserialize)]
pub(super) struct CheckpointFields<'a> {
    #[serde(borrow)]
    pub(super) reason: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) key_id: Cow<'a, str>,
    #[serde(borrow)]
    public_key: Cow<'a, str>,
    #[serde(borrow)]
    signature: Cow<'a, str>,
    /// What a `discontinuity` checkpoint found at the path and set aside.
    #[serde(default)]
    pub(super) found: Option<Found>,
}

/// A `key_rotated` record: the old and the new gateway key, each signing the statement that
/// binds them to this place in the chain.
#[derive(Deserialize)]
pub(super) struct KeyRotatedFields<'a> {
    #[serde(borrow)]
    pub(super) old_key_id: Cow<'a, str>,
    #[serde(borrow)]
    old_public_key: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) new_key_id: Cow<'a, str>,
    #[serde(borrow)]
    new_public_key: Cow<'a, str>,
    #[serde(borrow)]
    old_signature: Cow<'a, str>,
    #[serde(borrow)]
    new_signature: Cow<'a, str>,
}

/// A `key_rotated` record whose signatures hold: from `seq` on, `new` signs instead of `old`.
pub(super) struct Rotation {
    pub(super) seq: u64,
    pub(super) old_key_id: String,
    pub(super) new_key_id: String,
    /// The new key is one of the pinned keys.
    pub(super) new_pinned: bool,
}

/// The file a discontinuity set aside, as its checkpoint names it.
#[derive(Deserialize, Default)]
pub(super) struct Found {
    #[serde(default)]
    pub(super) file: String,
    #[serde(default)]
    pub(super) last_seq: Option<u64>,
    #[serde(default)]
    pub(super) unsealed_lines: Option<u64>,
}

/// Why a checkpoint does not count.
pub(super) enum CheckpointError {
    /// Its signature or key fields are wrong: tampering.
    Bad(String),
    /// A valid signature by the key it carries, which is not among the pinned (it may still be
    /// vouched for by a `key_rotated` record later in the files).
    NotPinned,
}

// === impl Line ===

impl Line<'_> {
    /// A decision record: the gateway's answer to one request.
    pub(super) fn is_decision(&self) -> bool {
        self.checkpoint.is_none() && self.request_id.is_some() && self.status.is_some()
    }

    /// The checkpoint that opens a file after a discontinuity.
    pub(super) fn discontinuity(&self) -> Option<&CheckpointFields<'_>> {
        self.checkpoint
            .as_ref()
            .filter(|cp| cp.reason == DISCONTINUITY)
    }
}

/// Checks both signatures of a `key_rotated` record at `seq` after `prev`, each by the key it
/// names (its id the hash of the key it carries): any failure is tampering.
pub(super) fn check_rotation(
    kr: &KeyRotatedFields<'_>,
    prev: &str,
    seq: u64,
    ts: &str,
    pinned: &[Verifier],
) -> Result<Rotation, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let message = key_rotation_message(prev, seq, ts, &kr.old_key_id, &kr.new_key_id);
    let signed_by = |which: &str, id: &str, public_key: &str, signature: &str| {
        let spki = b64
            .decode(public_key.as_bytes())
            .map_err(|_| format!("{which}_public_key is not base64"))?;
        if key_id(&spki) != id {
            return Err(format!(
                "{which}_key_id is not the hash of {which}_public_key"
            ));
        }
        let key = Verifier::from_der(&spki)
            .ok_or_else(|| format!("{which}_public_key is not an RSA public key"))?;
        let sig = b64
            .decode(signature.as_bytes())
            .map_err(|_| format!("{which}_signature is not base64"))?;
        if !key.verify(&message, &sig) {
            return Err(format!(
                "{which}_signature does not verify with {which}_public_key"
            ));
        }
        Ok(sig)
    };
    signed_by("old", &kr.old_key_id, &kr.old_public_key, &kr.old_signature)?;
    let new_sig = signed_by("new", &kr.new_key_id, &kr.new_public_key, &kr.new_signature)?;
    Ok(Rotation {
        seq,
        old_key_id: kr.old_key_id.clone().into_owned(),
        new_key_id: kr.new_key_id.clone().into_owned(),
        new_pinned: pinned.iter().any(|v| v.verify(&message, &new_sig)),
    })
}

/// Checks a checkpoint's key and signature over the head it seals (`prev`, `seq`, `ts`): the
/// signature must verify with the key it carries and, when keys are `pinned`, with one of them.
pub(super) fn check_checkpoint(
    cp: &CheckpointFields<'_>,
    prev: &str,
    seq: u64,
    ts: &str,
    pinned: &[Verifier],
) -> Result<(), CheckpointError> {
    let bad = |why: &str| CheckpointError::Bad(why.to_owned());
    let b64 = base64::engine::general_purpose::STANDARD;
    let spki = b64
        .decode(cp.public_key.as_bytes())
        .map_err(|_| bad("public_key is not base64"))?;
    if key_id(&spki) != cp.key_id {
        return Err(bad("key_id is not the hash of public_key"));
    }
    let sig = b64
        .decode(cp.signature.as_bytes())
        .map_err(|_| bad("signature is not base64"))?;
    let message = checkpoint_message(prev, seq, ts, &cp.reason);
    let carried =
        Verifier::from_der(&spki).ok_or_else(|| bad("public_key is not an RSA public key"))?;
    if !carried.verify(&message, &sig) {
        return Err(bad("signature does not verify"));
    }
    if pinned.is_empty() || pinned.iter().any(|v| v.verify(&message, &sig)) {
        Ok(())
    } else {
        Err(CheckpointError::NotPinned)
    }
}
