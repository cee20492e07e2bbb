//! Small, careful file helpers: atomic replace, 0600 for secrets.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::StateError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |cause| StateError::Io {
        path: path.display().to_string(),
        cause,
    }
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

pub(crate) fn read_string(path: &Path) -> Result<String, StateError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// Replaces `path` atomically (temp file + fsync + rename) with mode `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StateError> {
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

/// Writes a secret (keys, token hashes): mode 0600.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), StateError> {
    write_atomic(path, data, 0o600)
}

/// Writes a public file (certificates): mode 0644.
pub(crate) fn write_public(path: &Path, data: &[u8]) -> Result<(), StateError> {
    write_atomic(path, data, 0o644)
}
