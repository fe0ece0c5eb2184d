//! One daemon per state file: `serve` holds an exclusive lock on `STATE.lock` for as long as it
//! runs, so a second daemon on the same file refuses to start (and names the first) instead of
//! driving the same rollouts. The lock is the kernel's (`flock`): it dies with the process, so
//! a `kill -9` leaves nothing to clean up.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The held lock; released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct StateLock {
    file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{state} is in use by another coalmine serve ({holder}): only one daemon may drive the rollouts a state file holds")]
    Held { state: String, holder: String },
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
}

/// The lock file beside a state file, whatever path (or symlink) names the state file.
fn lock_path(state: &Path) -> PathBuf {
    let dir = state
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let file = state
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(ToOwned::to_owned))
        .or_else(|| state.file_name().map(ToOwned::to_owned))
        .unwrap_or_default();
    let mut name = file;
    name.push(".lock");
    dir.join(name)
}

impl StateLock {
    /// Takes the lock of `state`, writing who holds it (`holder`, e.g. the pid and API
    /// address) into the lock file for the next one to read.
    pub fn acquire(state: &Path, holder: &str) -> Result<StateLock, LockError> {
        let path = lock_path(state);
        let io = |cause| LockError::Io {
            path: path.display().to_string(),
            cause,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !taken {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "holder unknown".to_string(),
                t => t.to_string(),
            };
            return Err(LockError::Held {
                state: state.display().to_string(),
                holder,
            });
        }
        let mut lock = StateLock {
            file,
            path: path.clone(),
        };
        lock.describe(holder).map_err(io)?;
        Ok(lock)
    }

    /// Says who holds the lock (the next one to try reads it), e.g. once the API address is
    /// known.
    pub fn describe(&mut self, holder: &str) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(holder.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named_until_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("coalmine-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state.db");
        let first = StateLock::acquire(&state, "pid 1, api 127.0.0.1:9900").unwrap();
        let second = StateLock::acquire(&state, "pid 2").unwrap_err().to_string();
        assert!(second.contains("pid 1, api 127.0.0.1:9900"), "{second}");
        drop(first);
        StateLock::acquire(&state, "pid 2").unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
