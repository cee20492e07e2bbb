//! Small, careful file helpers for the state directory: a 0700 directory,
//! atomic replace (`tether_pki::write_atomic`), 0600 for secrets.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::StateError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |cause| StateError::Io {
        path: path.display().to_string(),
        cause,
    }
}

impl From<tether_pki::WriteError> for StateError {
    fn from(e: tether_pki::WriteError) -> Self {
        StateError::Io {
            path: e.path,
            cause: e.cause,
        }
    }
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), StateError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

pub(crate) fn read_string(path: &Path) -> Result<String, StateError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// Writes a secret (keys, token hashes): mode 0600.
pub(crate) fn write_private(path: &Path, data: &[u8]) -> Result<(), StateError> {
    Ok(tether_pki::write_atomic(path, data, 0o600)?)
}

/// Writes a public file (certificates): mode 0644.
pub(crate) fn write_public(path: &Path, data: &[u8]) -> Result<(), StateError> {
    Ok(tether_pki::write_atomic(path, data, 0o644)?)
}
