//! Why a worker stopped, and the exit code it means.

use crate::connect::ConnectError;
use crate::source::OpenError;
use crate::source::jetstream::SetupError;
use crate::worker::{ScriptError, StartError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Settings(String),
    #[error("script error: {0}")]
    Script(#[from] ScriptError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Start(StartError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot listen on {addr} (--metrics-addr)")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        cause: std::io::Error,
    },
    #[error("cannot subscribe to the $SRV discovery subjects")]
    Discovery(#[source] async_nats::Error),
}

impl From<StartError> for RunError {
    fn from(err: StartError) -> Self {
        match err {
            StartError::Script(err) => RunError::Script(err),
            StartError::Connect(err) => RunError::Connect(err),
            other => RunError::Start(other),
        }
    }
}

impl RunError {
    /// 2 for usage, settings and script errors (the operator must change
    /// something); 1 for failures at run time.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Settings(_) | RunError::Script(_) | RunError::Connect(ConnectError::Settings(_)) => 2,
            RunError::Setup(err) if err.is_declaration() => 2,
            RunError::Connect(ConnectError::TimedOut { .. })
            | RunError::Setup(_)
            | RunError::Start(_)
            | RunError::Open(_)
            | RunError::Listen { .. }
            | RunError::Discovery(_) => 1,
        }
    }

    /// The message with its causes, for logs and stderr.
    pub fn report(&self) -> String {
        crate::report::chain(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declaration_the_server_refuses_exits_2_and_a_failing_server_1() {
        let refused = RunError::from(SetupError::Refused {
            context: "cannot create stream \"ORD\"".into(),
            cause: "insufficient resources".into(),
        });
        assert_eq!(refused.exit_code(), 2);
        assert_eq!(refused.report(), "cannot create stream \"ORD\": insufficient resources");
        let lookup = RunError::from(SetupError::Lookup {
            context: "cannot look up stream \"ORD\"".into(),
            cause: "timed out".into(),
        });
        assert_eq!(lookup.exit_code(), 1);
        assert_eq!(lookup.report(), "cannot look up stream \"ORD\": timed out");
    }

    #[test]
    fn a_report_names_the_cause() {
        let err = RunError::Listen {
            addr: "127.0.0.1:9090".parse().unwrap(),
            cause: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert_eq!(err.exit_code(), 1);
        assert!(err.report().starts_with("cannot listen on 127.0.0.1:9090 (--metrics-addr): "), "{}", err.report());
        assert!(err.report().len() > "cannot listen on 127.0.0.1:9090 (--metrics-addr): ".len());
    }
}
