//! Witnesses: the checkpoints the gateway also wrote to its own log (stderr), outside the audit
//! folder. Whoever cuts an audit file at an earlier checkpoint leaves a chain that verifies; the
//! witness log still names the later checkpoints, so the cut shows.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::report::{Failure, Witnessed};
use crate::ops::audit::parse_hex;

/// What marks a witness line; lines without it are not parsed at all (logs can be big).
const MARK: &[u8] = b"\"audit_checkpoint\"";

/// A log line as far as witnessing goes.
#[derive(Deserialize)]
struct LogLine {
    #[serde(default)]
    audit_checkpoint: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WitnessFields {
    seq: u64,
    line_sha256: String,
}

/// Where a witness line is: the index of its log, and its line number.
#[derive(Clone, Copy)]
struct At {
    log: usize,
    line: u64,
}

/// Every witnessed checkpoint, by seq and line hash (one seq may be witnessed twice with two
/// hashes, e.g. a chain that started anew: the files must hold one of them), and how far the
/// files have been compared with them.
pub(super) struct Witnesses {
    logs: Vec<PathBuf>,
    by_seq: BTreeMap<(u64, [u8; 32]), At>,
    /// Witnesses below this seq have been compared (or skipped).
    cursor: u64,
    /// The seq of the lowest witness at or above `cursor`: lines below it need no look-up.
    pending: Option<u64>,
    /// No line of the files seen yet.
    fresh: bool,
    summary: Witnessed,
}

// === impl Witnesses ===

impl Witnesses {
    /// Reads the witness lines of `logs`, streaming: only the witnesses are kept.
    pub(super) fn read(logs: &[PathBuf]) -> Result<Witnesses, Failure> {
        let mut by_seq = BTreeMap::new();
        for (index, log) in logs.iter().enumerate() {
            read_log(log, index, &mut by_seq)?;
        }
        let Some((&(highest, _), _)) = by_seq.last_key_value() else {
            return Err(Failure::NoWitness {
                logs: logs.to_vec(),
            });
        };
        Ok(Witnesses {
            logs: logs.to_vec(),
            by_seq,
            cursor: 0,
            pending: Some(0),
            fresh: true,
            summary: Witnessed {
                highest,
                ..Witnessed::default()
            },
        })
    }

    fn missing(&self, seq: u64, at: At, after: Option<u64>) -> Failure {
        Failure::Missing {
            seq,
            log: self.logs[at.log].clone(),
            log_line: at.line,
            after,
        }
    }

    /// The lowest witness at or above the cursor.
    fn next(&self) -> Option<(u64, At)> {
        self.by_seq
            .range((self.cursor, [0; 32])..)
            .next()
            .map(|(&(seq, _), &at)| (seq, at))
    }

    /// Compares the files' line at `seq` (`hash`, at `file`:`line`) with the witnesses, given
    /// the seq of the line before it in the files (`before`). Witnesses below the first seq in
    /// the files are skipped; one between `before` and `seq` is missing (the files jump over it).
    pub(super) fn check(
        &mut self,
        seq: u64,
        hash: &[u8; 32],
        (file, line): (&Path, u64),
        before: Option<u64>,
    ) -> Result<(), Failure> {
        if self.fresh {
            self.fresh = false;
            self.summary.skipped = self.by_seq.range(..(seq, [0; 32])).count() as u64;
            self.cursor = seq;
        } else if self.pending.is_none_or(|p| p > seq) {
            return Ok(());
        }
        match self.next() {
            Some((s, _)) if s > seq => {
                self.pending = Some(s);
                return Ok(());
            }
            None => {
                self.pending = None;
                return Ok(());
            }
            Some((s, at)) if s < seq => return Err(self.missing(s, at, before)),
            Some(_) => {}
        }
        let mut first = None;
        let mut matched = false;
        for (&(_, h), &at) in self.by_seq.range((seq, [0; 32])..=(seq, [0xff; 32])) {
            first.get_or_insert(at);
            matched |= &h == hash;
        }
        self.cursor = seq + 1;
        self.pending = self.next().map(|(s, _)| s);
        match first {
            Some(at) if !matched => Err(Failure::broken(
                file,
                line,
                format!(
                    "seq {seq} differs from the witnessed checkpoint ({}:{})",
                    self.logs[at.log].display(),
                    at.line
                ),
            )),
            _ => {
                self.summary.matched += 1;
                Ok(())
            }
        }
    }

    /// After the last line of the files (whose seq is `last`): every witness left is missing.
    pub(super) fn finish(self, last: Option<u64>) -> Result<Witnessed, Failure> {
        match self.next() {
            Some((seq, at)) => Err(self.missing(seq, at, last)),
            None => Ok(self.summary),
        }
    }
}

fn read_log(
    log: &Path,
    index: usize,
    by_seq: &mut BTreeMap<(u64, [u8; 32]), At>,
) -> Result<(), Failure> {
    let unreadable = |error| Failure::unreadable(log, error);
    let file = File::open(log).map_err(unreadable)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(4096);
    let mut lineno = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(unreadable)? == 0 {
            return Ok(());
        }
        lineno += 1;
        if !buf.windows(MARK.len()).any(|w| w == MARK) {
            continue;
        }
        let Some(fields) = witness(&buf) else {
            continue;
        };
        let bad = |why: String| Failure::BadWitness {
            log: log.to_owned(),
            line: lineno,
            why,
        };
        let fields: WitnessFields = serde_json::from_value(fields).map_err(|e| {
            bad(format!(
                "audit_checkpoint without a seq and line_sha256 ({e})"
            ))
        })?;
        let hash = parse_hex(&fields.line_sha256)
            .ok_or_else(|| bad("line_sha256 is not a hex SHA-256".into()))?;
        by_seq.entry((fields.seq, hash)).or_insert(At {
            log: index,
            line: lineno,
        });
    }
}

/// The `audit_checkpoint` object of a log line that is a JSON object holding one. A line that
/// is not JSON as a whole (a prefix added by the log pipeline, e.g. syslog's) is read from the
/// object that begins with `{"audit_checkpoint"`.
fn witness(line: &[u8]) -> Option<serde_json::Value> {
    let object = |bytes: &[u8]| {
        serde_json::Deserializer::from_slice(bytes)
            .into_iter::<LogLine>()
            .next()
            .and_then(Result::ok)
            .and_then(|l| l.audit_checkpoint)
    };
    let whole = line.strip_suffix(b"\n").unwrap_or(line);
    if let Ok(parsed) = serde_json::from_slice::<LogLine>(whole) {
        return parsed.audit_checkpoint.filter(serde_json::Value::is_object);
    }
    const START: &[u8] = b"{\"audit_checkpoint\"";
    let at = line.windows(START.len()).position(|w| w == START)?;
    object(&line[at..]).filter(serde_json::Value::is_object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn witness_lines_are_json_objects_holding_an_audit_checkpoint_object() {
        let cp = r#"{"audit_checkpoint":{"seq":7,"line_sha256":"ab","key_id":"k","signature":"s"},"path":"a","ts":"t"}"#;
        assert_eq!(witness(cp.as_bytes()).unwrap()["seq"], 7);
        let prefixed = format!("Dec 01 00:00:00 host gw[1]: {cp}");
        assert_eq!(witness(prefixed.as_bytes()).unwrap()["seq"], 7);
        for not in [
            r#"{"message":"audit_checkpoint written","level":"INFO"}"#,
            r#"{"audit_checkpoint":"seq 7"}"#,
            "2026-12-01T00:00:00Z INFO audit_checkpoint seq=7",
            r#"{"audit_checkpoint":{"seq":7}"#,
        ] {
            assert!(witness(not.as_bytes()).is_none(), "{not}");
        }
    }
}
