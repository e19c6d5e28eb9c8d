//! What `audit verify` found: an intact chain and what it proves ([`Summary`]), or the first
//! finding that fails it ([`Failure`]).

use std::fmt;
use std::path::{Path, PathBuf};

/// An intact chain, and how far the proof goes.
#[derive(Debug, Default)]
pub struct Summary {
    pub files: usize,
    /// Every record that is not a checkpoint.
    pub records: u64,
    /// Of which decision records (a `request_id` and a `status`: one answer each).
    pub decisions: u64,
    pub checkpoints: u64,
    pub(crate) first_ts: Option<String>,
    pub(crate) last_ts: Option<String>,
    /// Key ids of the keys that signed the checkpoints, in order of first use.
    pub keys: Vec<String>,
    /// Every checkpoint was signed by a key given with `--key`/`-c`, or by a predecessor of one.
    pub pinned: bool,
    /// Keys not pinned whose checkpoints a `key_rotated` record vouches for, each with the seq
    /// of that record (its checkpoints are all before it).
    pub predecessors: Vec<(String, u64)>,
    /// `key_rotated` records in the files (each checked).
    pub rotations: u64,
    /// Records after the last checkpoint (only with `live`).
    pub unsealed: u64,
    /// Files that begin with a `discontinuity` checkpoint (each was warned about).
    pub discontinuities: u64,
    /// What the witness logs proved, when some were given.
    pub witnessed: Option<Witnessed>,
    pub bytes: u64,
    pub seconds: f64,
}

/// The checkpoints the gateway's own log witnessed, all found in the files.
#[derive(Debug, Default, Clone, Copy)]
pub struct Witnessed {
    /// Witnessed checkpoints found in the files at their seq with their hash.
    pub matched: u64,
    /// The highest witnessed seq (the files reach it).
    pub highest: u64,
    /// Witnesses older than the first seq in the files (their files were not given).
    pub skipped: u64,
}

/// Why verification failed: exit 1 for every finding, exit 2 when a file could not be read.
#[derive(Debug)]
pub enum Failure {
    /// The chain is broken at this line: edited, inserted, deleted, reordered, a bad checkpoint,
    /// or a line that differs from its witness.
    Broken {
        file: PathBuf,
        line: u64,
        why: String,
    },
    /// A checkpoint validly signed by a key that was not pinned (an old gateway key, or not the
    /// gateway's at all): not tampering as such, but nothing the pinned keys vouch for.
    NotPinned {
        file: PathBuf,
        line: u64,
        key_id: String,
    },
    /// Keys were pinned and no checkpoint in the files was signed by one: nothing is proven.
    NothingSigned { records: u64 },
    /// The first line of this file is no audit record at all.
    NotAuditLog { file: PathBuf },
    /// A checkpoint witnessed in the gateway's log is not in the files.
    Missing {
        seq: u64,
        log: PathBuf,
        log_line: u64,
        /// The last seq the files hold before it (none: the files hold no record).
        after: Option<u64>,
    },
    /// A line of a witness log names an `audit_checkpoint` without a usable seq and hash.
    BadWitness {
        log: PathBuf,
        line: u64,
        why: String,
    },
    /// `--witness` was given, but no line of the logs is a witness.
    NoWitness { logs: Vec<PathBuf> },
    Unreadable {
        file: PathBuf,
        error: std::io::Error,
    },
}

// === impl Failure ===

impl Failure {
    pub(super) fn unreadable(file: &Path, error: std::io::Error) -> Failure {
        Failure::Unreadable {
            file: file.to_owned(),
            error,
        }
    }

    pub(super) fn broken(file: &Path, line: u64, why: String) -> Failure {
        Failure::Broken {
            file: file.to_owned(),
            line,
            why,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Unreadable { .. } => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Broken { file, line, why } => {
                write!(f, "BROKEN {}:{line}: {why}", file.display())
            }
            Failure::NotPinned { file, line, key_id } => write!(
                f,
                "NOT PINNED {}:{line}: checkpoint signed by key sha256:{key_id} which you did not pin (give it with --key if it is an old gateway key)",
                file.display()
            ),
            Failure::NothingSigned { records } => write!(
                f,
                "NOT PROVEN: nothing signed by this key: no checkpoint in the files was signed by a pinned key ({records} records, none sealed)"
            ),
            Failure::NotAuditLog { file } => write!(
                f,
                "{}:1: not an audit log (expected a JSON object with seq and prev; is this the right file?)",
                file.display()
            ),
            Failure::Missing {
                seq,
                log,
                log_line,
                after,
            } => {
                write!(
                    f,
                    "MISSING seq {seq} witnessed in {}:{log_line} is not in the files: ",
                    log.display()
                )?;
                match after {
                    Some(m) => write!(f, "cut after seq {m}"),
                    None => write!(f, "they hold no record"),
                }
            }
            Failure::BadWitness { log, line, why } => {
                write!(f, "BAD WITNESS {}:{line}: {why}", log.display())
            }
            Failure::NoWitness { logs } => {
                let logs: Vec<_> = logs.iter().map(|l| l.display().to_string()).collect();
                write!(
                    f,
                    "NO WITNESS: no line of {} is an audit_checkpoint witness (is it the gateway's own log, stderr?)",
                    logs.join(", ")
                )
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
        let short = |k: &str| format!("sha256:{}", &k[..16.min(k.len())]);
        let own: Vec<String> = self
            .keys
            .iter()
            .filter(|k| !self.predecessors.iter().any(|(p, _)| p == *k))
            .map(|k| short(k))
            .collect();
        let keys = if own.is_empty() {
            "none".to_owned()
        } else {
            own.join(",")
        };
        write!(
            f,
            "intact: {} records in {} file(s) ({} decisions, {} other), {} to {}, {} checkpoint{} verified ({})",
            self.records,
            self.files,
            self.decisions,
            self.records - self.decisions,
            self.first_ts.as_deref().unwrap_or("-"),
            self.last_ts.as_deref().unwrap_or("-"),
            self.checkpoints,
            if self.checkpoints == 1 { "" } else { "s" },
            if self.pinned {
                let mut by = format!("signed by pinned key {keys}");
                for (key, seq) in &self.predecessors {
                    by.push_str(&format!(
                        ", and before seq {seq} by its predecessor {} (as the key_rotated record there, signed by both keys, says)",
                        short(key)
                    ));
                }
                by
            } else {
                format!("signed by the key each carries, {keys}, not pinned: pin it with --key or -c")
            },
        )?;
        if self.rotations > 0 && self.predecessors.is_empty() {
            write!(
                f,
                "; {} key rotation{} (key_rotated record{} checked)",
                self.rotations,
                if self.rotations == 1 { "" } else { "s" },
                if self.rotations == 1 { "" } else { "s" }
            )?;
        }
        if self.unsealed > 0 {
            write!(
                f,
                "; {} records after the last checkpoint (live, not yet signed)",
                self.unsealed
            )?;
        }
        if self.discontinuities > 0 {
            write!(
                f,
                "; {} discontinuit{} (see the WARNING above)",
                self.discontinuities,
                if self.discontinuities == 1 {
                    "y"
                } else {
                    "ies"
                }
            )?;
        }
        match &self.witnessed {
            Some(w) if w.matched == 0 => write!(
                f,
                "; not witnessed: the {} witnessed checkpoints are all older than these files (their files were not given), so a cut at an earlier checkpoint cannot be detected",
                w.skipped
            )?,
            Some(w) => {
                write!(
                    f,
                    "; witnessed up to seq {} ({} witnessed checkpoint{} found",
                    w.highest,
                    w.matched,
                    if w.matched == 1 { "" } else { "s" }
                )?;
                if w.skipped > 0 {
                    write!(
                        f,
                        ", {} older skipped: their files were not given",
                        w.skipped
                    )?;
                }
                write!(f, ")")?;
            }
            None => write!(
                f,
                "; not witnessed: a cut at an earlier checkpoint cannot be detected without --witness"
            )?,
        }
        let mb = self.bytes as f64 / 1e6;
        write!(f, "; {mb:.1} MB in {:.2} s", self.seconds)
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

    #[test]
    fn without_a_witness_the_summary_says_what_is_not_proven() {
        let plain = Summary::default().to_string();
        assert!(plain.contains("not witnessed: a cut at an earlier checkpoint cannot be detected without --witness"), "{plain}");
        let witnessed = Summary {
            witnessed: Some(Witnessed {
                matched: 3,
                highest: 12,
                skipped: 2,
            }),
            ..Summary::default()
        }
        .to_string();
        assert!(
            witnessed
                .contains("witnessed up to seq 12 (3 witnessed checkpoints found, 2 older skipped"),
            "{witnessed}"
        );
        assert!(!witnessed.contains("not witnessed"), "{witnessed}");
        let older = Summary {
            witnessed: Some(Witnessed {
                matched: 0,
                highest: 12,
                skipped: 4,
            }),
            ..Summary::default()
        }
        .to_string();
        assert!(
            older.contains(
                "not witnessed: the 4 witnessed checkpoints are all older than these files"
            ),
            "{older}"
        );
    }
}
