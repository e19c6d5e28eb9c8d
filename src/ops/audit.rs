//! The audit log: one JSON line per answered request, written before the answer is sent, each
//! line chained to the one before it by a SHA-256 hash, with signed checkpoints.
//!
//! Guarantees:
//! - Every record carries `seq` (one more than the record before it) and `prev` (lowercase hex
//!   SHA-256 of the previous line's bytes without its newline; 64 zeros for the very first). The
//!   chain continues across restarts (the head is read from the end of the existing file at open)
//!   and across rotation (the first record of a new file chains to the last line of the old one).
//! - `prev` is computed and the line written under one lock, so concurrent requests never fork or
//!   interleave the chain.
//! - A checkpoint record, signed with the gateway key, closes every `audit_checkpoint_every`
//!   records, and every file: at shutdown, and when the file was renamed or deleted (the closing
//!   checkpoint goes to the old file, then the next record to a new file at the configured path),
//!   or when a reload points `audit_log` elsewhere.
//! - A live log is sealed too: the record written while no other request is being decided is
//!   followed, under the same lock and before its answer is sent, by a checkpoint; under steady
//!   load (some request always in flight) a checkpoint follows within `audit_checkpoint_ms` of
//!   the first unsealed record. So once every answer is out, the file ends in a checkpoint.
//! - Each line goes out in a single `write` on a file opened for append, so a crash leaves
//!   complete lines (the kernel has them once `write` returns, even if the process is killed).
//! - Records hold verdicts and errors, and with `audit_payloads` the verified CallbackRequest;
//!   never a token or a key.
//!
//! `audit verify` ([`crate::tools::verify`]) checks all of this from the files alone.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use base64::Engine;
use serde::Serialize;

use crate::protocol::keys::Signer;
use crate::verdict::{Embedded, Verdict};

/// Records between two interval checkpoints, unless `audit_checkpoint_every` says otherwise.
pub(crate) const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;

/// The longest an audit record stays unsealed under steady load, unless `audit_checkpoint_ms`
/// says otherwise.
pub(crate) const DEFAULT_CHECKPOINT_MS: u64 = 1000;

/// `prev` of the very first record of a chain.
pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// What a checkpoint's signature covers, besides the fields it names: a fixed context string, so
/// the signature can never stand in for a token or anything else the gateway key signs.
const CHECKPOINT_CONTEXT: &str = "tss-callback-gateway audit checkpoint v1";

/// An append-only, hash-chained JSON-lines file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<State>,
}

/// The open file and the head of the chain; only touched under the lock.
#[derive(Debug)]
struct State {
    file: File,
    /// (device, inode) of `file`, to see that the path now names another file (rotation).
    id: (u64, u64),
    /// SHA-256 of the last line written.
    head: [u8; 32],
    /// `seq` of the last line written (0 before the first).
    seq: u64,
    /// Records since the last checkpoint.
    unsealed: u64,
    /// A write failed part-way: the file's end is re-read before the next record.
    dirty: bool,
    /// When the oldest record not yet covered by a checkpoint was written.
    unsealed_since: Option<Instant>,
    /// A reload pointed `audit_log` elsewhere: a request that still writes here is sealed at once.
    retired: bool,
}

/// Counts the requests that will write an audit record and have not yet, so that the one
/// written last before the gateway goes idle can be sealed at once.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    count: AtomicUsize,
    /// Woken when a request ends without writing a record and was the last one pending.
    idle: tokio::sync::Notify,
}

/// One request's place in [`Pending`]; given back when its record is written, or when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    pending: Arc<Pending>,
    open: bool,
}

/// When to seal besides every `every` records: when the gateway goes idle, and `within` this
/// long of the first unsealed record (`None`: neither).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SealPolicy {
    pub(crate) every: u64,
    pub(crate) within: Option<Duration>,
}

/// One answered request.
#[derive(Debug, Serialize)]
pub(crate) struct AuditRecord<'a> {
    /// RFC 3339 UTC with milliseconds.
    pub(crate) ts: String,
    pub(crate) request_id: &'a str,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) status: i64,
    pub(crate) action: &'static str,
    pub(crate) error: &'a str,
    pub(crate) duration_ms: f64,
    /// `off`, `pass`, `reject: <rule>`, or `not_evaluated` (the token or payload was refused).
    pub(crate) embedded: &'a Embedded,
    pub(crate) servers: &'a [Verdict],
    pub(crate) config_generation: u64,
    /// Present (true) only for a TSS Node retry answered from its twin's evaluation.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) duplicate: bool,
    /// The verified CallbackRequest, with `audit_payloads: true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) request: Option<&'a serde_json::Value>,
}

/// Why a checkpoint was written (its `reason`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Seal {
    /// `audit_checkpoint_every` records since the last one.
    Interval,
    /// The gateway is stopping.
    Shutdown,
    /// The file was renamed or deleted: this checkpoint closes the old file.
    Rotation,
    /// No request is being decided any more.
    Idle,
    /// `audit_checkpoint_ms` since the first unsealed record, under steady load.
    Elapsed,
    /// A reload pointed `audit_log` elsewhere: this checkpoint closes this file.
    Reconfigured,
}

/// The `checkpoint` object of a checkpoint record.
#[derive(Debug, Serialize)]
struct Checkpoint<'a> {
    reason: &'static str,
    /// Lowercase hex SHA-256 of the signing key's SPKI DER.
    key_id: &'a str,
    /// Standard base64 of the signing key's SPKI DER.
    public_key: &'a str,
    /// Standard base64 RS256 signature of [`checkpoint_message`].
    signature: &'a str,
}

#[derive(Serialize)]
struct CheckpointRecord<'a> {
    ts: &'a str,
    checkpoint: Checkpoint<'a>,
}

/// The chain head saved at shutdown (`<audit_log>.head`).
#[derive(Serialize, serde::Deserialize)]
struct SavedHead {
    seq: u64,
    head: String,
}

fn head_path(log: &Path) -> PathBuf {
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

/// The key id of a public key: lowercase hex SHA-256 of its SPKI DER.
pub(crate) fn key_id(spki_der: &[u8]) -> String {
    hex(&line_hash(spki_der))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn file_id(m: &fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

// === impl AuditLog ===

impl AuditLog {
    /// Opens (creating it and its folder if needed) the log at `path` and picks up the head of
    /// its chain from its last line.
    pub(crate) fn open(path: &Path) -> std::io::Result<AuditLog> {
        // Left by the last clean shutdown: where the chain stood, in case the file was rotated
        // away while the gateway was stopped. Only valid until the next start.
        let saved = fs::read(head_path(path))
            .ok()
            .and_then(|b| serde_json::from_slice::<SavedHead>(&b).ok())
            .and_then(|h| Some((parse_hex(&h.head)?, h.seq)));
        let state = State::open(path, saved)?;
        let _ = fs::remove_file(head_path(path));
        Ok(AuditLog {
            path: path.to_owned(),
            state: Mutex::new(state),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as one line, chained to the line before it, and gives back `ticket`;
    /// then a checkpoint signed by `signer` if `policy.every` records are now unsealed, if no
    /// other request is pending (the gateway is going idle), or if the oldest unsealed record is
    /// `policy.within` old.
    pub(crate) fn append(
        &self,
        record: &AuditRecord<'_>,
        signer: &Signer,
        policy: SealPolicy,
        ticket: Ticket,
    ) -> std::io::Result<()> {
        // Serialized outside the lock; only the chain fields are added under it.
        let body = serde_json::to_vec(record)?;
        let mut state = self.lock();
        // Given back under the lock: whichever request writes the last pending record sees
        // zero and seals, and one admitted after that check writes (and seals) after it.
        let last = ticket.finish();
        state.follow(&self.path, signer)?;
        state.write_chained(&body)?;
        state.unsealed += 1;
        state.unsealed_since.get_or_insert_with(Instant::now);
        let why = if state.retired {
            Some(Seal::Reconfigured)
        } else if state.unsealed >= policy.every.max(1) {
            Some(Seal::Interval)
        } else {
            policy.within.and_then(|within| {
                if last {
                    Some(Seal::Idle)
                } else {
                    state.due(within).then_some(Seal::Elapsed)
                }
            })
        };
        if let Some(why) = why {
            state.seal(signer, why)?;
        }
        Ok(())
    }

    /// Seals unsealed records if `idle` (no request pending) or the oldest is `within` old.
    pub(crate) fn seal_if_due(
        &self,
        signer: &Signer,
        idle: bool,
        within: Duration,
    ) -> std::io::Result<()> {
        let mut state = self.lock();
        if state.unsealed == 0 {
            return Ok(());
        }
        if idle {
            state.seal(signer, Seal::Idle)
        } else if state.due(within) {
            state.seal(signer, Seal::Elapsed)
        } else {
            Ok(())
        }
    }

    /// Closes this file with a checkpoint when a reload points `audit_log` elsewhere; a request
    /// that still writes here afterwards is sealed at once.
    pub(crate) fn retire(&self, signer: &Signer) -> std::io::Result<()> {
        let mut state = self.lock();
        state.retired = true;
        if state.unsealed > 0 {
            state.seal(signer, Seal::Reconfigured)?;
        }
        Ok(())
    }

    /// Moves to a new file at the configured path if the open one was renamed or deleted (on
    /// SIGHUP; every append checks too).
    pub(crate) fn reopen(&self, signer: &Signer) -> std::io::Result<()> {
        self.lock().follow(&self.path, signer)
    }

    /// Seals the log, flushes file data to disk and saves the chain head beside it (at
    /// shutdown), so a file rotated away before the next start is still continued.
    pub fn close(&self, signer: &Signer) -> std::io::Result<()> {
        let mut state = self.lock();
        state.follow(&self.path, signer)?;
        if state.unsealed > 0 {
            state.seal(signer, Seal::Shutdown)?;
        }
        state.file.sync_data()?;
        let saved = serde_json::to_vec(&SavedHead {
            seq: state.seq,
            head: hex(&state.head),
        })?;
        if let Err(e) = fs::write(head_path(&self.path), saved) {
            tracing::warn!(error = %e, "cannot save the audit chain head");
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

// === impl State ===

impl State {
    /// Opens `path` for append. The chain continues from `from` (a rotation, or the head saved
    /// at the last shutdown) when the file is empty, else from the file's last line.
    fn open(path: &Path, from: Option<([u8; 32], u64)>) -> std::io::Result<State> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let meta = file.metadata()?;
        let mut state = State {
            id: file_id(&meta),
            file,
            head: GENESIS,
            seq: 0,
            unsealed: 0,
            dirty: false,
            unsealed_since: None,
            retired: false,
        };
        if let Some((head, seq)) = from {
            state.head = head;
            state.seq = seq;
        }
        state.read_tail()?;
        Ok(state)
    }

    /// Takes the head, `seq` and sealed state from the file's last line, if it has one. A last
    /// line cut short (a write that failed part-way) is ended with a newline and chained to as
    /// it is: `audit verify` then reports it.
    fn read_tail(&mut self) -> std::io::Result<()> {
        let meta = self.file.metadata()?;
        if !meta.is_file() || meta.len() == 0 {
            return Ok(());
        }
        let (line, complete) = last_line(&mut self.file, meta.len())?;
        if !complete {
            tracing::error!("audit log ends in an incomplete line; it is kept and chained to");
            self.file.write_all(b"\n")?;
        }
        self.head = line_hash(&line);
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&line).ok();
        let seq = parsed.as_ref().and_then(|v| v.get("seq")?.as_u64());
        let sealed = parsed
            .as_ref()
            .is_some_and(|v| v.get("checkpoint").is_some());
        self.seq = seq.unwrap_or(self.seq);
        // An unreadable last line counts as one record so the next checkpoint covers it.
        self.seq += u64::from(seq.is_none());
        self.unsealed = u64::from(!sealed);
        self.unsealed_since = (!sealed).then(Instant::now);
        Ok(())
    }

    /// Follows a rotation: if `path` no longer names the open file, seals the old file and
    /// opens a new one at `path` that continues the chain.
    fn follow(&mut self, path: &Path, signer: &Signer) -> std::io::Result<()> {
        if self.dirty {
            self.read_tail()?;
            self.dirty = false;
        }
        let moved = match fs::metadata(path) {
            Ok(m) => file_id(&m) != self.id,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(e),
        };
        if !moved {
            return Ok(());
        }
        if self.unsealed > 0 {
            // The old file may be gone (deleted); the chain still holds in memory.
            if let Err(e) = self.seal(signer, Seal::Rotation) {
                tracing::warn!(error = %e, "cannot write the closing checkpoint to the rotated audit log");
            }
        }
        let mut next = State::open(path, Some((self.head, self.seq)))?;
        next.retired = self.retired;
        tracing::info!(path = %path.display(), "audit log rotated: writing to a new file");
        *self = next;
        Ok(())
    }

    /// Writes `body` (one JSON object) with `seq` and `prev` added, as one line.
    fn write_chained(&mut self, body: &[u8]) -> std::io::Result<()> {
        let Some(open) = body.strip_suffix(b"}") else {
            return Err(std::io::Error::other("audit record is not a JSON object"));
        };
        let seq = self.seq + 1;
        let mut line = Vec::with_capacity(body.len() + 100);
        line.extend_from_slice(open);
        if open.len() > 1 {
            line.push(b',');
        }
        line.extend_from_slice(
            format!("\"seq\":{seq},\"prev\":\"{}\"}}", hex(&self.head)).as_bytes(),
        );
        let hash = line_hash(&line);
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            self.dirty = true;
            return Err(e);
        }
        self.head = hash;
        self.seq = seq;
        Ok(())
    }

    /// Writes a checkpoint: the current head signed with `signer`.
    fn seal(&mut self, signer: &Signer, why: Seal) -> std::io::Result<()> {
        let reason = why.as_str();
        let ts = now_rfc3339();
        let spki = signer.public_spki_der();
        let prev = hex(&self.head);
        let signature = signer.sign(&checkpoint_message(&prev, self.seq + 1, &ts, reason));
        let b64 = base64::engine::general_purpose::STANDARD;
        let record = CheckpointRecord {
            ts: &ts,
            checkpoint: Checkpoint {
                reason,
                key_id: &key_id(&spki),
                public_key: &b64.encode(&spki),
                signature: &b64.encode(&signature),
            },
        };
        self.write_chained(&serde_json::to_vec(&record)?)?;
        self.unsealed = 0;
        self.unsealed_since = None;
        Ok(())
    }

    /// The oldest unsealed record is `within` old.
    fn due(&self, within: Duration) -> bool {
        self.unsealed_since.is_some_and(|t| t.elapsed() >= within)
    }
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

    /// Resolves when the last pending request ended without writing a record.
    pub(crate) async fn went_idle(&self) {
        self.idle.notified().await;
    }
}

// === impl Ticket ===

impl Ticket {
    /// Gives the place back; true if no other request is pending.
    fn finish(mut self) -> bool {
        self.open = false;
        self.pending.count.fetch_sub(1, Ordering::AcqRel) == 1
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.open && self.pending.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.pending.idle.notify_one();
        }
    }
}

// === impl Seal ===

impl Seal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Seal::Interval => "interval",
            Seal::Shutdown => "shutdown",
            Seal::Rotation => "rotation",
            Seal::Idle => "idle",
            Seal::Elapsed => "elapsed",
            Seal::Reconfigured => "reconfigured",
        }
    }
}

/// The last line of a file of `len` (> 0) bytes, without its newline, and whether it had one.
fn last_line(file: &mut File, len: u64) -> std::io::Result<(Vec<u8>, bool)> {
    const CHUNK: u64 = 64 * 1024;
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    let complete = last[0] == b'\n';
    let end = if complete { len - 1 } else { len };
    // Scan back from `end` for the newline before the last line.
    let mut start = end;
    let mut buf = vec![0u8; CHUNK as usize];
    'scan: while start > 0 {
        let from = start.saturating_sub(CHUNK);
        let n = (start - from) as usize;
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut buf[..n])?;
        for i in (0..n).rev() {
            if buf[i] == b'\n' {
                start = from + i as u64 + 1;
                break 'scan;
            }
        }
        start = from;
    }
    let mut line = vec![0u8; (end - start) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut line)?;
    Ok((line, complete))
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

    #[test]
    fn last_line_finds_lines_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let long = vec![b'x'; 200_000];
        for (content, want, complete) in [
            (b"a\nbc\n".to_vec(), b"bc".to_vec(), true),
            (b"a\nbc".to_vec(), b"bc".to_vec(), false),
            (b"only\n".to_vec(), b"only".to_vec(), true),
            (
                [b"a\n".as_slice(), &long, b"\n"].concat(),
                long.clone(),
                true,
            ),
            (long.clone(), long.clone(), false),
        ] {
            fs::write(&p, &content).unwrap();
            let mut f = File::open(&p).unwrap();
            let (line, c) = last_line(&mut f, content.len() as u64).unwrap();
            assert_eq!((line == want, c), (true, complete));
        }
    }
}
