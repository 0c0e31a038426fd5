//! Errors of the process layer.

use thiserror::Error;

/// What can go wrong sensing or acting on processes.
#[derive(Debug, Error)]
pub enum ProcError {
    /// The process exited (or its PID now names another process).
    #[error("process {pid} is gone")]
    Gone {
        /// The PID.
        pid: i32,
    },
    /// The OS refused to let us signal it.
    #[error("not permitted to signal process {pid} ({comm}, uid {uid}): allot only controls processes you may signal (your own, unless root)")]
    NotPermitted {
        /// The PID.
        pid: i32,
        /// Its command name.
        comm: String,
        /// Its owner.
        uid: u32,
    },
    /// A selector did not parse or names nothing.
    #[error("{0}")]
    Selector(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        source: nix::errno::Errno,
    },
    /// A model parameter was rejected.
    #[error("{0}")]
    Config(String),
    /// The caller's observer asked to stop with an error (e.g. the report file failed).
    #[error("{0}")]
    Observer(String),
}

impl ProcError {
    pub(crate) fn io(path: impl Into<String>, source: std::io::Error) -> ProcError {
        ProcError::Io {
            path: path.into(),
            source,
        }
    }
}
