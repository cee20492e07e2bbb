//! Writing key and certificate files. Each file is replaced atomically
//! (temporary file, fsync, rename) and created with the mode it needs, so a
//! crash never leaves half a key behind and a key is never readable by
//! others. Both the cloud (its state directory, `tether certs`) and the
//! edge (its enrolled credentials) write their PKI files this way.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {cause}")]
pub struct WriteError {
    /// The file (or its temporary sibling).
    pub path: String,
    /// The I/O error.
    pub cause: std::io::Error,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |cause| WriteError {
        path: path.display().to_string(),
        cause,
    }
}

/// Replaces `path` atomically (temp file + fsync + rename) with mode `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
