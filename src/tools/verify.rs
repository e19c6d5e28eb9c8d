//! `audit verify`: checks in one streaming pass that audit files, oldest first, form one unbroken
//! hash chain closed by a valid signed checkpoint.
//!
//! What an intact result proves: every line is the one the gateway wrote, in its order, none
//! added, removed or changed, up to the last checkpoint; and that checkpoint (and each before it)
//! was signed by the key it names, or with `--key`/`-c`, by the gateway key given. What it cannot
//! prove: anything against whoever holds the gateway private key (they can rewrite and re-sign
//! the whole chain); records after the last checkpoint of a log still being written (`--live`)
//! may have been cut off; older files not given (`--mid-chain`) may be missing.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use serde::Deserialize;

use crate::ops::audit::{checkpoint_message, hex, key_id, line_hash, parse_hex, GENESIS};
use crate::protocol::keys::Verifier;

/// How to verify.
#[derive(Debug, Default)]
pub struct Options {
    /// Only checkpoints signed by one of these keys count; otherwise the key a checkpoint
    /// carries is used (and its id reported).
    pub pinned: Option<Verifier>,
    /// The last file may still be written to: records after its last checkpoint are accepted
    /// (and counted) instead of being a cut-short file.
    pub live: bool,
    /// The first file need not start the chain: its first `prev` is taken as given (older files
    /// were removed by retention).
    pub mid_chain: bool,
}

/// An intact chain.
#[derive(Debug, Default)]
pub struct Summary {
    pub files: usize,
    /// Request records (checkpoints not included).
    pub records: u64,
    pub checkpoints: u64,
    pub(crate) first_ts: Option<String>,
    pub(crate) last_ts: Option<String>,
    /// Key ids of the keys that signed the checkpoints, in order of first use.
    pub keys: Vec<String>,
    pub pinned: bool,
    /// Records after the last checkpoint (only with `live`).
    pub unsealed: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Why verification failed: the chain is broken (exit 1) or a file could not be read (exit 2).
#[derive(Debug)]
pub enum Failure {
    Broken {
        file: PathBuf,
        line: u64,
        why: String,
    },
    Unreadable {
        file: PathBuf,
        error: std::io::Error,
    },
}

/// The fields verification reads; the rest of a record is covered by its hash.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow, default)]
    ts: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    prev: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    checkpoint: Option<CheckpointFields<'a>>,
}

#[derive(Deserialize)]
struct CheckpointFields<'a> {
    #[serde(borrow)]
    reason: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    key_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    public_key: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    signature: std::borrow::Cow<'a, str>,
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
}

// === impl Chain ===

impl Chain {
    /// Takes in a line that chains correctly: a checkpoint is checked and counted, a record
    /// counted. The error says why a checkpoint is bad.
    fn accept(
        &mut self,
        parsed: &Line<'_>,
        seq: u64,
        prev: &str,
        hash: [u8; 32],
        unsealed_here: &mut u64,
        opts: &Options,
    ) -> Result<(), String> {
        if let Some(cp) = &parsed.checkpoint {
            check_checkpoint(cp, prev, seq, parsed.ts.as_deref().unwrap_or(""), opts)?;
            self.summary.checkpoints += 1;
            if !self.summary.keys.iter().any(|k| k == cp.key_id.as_ref()) {
                self.summary.keys.push(cp.key_id.clone().into_owned());
            }
            self.sealed = true;
            *unsealed_here = 0;
        } else {
            self.summary.records += 1;
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

// === impl Failure ===

impl Failure {
    fn unreadable(file: &Path, error: std::io::Error) -> Failure {
        Failure::Unreadable {
            file: file.to_owned(),
            error,
        }
    }

    fn broken(file: &Path, line: u64, why: String) -> Failure {
        Failure::Broken {
            file: file.to_owned(),
            line,
            why,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Broken { .. } => 1,
            Failure::Unreadable { .. } => 2,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Broken { file, line, why } => {
                write!(f, "BROKEN {}:{line}: {why}", file.display())
            }
            Failure::Unreadable { file, error } => {
                write!(f, "cannot read {}: {error}", file.display())
            }
        }
    }
}

// === impl Summary ===

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = if self.keys.is_empty() {
            "none".to_owned()
        } else {
            self.keys
                .iter()
                .map(|k| format!("sha256:{}", &k[..16.min(k.len())]))
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "intact: {} records in {} file(s), {} to {}, {} checkpoint{} verified (key {}{})",
            self.records,
            self.files,
            self.first_ts.as_deref().unwrap_or("-"),
            self.last_ts.as_deref().unwrap_or("-"),
            self.checkpoints,
            if self.checkpoints == 1 { "" } else { "s" },
            keys,
            if self.pinned {
                ", pinned"
            } else {
                ", as carried: pin it with --key or -c"
            },
        )?;
        if self.unsealed > 0 {
            write!(
                f,
                "; {} records after the last checkpoint (live, not yet signed)",
                self.unsealed
            )?;
        }
        let mb = self.bytes as f64 / 1e6;
        write!(f, "; {mb:.1} MB in {:.2} s", self.seconds)
    }
}

/// Verifies `files`, oldest first, as one chain.
pub fn verify(files: &[PathBuf], opts: &Options) -> Result<Summary, Failure> {
    let started = Instant::now();
    let mut chain = Chain {
        head: GENESIS,
        seq: 0,
        fresh: true,
        summary: Summary {
            pinned: opts.pinned.is_some(),
            ..Summary::default()
        },
        sealed: true,
    };
    for (i, path) in files.iter().enumerate() {
        let last = i + 1 == files.len();
        verify_file(path, &mut chain, opts, last)?;
        chain.summary.files += 1;
    }
    chain.summary.seconds = started.elapsed().as_secs_f64();
    Ok(chain.summary)
}

fn verify_file(path: &Path, chain: &mut Chain, opts: &Options, last: bool) -> Result<(), Failure> {
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
            return Err(broken(
                lineno,
                "deleted: incomplete last line (the file was cut inside a record)".into(),
            ));
        };
        let hash = line_hash(line);
        let parsed: Line<'_> = serde_json::from_slice(line)
            .map_err(|e| broken(lineno, format!("edited: not a JSON audit record ({e})")))?;
        let (Some(seq), Some(prev)) = (parsed.seq, parsed.prev.as_deref()) else {
            return Err(broken(lineno, "edited: record has no `seq`/`prev`".into()));
        };
        let expected = hex(&chain.head);
        if chain.fresh && opts.mid_chain {
            chain.head = parse_hex(prev)
                .ok_or_else(|| broken(lineno, "edited: `prev` is not a SHA-256".into()))?;
            chain.seq = seq.saturating_sub(1);
        } else if prev != expected {
            let mismatch = Mismatch {
                lineno,
                seq,
                prev,
                hash,
                parsed: &parsed,
            };
            return Err(diagnose(&mut reader, path, chain, &mismatch, opts)?);
        } else if seq != chain.seq + 1 {
            return Err(broken(
                lineno,
                format!("edited: seq {seq} where {} was due", chain.seq + 1),
            ));
        }
        chain
            .accept(&parsed, seq, prev, hash, &mut unsealed_here, opts)
            .map_err(|why| broken(lineno, format!("bad checkpoint: {why}")))?;
    }
    if lineno > 0 && !chain.sealed {
        if last && opts.live {
            chain.summary.unsealed = unsealed_here;
        } else {
            return Err(broken(
                lineno + 1,
                format!("deleted: the file was cut short: it ends {unsealed_here} record(s) after its last checkpoint (or the gateway has not closed it: still running, or killed; --live accepts an open last file)"),
            ));
        }
    }
    Ok(())
}

/// A line whose `prev` is not the chain's head, as read.
struct Mismatch<'a> {
    lineno: u64,
    seq: u64,
    prev: &'a str,
    /// The line's own hash.
    hash: [u8; 32],
    parsed: &'a Line<'a>,
}

/// Names the damage at a [`Mismatch`], reading ahead in `reader` to tell its kinds apart: `Ok`
/// is the finding, `Err` that the file could not be read further.
fn diagnose(
    reader: &mut impl BufRead,
    path: &Path,
    chain: &Chain,
    m: &Mismatch<'_>,
    opts: &Options,
) -> Result<Failure, Failure> {
    let unreadable = |error| Failure::unreadable(path, error);
    let broken = |line, why| Failure::broken(path, line, why);
    let Mismatch {
        lineno,
        seq,
        prev,
        hash,
        parsed,
    } = *m;
    let expected = hex(&chain.head);
    // Peek at the next line of this file to tell the kinds of damage apart.
    let mut next = Vec::new();
    let have_next = reader.read_until(b'\n', &mut next).map_err(unreadable)? > 0;
    let following = if have_next {
        let l = next.strip_suffix(b"\n").unwrap_or(&next);
        serde_json::from_slice::<Line<'_>>(l)
            .ok()
            .map(|p| (p.seq, p.prev.map(|x| x.into_owned())))
    } else {
        None
    };
    let (next_seq, next_prev) = following.unwrap_or((None, None));
    // And at the line after it: does the chain carry on normally from the next line?
    let next_hash = hex(&line_hash(next.strip_suffix(b"\n").unwrap_or(&next)));
    let mut after = Vec::new();
    let carries_on = have_next
        && reader.read_until(b'\n', &mut after).map_err(unreadable)? > 0
        && serde_json::from_slice::<Line<'_>>(after.strip_suffix(b"\n").unwrap_or(&after))
            .ok()
            .and_then(|p| p.prev.map(|x| x == next_hash))
            .unwrap_or(false);
    let intact_here = next_prev.as_deref() == Some(hex(&hash).as_str())
        || parsed.checkpoint.as_ref().is_some_and(|cp| {
            check_checkpoint(cp, prev, seq, parsed.ts.as_deref().unwrap_or(""), opts).is_ok()
        });
    let successor_next =
        next_prev.as_deref() == Some(expected.as_str()) && next_seq == Some(chain.seq + 1);
    let why = if lineno == 1 && seq == 1 && prev == hex(&GENESIS) {
        "a new chain starts here (the gateway started on a new, empty file): verify the files before it and from it on separately".into()
    } else if successor_next && seq > chain.seq + 1 && !carries_on {
        format!("reordered: seq {seq} comes before seq {}", chain.seq + 1)
    } else if successor_next {
        "inserted: this line is not part of the chain (the next line chains to the one before it)"
            .into()
    } else if chain.fresh {
        if seq > 1 {
            format!("deleted: the chain starts at seq {seq} with a non-zero `prev`: earlier records are missing (give the older rotated files first, or --mid-chain if retention removed them)")
        } else {
            "edited: the first record's `prev` is not 64 zeros".into()
        }
    } else if seq <= chain.seq || next_seq.is_some_and(|n| n < seq) {
        format!("reordered: seq {seq} after seq {}", chain.seq)
    } else if seq == chain.seq + 1 {
        if intact_here {
            // This line is authentic (the next one chains to it, or it is a valid
            // checkpoint): the one before it was changed.
            return Ok(broken(
                lineno - 1,
                "edited: this line's hash is not the `prev` the next record holds".into(),
            ));
        }
        "edited: `prev` does not match the line before it".into()
    } else {
        format!(
            "deleted: {} record(s) missing before this line (seq {} to {})",
            seq - chain.seq - 1,
            chain.seq + 1,
            seq - 1
        )
    };
    Ok(broken(lineno, why))
}

/// Checks a checkpoint's key and signature over the head it seals.
fn check_checkpoint(
    cp: &CheckpointFields<'_>,
    prev: &str,
    seq: u64,
    ts: &str,
    opts: &Options,
) -> Result<(), String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let spki = b64
        .decode(cp.public_key.as_bytes())
        .map_err(|_| "public_key is not base64".to_owned())?;
    if key_id(&spki) != cp.key_id {
        return Err("key_id is not the hash of public_key".into());
    }
    let sig = b64
        .decode(cp.signature.as_bytes())
        .map_err(|_| "signature is not base64".to_owned())?;
    let message = checkpoint_message(prev, seq, ts, &cp.reason);
    match &opts.pinned {
        Some(v) if v.verify(&message, &sig) => Ok(()),
        Some(_) => Err(format!(
            "not signed by the pinned gateway key (signed by key sha256:{})",
            cp.key_id
        )),
        None => {
            let v = Verifier::from_der(&spki)
                .ok_or_else(|| "public_key is not an RSA public key".to_owned())?;
            if v.verify(&message, &sig) {
                Ok(())
            } else {
                Err("signature does not verify".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_checkpoint_is_singular() {
        let summary = |checkpoints| {
            Summary {
                checkpoints,
                ..Summary::default()
            }
            .to_string()
        };
        assert!(
            summary(1).contains(", 1 checkpoint verified ("),
            "{}",
            summary(1)
        );
        for n in [0, 2, 8] {
            assert!(summary(n).contains(&format!(", {n} checkpoints verified (")));
        }
    }
}
