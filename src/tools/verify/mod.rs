//! `audit verify`: checks in one streaming pass that audit files, oldest first, form one unbroken
//! hash chain closed by a valid signed checkpoint, and with `--witness` that the files hold every
//! checkpoint the gateway's own log witnessed.
//!
//! What an intact result proves: every line is the one the gateway wrote, in its order, none
//! added, removed or changed, up to the last checkpoint; and that checkpoint (and each before it)
//! was signed by the key it names, or with `--key`/`-c`, by one of the gateway keys given or by
//! a key that a `key_rotated` record signed by a trusted key names as its predecessor (trusted
//! only for the checkpoints before that record; several rotations chain). What
//! it cannot prove without a witness: that the files were not cut at an earlier checkpoint (what
//! is left is a valid chain). What it cannot prove at all: anything against whoever holds the
//! gateway private key (they can rewrite and re-sign the whole chain); records after the last
//! checkpoint of a log still being written (`--live`) may have been cut off; older files not
//! given (`--mid-chain`) may be missing.

mod diagnose;
mod record;
mod report;
mod witness;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::ops::audit::{hex, line_hash, parse_hex, GENESIS};
use crate::protocol::keys::Verifier;
use record::{check_checkpoint, check_rotation, CheckpointError, Line, Rotation};
pub use report::{Failure, Summary, Witnessed};
use witness::Witnesses;

/// How to verify.
#[derive(Debug, Default)]
pub struct Options {
    /// Gateway public keys (old and new across a rotation): every checkpoint must be signed by
    /// one of them. Empty: by the key it carries (its id is reported).
    pub pinned: Vec<Verifier>,
    /// The last file may still be written to: records after its last checkpoint are accepted
    /// (and counted) instead of being a cut-short file.
    pub live: bool,
    /// The first file need not start the chain: its first `prev` is taken as given (older files
    /// were removed by retention).
    pub mid_chain: bool,
    /// The gateway's own logs: each checkpoint they witness must be in the files.
    pub witness: Vec<PathBuf>,
}

/// The chain as verified so far.
struct Chain {
    head: [u8; 32],
    seq: u64,
    /// No line seen yet.
    fresh: bool,
    summary: Summary,
    /// The last line seen was a checkpoint.
    sealed: bool,
    /// The file verified before the current one.
    last_file: Option<PathBuf>,
    /// Key id of the last line, if it was a checkpoint.
    last_key: Option<String>,
    /// Checkpoints validly signed by a key that is not pinned, in order: trusted in the end
    /// only if a `key_rotated` record vouches for them.
    unpinned: Vec<Unpinned>,
    /// The `key_rotated` records, in order.
    rotations: Vec<Rotation>,
}

/// A checkpoint signed by a key not pinned, and where it is (small: one per such checkpoint).
struct Unpinned {
    /// Index in `summary.keys`.
    key: usize,
    seq: u64,
    /// Index in the files given.
    file: usize,
    line: u64,
}

// === impl Chain ===

impl Chain {
    /// Takes in a line that chains correctly: a checkpoint is checked and counted, a
    /// `key_rotated` record checked, a record counted. `Err`: why the line is bad.
    fn accept(
        &mut self,
        parsed: &Line<'_>,
        (seq, prev): (u64, &str),
        hash: [u8; 32],
        (lineno, unsealed_here): (u64, &mut u64),
        opts: &Options,
    ) -> Result<(), String> {
        let ts = parsed.ts.as_deref().unwrap_or("");
        if let Some(cp) = &parsed.checkpoint {
            let pinned = match check_checkpoint(cp, prev, seq, ts, &opts.pinned) {
                Ok(()) => true,
                Err(CheckpointError::Bad(why)) => return Err(format!("bad checkpoint: {why}")),
                Err(CheckpointError::NotPinned) => false,
            };
            self.summary.checkpoints += 1;
            let key = match self
                .summary
                .keys
                .iter()
                .position(|k| k == cp.key_id.as_ref())
            {
                Some(i) => i,
                None => {
                    self.summary.keys.push(cp.key_id.clone().into_owned());
                    self.summary.keys.len() - 1
                }
            };
            if !pinned {
                self.unpinned.push(Unpinned {
                    key,
                    seq,
                    file: self.summary.files,
                    line: lineno,
                });
            }
            self.sealed = true;
            self.last_key = Some(cp.key_id.clone().into_owned());
            *unsealed_here = 0;
        } else {
            if let Some(kr) = &parsed.key_rotated {
                // The gateway seals everything before a rotation with the old key, in the
                // same write: the old key's part of the chain ends right here.
                if !self.fresh && self.last_key.as_deref() != Some(kr.old_key_id.as_ref()) {
                    return Err(
                        "bad key_rotated: it does not follow a checkpoint by its old key".into(),
                    );
                }
                let rotation = check_rotation(kr, prev, seq, ts, &opts.pinned)
                    .map_err(|why| format!("bad key_rotated: {why}"))?;
                self.rotations.push(rotation);
            }
            self.last_key = None;
            self.summary.records += 1;
            self.summary.decisions += u64::from(parsed.is_decision());
            self.sealed = false;
            *unsealed_here += 1;
            if let Some(ts) = &parsed.ts {
                if self.summary.first_ts.is_none() {
                    self.summary.first_ts = Some(ts.clone().into_owned());
                }
                self.summary.last_ts = Some(ts.clone().into_owned());
            }
        }
        self.head = hash;
        self.seq = seq;
        self.fresh = false;
        Ok(())
    }
}

/// Verifies `files`, oldest first, as one chain; `warn` is told of each discontinuity (a file
/// the gateway set aside), which does not break the chain.
pub fn verify(
    files: &[PathBuf],
    opts: &Options,
    mut warn: impl FnMut(&str),
) -> Result<Summary, Failure> {
    let started = Instant::now();
    let mut witnesses = if opts.witness.is_empty() {
        None
    } else {
        Some(Witnesses::read(&opts.witness)?)
    };
    let mut chain = Chain {
        head: GENESIS,
        seq: 0,
        fresh: true,
        summary: Summary {
            pinned: !opts.pinned.is_empty(),
            ..Summary::default()
        },
        sealed: true,
        last_file: None,
        last_key: None,
        unpinned: Vec::new(),
        rotations: Vec::new(),
    };
    for (i, path) in files.iter().enumerate() {
        let next = files.get(i + 1).map(PathBuf::as_path);
        verify_file(path, &mut chain, opts, next, &mut witnesses, &mut warn)?;
        chain.summary.files += 1;
        chain.last_file = Some(path.clone());
    }
    trust(&mut chain, files)?;
    if let Some(w) = witnesses {
        chain.summary.witnessed = Some(w.finish((!chain.fresh).then_some(chain.seq))?);
    }
    if chain.summary.pinned && chain.summary.checkpoints == 0 {
        return Err(Failure::NothingSigned {
            records: chain.summary.records,
        });
    }
    chain.summary.seconds = started.elapsed().as_secs_f64();
    Ok(chain.summary)
}

fn verify_file(
    path: &Path,
    chain: &mut Chain,
    opts: &Options,
    next: Option<&Path>,
    witnesses: &mut Option<Witnesses>,
    warn: &mut impl FnMut(&str),
) -> Result<(), Failure> {
    let unreadable = |error| Failure::unreadable(path, error);
    let broken = |line, why| Failure::broken(path, line, why);
    let file = File::open(path).map_err(unreadable)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(4096);
    let mut lineno = 0u64;
    let mut unsealed_here = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(unreadable)? == 0 {
            break;
        }
        lineno += 1;
        chain.summary.bytes += buf.len() as u64;
        let Some(line) = buf.strip_suffix(b"\n") else {
            if lineno == 1 && !buf.starts_with(b"{") {
                return Err(Failure::NotAuditLog {
                    file: path.to_owned(),
                });
            }
            return Err(broken(
                lineno,
                "deleted: incomplete last line (the file was cut inside a record)".into(),
            ));
        };
        let hash = line_hash(line);
        let parsed = serde_json::from_slice::<Line<'_>>(line);
        let found = match &parsed {
            Ok(p) => p.seq.zip(p.prev.as_deref()).map(|record| (p, record)),
            Err(_) => None,
        };
        let Some((parsed, (seq, prev))) = found else {
            // A first line that is no record, followed by none either: the wrong file.
            if lineno == 1 && !next_is_record(&mut reader).map_err(unreadable)? {
                return Err(Failure::NotAuditLog {
                    file: path.to_owned(),
                });
            }
            return Err(broken(
                lineno,
                match parsed {
                    Err(e) => format!("edited: not a JSON audit record ({e})"),
                    Ok(_) => "edited: record has no `seq`/`prev`".into(),
                },
            ));
        };
        // Only the checkpoint that opens a file after a discontinuity may skip seqs forward.
        let discontinuity = parsed.discontinuity().filter(|_| lineno == 1);
        let before = (!chain.fresh).then_some(chain.seq);
        let new_chain = chain.fresh && prev == hex(&GENESIS);
        if chain.fresh && opts.mid_chain {
            chain.head = parse_hex(prev)
                .ok_or_else(|| broken(lineno, "edited: `prev` is not a SHA-256".into()))?;
            chain.seq = seq.saturating_sub(1);
        } else if prev != hex(&chain.head) {
            let mismatch = diagnose::Mismatch {
                lineno,
                seq,
                prev,
                hash,
                parsed,
            };
            return Err(diagnose::diagnose(
                &mut reader,
                path,
                chain,
                &mismatch,
                opts,
            )?);
        } else if seq != chain.seq + 1 && !(discontinuity.is_some() && seq > chain.seq) {
            return Err(broken(
                lineno,
                format!("edited: seq {seq} where {} was due", chain.seq + 1),
            ));
        }
        chain
            .accept(
                parsed,
                (seq, prev),
                hash,
                (lineno, &mut unsealed_here),
                opts,
            )
            .map_err(|why| broken(lineno, why))?;
        if let Some(cp) = parsed.discontinuity() {
            chain.summary.discontinuities += 1;
            let found = cp.found.as_ref();
            let n = |v: Option<u64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
            warn(&format!(
                "WARNING {}:{lineno}: discontinuity: the gateway found a file at its audit path that it could not prove its own and set it aside as {} (last seq {}, {} unsealed lines); {}: verify that file on its own",
                path.display(),
                found.map_or("?", |f| f.file.as_str()),
                n(found.and_then(|f| f.last_seq)),
                n(found.and_then(|f| f.unsealed_lines)),
                if new_chain {
                    "a new chain starts here (the gateway knew no head to continue)"
                } else {
                    "the chain continues here from the head the gateway knew"
                },
            ));
        }
        if let Some(w) = witnesses {
            w.check(seq, &hash, (path, lineno), before)?;
        }
    }
    if lineno > 0 && !chain.sealed {
        if next.is_none() && opts.live {
            chain.summary.unsealed = unsealed_here;
        } else if next.is_some_and(|n| set_aside_by(n, path)) {
            return Err(broken(
                lineno + 1,
                format!("set aside: the next file opens with a discontinuity checkpoint naming this one, which ends {unsealed_here} record(s) after its last checkpoint (a gateway killed while writing it, or lines someone added): verify it on its own with --live, and the next file with --mid-chain"),
            ));
        } else {
            return Err(broken(
                lineno + 1,
                format!("deleted: the file was cut short: it ends {unsealed_here} record(s) after its last checkpoint (or the gateway has not closed it: still running, or killed; --live accepts an open last file)"),
            ));
        }
    }
    Ok(())
}

/// Settles the checkpoints signed by keys not pinned: each must be vouched for by a
/// `key_rotated` record, signed by a trusted key, naming its key as the predecessor, and come
/// before that record. Keys vouched for are trusted in turn (several rotations), never past
/// their own rotation. The first checkpoint left over is reported as not pinned.
fn trust(chain: &mut Chain, files: &[PathBuf]) -> Result<(), Failure> {
    // Key id -> the seq below which its checkpoints are trusted. Latest rotations first: a key
    // is trusted at a rotation only if a later one (or a pin) vouches for it there.
    let mut until: HashMap<&str, u64> = HashMap::new();
    let mut rotations: Vec<&Rotation> = chain.rotations.iter().collect();
    rotations.sort_by_key(|r| std::cmp::Reverse(r.seq));
    for r in rotations {
        let new_trusted =
            r.new_pinned || until.get(r.new_key_id.as_str()).is_some_and(|&u| r.seq < u);
        if new_trusted {
            let t = until.entry(r.old_key_id.as_str()).or_default();
            *t = (*t).max(r.seq);
        }
    }
    let keys = &chain.summary.keys;
    if let Some(u) = chain
        .unpinned
        .iter()
        .find(|u| until.get(keys[u.key].as_str()).is_none_or(|&t| u.seq >= t))
    {
        return Err(Failure::NotPinned {
            file: files[u.file].clone(),
            line: u.line,
            key_id: keys[u.key].clone(),
        });
    }
    let mut vouched: Vec<(String, u64)> = until
        .iter()
        .filter(|(k, _)| chain.unpinned.iter().any(|u| keys[u.key] == **k))
        .map(|(k, t)| ((*k).to_owned(), *t))
        .collect();
    vouched.sort_by_key(|(_, t)| *t);
    chain.summary.predecessors = vouched;
    chain.summary.rotations = chain.rotations.len() as u64;
    Ok(())
}

/// Reads the next line: is it an audit record (a JSON object with `seq` and `prev`)?
fn next_is_record(reader: &mut impl BufRead) -> std::io::Result<bool> {
    let mut next = Vec::new();
    reader.read_until(b'\n', &mut next)?;
    let line = next.strip_suffix(b"\n").unwrap_or(&next);
    Ok(serde_json::from_slice::<Line<'_>>(line).is_ok_and(|l| l.seq.is_some() && l.prev.is_some()))
}

/// Does `next` open with a discontinuity checkpoint naming `file` as the one it set aside?
fn set_aside_by(next: &Path, file: &Path) -> bool {
    let Ok(f) = File::open(next) else {
        return false;
    };
    let mut first = Vec::new();
    if BufReader::new(f).read_until(b'\n', &mut first).is_err() {
        return false;
    }
    let line = first.strip_suffix(b"\n").unwrap_or(&first);
    serde_json::from_slice::<Line<'_>>(line).is_ok_and(|l| {
        l.discontinuity()
            .and_then(|cp| cp.found.as_ref())
            .is_some_and(|found| Path::new(&found.file).file_name() == file.file_name())
    })
}
