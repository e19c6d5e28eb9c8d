//! The audit log: one JSON line per answered request, written before the answer is sent.
//!
//! Each record goes out in a single `write` on a file opened for append, so a crash leaves
//! complete lines (the kernel has them once `write` returns, even if the process is killed).
//! Records hold verdicts and errors only, never a token, key or payload.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::fanout::Verdict;

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

/// One answered request.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// RFC 3339 UTC with milliseconds.
    pub ts: String,
    pub request_id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: i64,
    pub action: &'static str,
    pub error: &'a str,
    pub duration_ms: f64,
    /// `off`, `pass`, `reject: <rule>`, or `not_evaluated` (the token or payload was refused).
    pub embedded: String,
    pub servers: &'a [Verdict],
    pub config_generation: u64,
    /// Present (true) only for a TSS Node retry answered from its twin's evaluation.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

// === impl AuditLog ===

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as one line.
    pub fn append(&self, record: &AuditRecord<'_>) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&line)
    }

    /// Flushes file data to disk (at shutdown).
    pub fn sync(&self) -> std::io::Result<()> {
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sync_data()
    }
}
