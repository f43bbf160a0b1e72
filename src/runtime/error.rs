//! Why a worker stopped, and the exit code it means.

use crate::connect::ConnectError;
use crate::source::jetstream::SetupError;
use crate::worker::{ScriptError, StartError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Settings(String),
    #[error("script error: {0}")]
    Script(#[from] ScriptError),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Runtime(String),
}

impl From<SetupError> for RunError {
    fn from(err: SetupError) -> Self {
        match err {
            SetupError::Config(message) => RunError::Settings(message),
            SetupError::Nats(message) => RunError::Runtime(message),
        }
    }
}

impl From<StartError> for RunError {
    fn from(err: StartError) -> Self {
        match err {
            StartError::Script(err) => RunError::Script(err),
            StartError::Connect(err) => RunError::Connect(err),
            StartError::Runtime(message) | StartError::Bridge(message) => RunError::Runtime(message),
        }
    }
}

impl RunError {
    /// 2 for usage, settings and script errors; 1 for failures at run time.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Settings(_) | RunError::Script(_) | RunError::Connect(ConnectError::Settings(_)) => 2,
            RunError::Connect(ConnectError::TimedOut { .. }) | RunError::Runtime(_) => 1,
        }
    }
}
