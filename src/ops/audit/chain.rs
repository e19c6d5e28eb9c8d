//! The chain's file and head: opening the file at the path, following a rotation, setting aside
//! a file that is not the gateway's own, and writing lines so that none is ever left partial.
//!
//! Guarantees: lines go out only after the head this process knows (its own last line, or the
//! signed head it saved); a file at the path that does not end with that head, or that grew by
//! lines this process did not write, is never continued or sealed: it is renamed to
//! `<audit_log>.discontinuity-<UTC time>` and a new file begins with a `discontinuity`
//! checkpoint. A failed or partial write is cut back to the last whole line.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::checkpoint::{self, Head, Signed};
use super::records::{Found, Seal};
use super::{chained_line, head_path, line_hash, AuditMetrics, GENESIS};
use crate::protocol::keys::Signer;

/// Audit files and the saved head are readable by their owner only, whatever the umask.
const FILE_MODE: u32 = 0o600;

/// Where the chain stands: the hash and `seq` of its last line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Known {
    pub(crate) hash: [u8; 32],
    pub(crate) seq: u64,
}

/// The open file and the head of the chain; owned by the writer thread alone.
#[derive(Debug)]
pub(crate) struct Chain {
    path: PathBuf,
    file: File,
    /// (device, inode) of `file`, to see that the path now names another file (rotation).
    id: (u64, u64),
    /// A regular file (a FIFO has no length to check).
    regular: bool,
    /// Length of the file after the last line this process wrote.
    len: u64,
    /// SHA-256 and `seq` of the last line written (`seq` 0 before the first).
    head: [u8; 32],
    pub(crate) seq: u64,
    /// Lines since the last checkpoint.
    pub(crate) unsealed: u64,
    /// When the oldest line not yet covered by a checkpoint was written.
    pub(crate) unsealed_since: Option<Instant>,
    /// A reload pointed `audit_log` elsewhere: a record still written here is sealed at once.
    pub(crate) retired: bool,
    /// The last line of the file is this checkpoint (what `.head` may save).
    last_checkpoint: Option<Head>,
    metrics: AuditMetrics,
}

/// The signed head saved in `<audit_log>.head`, if it is valid; an invalid one is reported and
/// counts as none (it is never deleted). The flag says whether it was saved by a clean close
/// (`shutdown`, or `reconfigured` when a reload moved `audit_log` away): only then does it say
/// where the file ends. The head saved at start-up (`start`) says only how far `seq` got: if it
/// is still there at the next start, the gateway crashed, and after a crash it knows no head.
pub(crate) fn load_head(log: &Path, signer: &Signer) -> Option<(Head, bool)> {
    let path = head_path(log);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the saved audit head; treating it as none");
            return None;
        }
    };
    let line = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    match checkpoint::verify_head(line, signer) {
        Ok((head, reason)) => {
            let clean = reason == Seal::Shutdown.as_str() || reason == Seal::Reconfigured.as_str();
            Some((head, clean))
        }
        Err(why) => {
            tracing::error!(path = %path.display(), why, "the saved audit head is not a checkpoint signed by this gateway's key; treating it as none");
            None
        }
    }
}

fn file_id(m: &fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// Opens `path` for append (creating it and its folder), mode 0600.
fn open_file(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// `<audit_log>.discontinuity-<UTC time>`, with a counter if that name is taken.
fn aside_path(log: &Path) -> PathBuf {
    let stamp: String = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let base = format!("{}.discontinuity-{stamp}", log.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while fs::symlink_metadata(&candidate).is_ok() {
        candidate = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

/// What a file about to be set aside holds: `seq` of its last line that has one, and the
/// lines after its last checkpoint.
fn survey(file: &File) -> std::io::Result<(u64, u64)> {
    let mut reader = BufReader::new(file.try_clone()?);
    reader.seek(SeekFrom::Start(0))?;
    let (mut last_seq, mut unsealed) = (0, 0);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        unsealed += 1;
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) {
            if let Some(seq) = v.get("seq").and_then(serde_json::Value::as_u64) {
                last_seq = seq;
            }
            if v.get("checkpoint").is_some() {
                unsealed = 0;
            }
        }
    }
    Ok((last_seq, unsealed))
}

// === impl Chain ===

impl Chain {
    /// Opens the file at `path` to continue the chain from `known` (`None`: this process knows
    /// no head). An empty or missing file is used as is; a file that ends with `known` is
    /// continued; any other file is set aside and the new one starts with a `discontinuity`
    /// checkpoint signed by `signer`.
    pub(crate) fn open(
        path: &Path,
        known: Option<Known>,
        known_line: Option<Head>,
        signer: &Signer,
        metrics: &AuditMetrics,
    ) -> std::io::Result<Chain> {
        let mut file = open_file(path)?;
        let meta = file.metadata()?;
        let from = known.unwrap_or(Known {
            hash: GENESIS,
            seq: 0,
        });
        let mut chain = Chain {
            path: path.to_owned(),
            id: file_id(&meta),
            regular: meta.is_file(),
            len: meta.len(),
            head: from.hash,
            seq: from.seq,
            unsealed: 0,
            unsealed_since: None,
            retired: false,
            last_checkpoint: None,
            metrics: metrics.clone(),
            file,
        };
        if !chain.regular || meta.len() == 0 {
            return Ok(chain);
        }
        let (line, complete) = last_line(&mut chain.file, meta.len())?;
        let ours = complete && known.is_some_and(|k| line_hash(&line) == k.hash);
        if ours {
            chain.last_checkpoint = known_line.filter(|h| h.hash == from.hash);
            return Ok(chain);
        }
        file = chain.file.try_clone()?;
        chain.set_aside(&file, signer)?;
        Ok(chain)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The head to carry into the next file.
    pub(crate) fn known(&self) -> Known {
        Known {
            hash: self.head,
            seq: self.seq,
        }
    }

    /// Moves the file at the path (open as `file`) aside, opens a new one there and writes its
    /// first line: a `discontinuity` checkpoint naming what was found.
    fn set_aside(&mut self, file: &File, signer: &Signer) -> std::io::Result<()> {
        let (last_seq, unsealed_lines) = survey(file)?;
        let aside = aside_path(&self.path);
        fs::rename(&self.path, &aside)?;
        let found = Found {
            file: aside.display().to_string(),
            last_seq,
            unsealed_lines,
        };
        tracing::error!(
            path = %self.path.display(),
            set_aside = %found.file,
            last_seq,
            unsealed_lines,
            known_seq = self.seq,
            "audit log at the path is not this gateway's chain (it does not end with the head the gateway knows, or holds lines it did not write): set aside, not continued; a new file begins with a discontinuity checkpoint"
        );
        self.metrics.discontinuities.inc();
        self.metrics.last_discontinuity.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        let next = open_file(&self.path)?;
        let meta = next.metadata()?;
        self.file = next;
        self.id = file_id(&meta);
        self.regular = meta.is_file();
        self.len = meta.len();
        self.unsealed = 0;
        self.unsealed_since = None;
        self.last_checkpoint = None;
        // `seq` never goes backwards, whatever the file held.
        self.seq = self.seq.max(last_seq);
        let signed = checkpoint::sign(
            signer,
            &self.head,
            self.seq + 1,
            Seal::Discontinuity,
            Some(&found),
        )?;
        self.write_lines(&[&signed.line], &[&signed])?;
        self.file.sync_data()
    }

    /// Follows a rotation: if the path no longer names the open file, seals the old file and
    /// continues in the file now at the path (set aside if it is not empty and not ours). A
    /// file that grew by lines this process did not write is set aside too.
    pub(crate) fn follow(&mut self, signer: &Signer) -> std::io::Result<()> {
        match fs::metadata(&self.path) {
            Ok(m) if file_id(&m) == self.id => {
                if self.regular && m.len() == 0 {
                    // Emptied in place (logrotate's `copytruncate`): simply used, like a new file.
                    self.len = 0;
                    return Ok(());
                }
                if self.regular && m.len() != self.len {
                    let file = self.file.try_clone()?;
                    return self.set_aside(&file, signer);
                }
                return Ok(());
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if self.unsealed > 0 {
            // The old file may be gone (deleted); the chain still holds in memory.
            if let Err(e) = self.seal(signer, Seal::Rotation) {
                tracing::warn!(error = %e, "cannot write the closing checkpoint to the rotated audit log");
            }
        }
        let mut next = Chain::open(&self.path, Some(self.known()), None, signer, &self.metrics)?;
        next.retired = self.retired;
        tracing::info!(path = %self.path.display(), "audit log rotated: writing to a new file");
        *self = next;
        Ok(())
    }

    /// Appends a line for `body` (if any) and then, if `seal` says so, a checkpoint, in one
    /// write. On failure nothing changed (the file is cut back).
    pub(crate) fn append(
        &mut self,
        body: Option<&[u8]>,
        seal: Option<(Seal, &Signer)>,
    ) -> std::io::Result<()> {
        let mut head = self.head;
        let mut seq = self.seq;
        let record = match body {
            Some(b) => {
                let line = chained_line(b, seq + 1, &head)?;
                head = line_hash(&line);
                seq += 1;
                Some(line)
            }
            None => None,
        };
        let signed = match seal {
            Some((why, signer)) => Some(checkpoint::sign(signer, &head, seq + 1, why, None)?),
            None => None,
        };
        let mut lines: Vec<&[u8]> = Vec::with_capacity(2);
        lines.extend(record.as_deref());
        lines.extend(signed.as_ref().map(|s| s.line.as_slice()));
        if lines.is_empty() {
            return Ok(());
        }
        let seals: Vec<&Signed> = signed.iter().collect();
        self.write_lines(&lines, &seals)?;
        if signed.is_none() {
            self.unsealed += 1;
            self.unsealed_since.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Seals the chain with a checkpoint.
    pub(crate) fn seal(&mut self, signer: &Signer, why: Seal) -> std::io::Result<()> {
        self.append(None, Some((why, signer)))
    }

    /// Carries a change of the signing key from `old` to `new` in one write: a checkpoint by
    /// `old` sealing everything before, the `key_rotated` record both keys sign, and a
    /// checkpoint by `new` sealing that record. On failure nothing changed.
    pub(crate) fn rotate_key(&mut self, old: &Signer, new: &Signer) -> std::io::Result<()> {
        let seq = self.seq;
        let before = checkpoint::sign(old, &self.head, seq + 1, Seal::KeyRotated, None)?;
        let rotated = checkpoint::key_rotated(old, new, &line_hash(&before.line), seq + 2)?;
        let after = checkpoint::sign(new, &line_hash(&rotated), seq + 3, Seal::KeyRotated, None)?;
        self.write_lines(&[&before.line, &rotated, &after.line], &[&before, &after])
    }

    /// Writes `lines` (chained in order after the head) in one write; `signed` are the
    /// checkpoints among them, in order, and the last line is the last of them when any is
    /// given. A failure cuts the file back to its last whole line.
    fn write_lines(&mut self, lines: &[&[u8]], signed: &[&Signed]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        for l in lines {
            buf.extend_from_slice(l);
            buf.push(b'\n');
        }
        if let Err(e) = self.file.write_all(&buf) {
            if self.regular {
                if let Err(cut) = self.file.set_len(self.len) {
                    tracing::error!(path = %self.path.display(), error = %cut, "cannot cut a failed audit write back to its last whole line");
                }
            }
            return Err(e);
        }
        self.len += buf.len() as u64;
        if let Some(last) = lines.last() {
            self.head = line_hash(last);
        }
        self.seq += lines.len() as u64;
        for s in signed {
            s.witness(&self.path);
        }
        match signed.last() {
            Some(s) => {
                self.unsealed = 0;
                self.unsealed_since = None;
                self.last_checkpoint = Some(s.head());
                self.metrics.seq.set(s.seq as i64);
                self.metrics.recent.checkpoint(s.seq, &s.ts);
            }
            None => self.last_checkpoint = None,
        }
        Ok(())
    }

    /// Flushes the file's data to disk.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Saves the last line, a checkpoint, as `<audit_log>.head`: written beside it, synced, then
    /// renamed over the old one, so a crash leaves the old head or the new one, never neither.
    pub(crate) fn save_head(&self) -> std::io::Result<()> {
        let Some(head) = &self.last_checkpoint else {
            return Err(std::io::Error::other(
                "the audit log does not end with a checkpoint",
            ));
        };
        let path = head_path(&self.path);
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        f.write_all(&head.line)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// The oldest unsealed line is `within` old.
    pub(crate) fn due(&self, within: std::time::Duration) -> bool {
        self.unsealed_since.is_some_and(|t| t.elapsed() >= within)
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
