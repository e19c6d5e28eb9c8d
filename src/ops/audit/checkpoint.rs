//! Checkpoints: signing one, the witness line that repeats it outside the audit folder, and
//! checking that a saved head (`<audit_log>.head`) is a checkpoint this gateway signed.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;

use super::records::{Checkpoint, CheckpointRecord, Found, KeyRotated, KeyRotatedRecord, Seal};
use super::{
    chained_line, checkpoint_message, hex, key_id, key_rotation_message, line_hash, now_rfc3339,
    parse_hex,
};
use crate::protocol::keys::{Signer, Verifier};

/// Whether checkpoints are witnessed on stderr: always under `run`; `demo` turns it off, because
/// its terminal shows a table for a person rather than a log for a pipeline to keep.
static WITNESS_ON_STDERR: AtomicBool = AtomicBool::new(true);

/// Turns the stderr witness lines off (`demo` only).
pub(crate) fn quiet_witness() {
    WITNESS_ON_STDERR.store(false, Ordering::Relaxed);
}

/// A checkpoint line the gateway wrote: the head of its chain.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    /// The line's bytes, without its newline.
    pub(crate) line: Vec<u8>,
    pub(crate) hash: [u8; 32],
    pub(crate) seq: u64,
}

/// A signed checkpoint line at `seq`, sealing `prev`, and its witness fields.
pub(crate) struct Signed {
    pub(crate) line: Vec<u8>,
    pub(crate) seq: u64,
    pub(crate) ts: String,
    key_id: String,
    signature: String,
}

/// Signs a checkpoint at `seq` over the head `prev` (RSA: runs on the writer thread only).
pub(crate) fn sign(
    signer: &Signer,
    prev: &[u8; 32],
    seq: u64,
    why: Seal,
    found: Option<&Found>,
) -> std::io::Result<Signed> {
    let reason = why.as_str();
    let ts = now_rfc3339();
    let spki = signer.public_spki_der();
    let prev_hex = hex(prev);
    let signature = signer.sign(&checkpoint_message(&prev_hex, seq, &ts, reason));
    let b64 = base64::engine::general_purpose::STANDARD;
    let id = key_id(&spki);
    let signature = b64.encode(&signature);
    let record = CheckpointRecord {
        ts: &ts,
        checkpoint: Checkpoint {
            reason,
            found,
            key_id: &id,
            public_key: &b64.encode(&spki),
            signature: &signature,
        },
    };
    let line = chained_line(&serde_json::to_vec(&record)?, seq, prev)?;
    Ok(Signed {
        line,
        seq,
        ts,
        key_id: id,
        signature,
    })
}

/// The `key_rotated` line at `seq` after the head `prev`: `old` and `new` both sign the
/// statement naming them at that place in the chain (RSA: the writer thread only).
pub(crate) fn key_rotated(
    old: &Signer,
    new: &Signer,
    prev: &[u8; 32],
    seq: u64,
) -> std::io::Result<Vec<u8>> {
    let ts = now_rfc3339();
    let b64 = base64::engine::general_purpose::STANDARD;
    let (old_spki, new_spki) = (old.public_spki_der(), new.public_spki_der());
    let (old_id, new_id) = (key_id(&old_spki), key_id(&new_spki));
    let message = key_rotation_message(&hex(prev), seq, &ts, &old_id, &new_id);
    let record = KeyRotatedRecord {
        ts: &ts,
        key_rotated: KeyRotated {
            old_key_id: &old_id,
            old_public_key: &b64.encode(&old_spki),
            new_key_id: &new_id,
            new_public_key: &b64.encode(&new_spki),
            old_signature: &b64.encode(old.sign(&message)),
            new_signature: &b64.encode(new.sign(&message)),
        },
    };
    chained_line(&serde_json::to_vec(&record)?, seq, prev)
}

// === impl Signed ===

impl Signed {
    pub(crate) fn head(&self) -> Head {
        Head {
            hash: line_hash(&self.line),
            line: self.line.clone(),
            seq: self.seq,
        }
    }

    /// Writes the witness line to stderr, whatever the log format and level: one JSON object
    /// naming the checkpoint's `seq` and the SHA-256 of its line, for the log pipeline to keep.
    pub(crate) fn witness(&self, path: &Path) {
        if !WITNESS_ON_STDERR.load(Ordering::Relaxed) {
            return;
        }
        let witness = serde_json::json!({
            "audit_checkpoint": {
                "seq": self.seq,
                "line_sha256": hex(&line_hash(&self.line)),
                "key_id": self.key_id,
                "signature": self.signature,
            },
            "path": path.display().to_string(),
            "ts": self.ts,
        });
        let mut line = witness.to_string().into_bytes();
        line.push(b'\n');
        // One write of one whole line; stderr is unbuffered and locked for it.
        let _ = std::io::stderr().lock().write_all(&line);
    }
}

/// The saved head and its `reason`, if `line` is a checkpoint signed by `signer`'s key whose
/// signature holds; otherwise why not.
pub(crate) fn verify_head(line: &[u8], signer: &Signer) -> Result<(Head, String), String> {
    #[derive(serde::Deserialize)]
    struct Cp {
        reason: String,
        key_id: String,
        signature: String,
    }
    #[derive(serde::Deserialize)]
    struct Line {
        ts: String,
        checkpoint: Cp,
        seq: u64,
        prev: String,
    }
    let parsed: Line =
        serde_json::from_slice(line).map_err(|e| format!("not a checkpoint line: {e}"))?;
    parse_hex(&parsed.prev).ok_or("its prev is not a SHA-256")?;
    let spki = signer.public_spki_der();
    let current = key_id(&spki);
    if parsed.checkpoint.key_id != current {
        // Nothing proves that key was this gateway's: whoever can write the audit folder could
        // have saved a head signed by a key of their own.
        return Err(format!(
            "signed by key sha256:{}, not by this gateway's key sha256:{current} (gateway_private_key changed while the gateway was stopped? a key rotated by a reload keeps the chain)",
            parsed.checkpoint.key_id
        ));
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(&parsed.checkpoint.signature)
        .map_err(|_| "its signature is not base64")?;
    let verifier = Verifier::from_der(&spki).ok_or("the gateway key has no usable public half")?;
    let message = checkpoint_message(
        &parsed.prev,
        parsed.seq,
        &parsed.ts,
        &parsed.checkpoint.reason,
    );
    if !verifier.verify(&message, &sig) {
        return Err("its signature does not verify".into());
    }
    let head = Head {
        line: line.to_vec(),
        hash: line_hash(line),
        seq: parsed.seq,
    };
    Ok((head, parsed.checkpoint.reason))
}
