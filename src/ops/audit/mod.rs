//! The audit log: one JSON line per answered request, written before the answer is sent, each
//! line chained to the one before it by a SHA-256 hash, with signed checkpoints.
//!
//! Guarantees:
//! - Every line carries `seq` (one more than the line before it) and `prev` (lowercase hex
//!   SHA-256 of the previous line's bytes without its newline; 64 zeros for the very first).
//! - One thread ([`writer`]) owns the file: requests hand it their record over a bounded channel
//!   and wait for it only until their deadline, so a stalled disk fails requests closed (status
//!   30) and never holds the async workers, the admin endpoints or shutdown. Checkpoint
//!   signatures run on that thread too.
//! - The gateway appends only to a chain it can prove is its own ([`chain`]): at start-up and
//!   after a rotation, a non-empty file at the path that does not end with the head it knows (in
//!   memory, or the signed checkpoint saved in `<audit_log>.head`) is set aside as
//!   `<audit_log>.discontinuity-<UTC time>` and the new file begins with a `discontinuity`
//!   checkpoint. `seq` never goes backwards, across restarts too.
//! - A record and the checkpoint that follows it go out in one `write`; a write that fails
//!   part-way is cut back, so the file never holds a partial line and an answer whose record
//!   failed is status 30.
//! - Every checkpoint is also one witness line on stderr ([`checkpoint`]) and the gauge
//!   `tss_gateway_audit_seq`, outside the audit folder.
//! - A reload that changes `gateway_private_key` leaves proof in the chain: a checkpoint by the
//!   old key, a `key_rotated` record signed by both keys, a checkpoint by the new key (one
//!   write). A record of an older generation still in flight never takes signing back to an
//!   older key.
//! - Records hold verdicts and errors, and with `audit_payloads` the verified CallbackRequest;
//!   never a token or a key.
//!
//! `audit verify` ([`crate::tools::verify`]) checks all of this from the files alone.

mod chain;
pub(crate) mod checkpoint;
mod config;
mod records;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aws_lc_rs::digest;

pub(crate) use config::{config_record, config_sha256, warn_if_weaker};
pub(crate) use records::{
    Alarm, AlarmRecord, EventDropped, EventDroppedRecord, EventRecord, EventSeen,
};
pub(crate) use records::{AuditRecord, Shadow};
pub use writer::AuditLog;

/// Records between two interval checkpoints, unless `audit_checkpoint_every` says otherwise.
pub(crate) const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;

/// The longest an audit record stays unsealed, unless `audit_checkpoint_ms` says otherwise; also
/// the least time between two idle checkpoints.
pub(crate) const DEFAULT_CHECKPOINT_MS: u64 = 1000;

/// `prev` of the very first record of a chain.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// What a checkpoint's signature covers, besides the fields it names: a fixed context string, so
/// the signature can never stand in for a token or anything else the gateway key signs.
const CHECKPOINT_CONTEXT: &str = "tss-callback-gateway audit checkpoint v1";

/// The context of a `key_rotated` statement: neither it nor a checkpoint signature can stand in
/// for the other.
const KEY_ROTATION_CONTEXT: &str = "tss-callback-gateway audit key rotation v1";

/// The prometheus handles the writer moves (clones of [`crate::ops::metrics::Metrics`]' own).
#[derive(Debug, Clone)]
pub(crate) struct AuditMetrics {
    pub(crate) seq: prometheus::IntGauge,
    pub(crate) discontinuities: prometheus::IntCounter,
    /// Unix time of the last discontinuity: the alert fires for a day after one, whenever it
    /// happened (a counter found at 1 on the first scrape after a restart shows no increase).
    pub(crate) last_discontinuity: prometheus::Gauge,
    pub(crate) write_failures: prometheus::IntCounter,
    /// Where the status page reads the last checkpoint from.
    pub(crate) recent: Arc<crate::ops::status::Recent>,
}

/// Counts the requests that will write an audit record and have not yet, so that the writer
/// can tell when the gateway goes idle and seal.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    count: AtomicUsize,
}

/// One request's place in [`Pending`]; given back when its record is handed over, or dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    pending: Arc<Pending>,
    open: bool,
}

/// When to seal besides every `every` records: when the gateway goes idle (at most once per
/// `within`), and `within` this long after the first unsealed record (`None`: neither).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SealPolicy {
    pub(crate) every: u64,
    pub(crate) within: Option<std::time::Duration>,
}

/// `<audit_log>.head`: the signed checkpoint line saved at start-up and at a clean shutdown.
pub(crate) fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

/// The 32 bytes of a 64-digit hex SHA-256.
pub(crate) fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// SHA-256 of one line's bytes (without its newline).
pub(crate) fn line_hash(line: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, line);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The bytes a checkpoint's signature covers: the chain head it seals (its `prev`), its `seq`,
/// `ts` and `reason`.
pub(crate) fn checkpoint_message(prev: &str, seq: u64, ts: &str, reason: &str) -> Vec<u8> {
    format!("{CHECKPOINT_CONTEXT}\nprev {prev}\nseq {seq}\nts {ts}\nreason {reason}\n").into_bytes()
}

/// The bytes both keys of a `key_rotated` record sign: its place in the chain (`prev`, `seq`,
/// `ts`) and the two key ids.
pub(crate) fn key_rotation_message(
    prev: &str,
    seq: u64,
    ts: &str,
    old_key_id: &str,
    new_key_id: &str,
) -> Vec<u8> {
    format!("{KEY_ROTATION_CONTEXT}\nprev {prev}\nseq {seq}\nts {ts}\nold {old_key_id}\nnew {new_key_id}\n")
        .into_bytes()
}

/// The key id of a public key: lowercase hex SHA-256 of its SPKI DER.
pub(crate) fn key_id(spki_der: &[u8]) -> String {
    hex(&line_hash(spki_der))
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// `body` (one JSON object) with `seq` and `prev` added, as one line without its newline.
pub(crate) fn chained_line(body: &[u8], seq: u64, prev: &[u8; 32]) -> std::io::Result<Vec<u8>> {
    let Some(open) = body.strip_suffix(b"}") else {
        return Err(std::io::Error::other("audit record is not a JSON object"));
    };
    let mut line = Vec::with_capacity(body.len() + 100);
    line.extend_from_slice(open);
    if open.len() > 1 {
        line.push(b',');
    }
    line.extend_from_slice(format!("\"seq\":{seq},\"prev\":\"{}\"}}", hex(prev)).as_bytes());
    Ok(line)
}

// === impl Pending ===

impl Pending {
    /// Counts one more request that will write a record.
    pub(crate) fn enter(self: &Arc<Self>) -> Ticket {
        self.count.fetch_add(1, Ordering::AcqRel);
        Ticket {
            pending: self.clone(),
            open: true,
        }
    }

    /// No request is pending.
    pub(crate) fn is_idle(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }
}

// === impl Ticket ===

impl Ticket {
    /// Gives the place back (the record is handed to the writer).
    fn finish(mut self) {
        self.open = false;
        self.pending.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.open {
            self.pending.count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_complete() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(
            hex(&line_hash(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
