//! Naming the damage where a line's `prev` is not the chain's head: edited, inserted, deleted,
//! reordered, or a chain that starts anew.

use std::io::BufRead;
use std::path::Path;

use super::record::{check_checkpoint, CheckpointError, Line};
use super::report::Failure;
use super::{Chain, Options};
use crate::ops::audit::{hex, line_hash, GENESIS};

/// A line whose `prev` is not the chain's head, as read.
pub(super) struct Mismatch<'a> {
    pub(super) lineno: u64,
    pub(super) seq: u64,
    pub(super) prev: &'a str,
    /// The line's own hash.
    pub(super) hash: [u8; 32],
    pub(super) parsed: &'a Line<'a>,
}

/// Names the damage at a [`Mismatch`], reading ahead in `reader` to tell its kinds apart: `Ok`
/// is the finding, `Err` that the file could not be read further.
pub(super) fn diagnose(
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
            let ts = parsed.ts.as_deref().unwrap_or("");
            // Valid by the key it carries, pinned or not: this line is authentic.
            !matches!(
                check_checkpoint(cp, prev, seq, ts, &opts.pinned),
                Err(CheckpointError::Bad(_))
            )
        });
    let successor_next =
        next_prev.as_deref() == Some(expected.as_str()) && next_seq == Some(chain.seq + 1);
    let discontinuity = parsed.discontinuity().filter(|_| lineno == 1);
    let why = if lineno == 1 && prev == hex(&GENESIS) && discontinuity.is_some() {
        format!("a new chain starts here: the gateway set aside {} (a file it could not prove its own) and knew no head to continue: verify the files before it and from it on separately", discontinuity.and_then(|cp| cp.found.as_ref()).map_or("?", |f| f.file.as_str()))
    } else if lineno == 1 && seq == 1 && prev == hex(&GENESIS) {
        "a new chain starts here (the gateway started on a new, empty file): verify the files before it and from it on separately".into()
    } else if discontinuity.is_some() && !chain.fresh {
        let before = chain.last_file.as_deref();
        match before.map(|f| find_line(f, prev)).transpose()?.flatten() {
            Some((line, at)) => format!(
                "the chain forks: this discontinuity checkpoint continues from {}:{line} (seq {at}), the head the gateway knew, not from that file's last line (seq {}): the lines after it there were set aside (written by a gateway killed before it saved its head, or added by someone else); verify that file on its own (--live) and this one with --mid-chain",
                before.map_or_else(String::new, |f| f.display().to_string()),
                chain.seq
            ),
            None => format!(
                "deleted or edited: this discontinuity checkpoint continues from head {}…, which is no line of the file before it (its last is seq {}): a file between them is missing, or one of them was changed",
                &prev[..16.min(prev.len())],
                chain.seq
            ),
        }
    } else if discontinuity.is_some() && chain.fresh {
        format!("deleted: this file opens with a discontinuity checkpoint that continues a chain head from an earlier file (seq {seq} follows it): give the files before it first, or --mid-chain to verify from here")
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

/// The line of `file` whose hash is `hash_hex`, and its seq: read again only to explain a
/// finding, so verification itself keeps no hashes.
fn find_line(file: &Path, hash_hex: &str) -> Result<Option<(u64, u64)>, Failure> {
    let unreadable = |error| Failure::unreadable(file, error);
    let mut reader =
        std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file).map_err(unreadable)?);
    let mut buf = Vec::new();
    let mut lineno = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(unreadable)? == 0 {
            return Ok(None);
        }
        lineno += 1;
        let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if hex(&line_hash(line)) == hash_hex {
            let seq = serde_json::from_slice::<Line<'_>>(line)
                .ok()
                .and_then(|l| l.seq)
                .unwrap_or(0);
            return Ok(Some((lineno, seq)));
        }
    }
}
