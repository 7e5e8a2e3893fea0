//! The one error type of agentbus.
//!
//! Modelled on opendal's error: a single [`Error`] carrying a `#[non_exhaustive]`
//! [`ErrorKind`] that callers branch on, a message that says what happened, why and
//! what to do, optional context key/values, and the underlying cause as `source`.
//! Backends map their driver errors into a kind at the boundary and keep the original
//! error as the source, so driver types never leak into the API.

use std::fmt;
use std::time::Duration;

/// What went wrong, coarsely enough to branch on.
///
/// New kinds may be added in minor releases; match with a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A channel name or pattern breaks the naming rules.
    InvalidChannel,
    /// A message kind is not in the registry, where registered kinds are required.
    MessageKindNotRegistered,
    /// An agent tried to send a kind it did not declare in its descriptor.
    UndeclaredMessage,
    /// A payload could not be encoded or decoded for its kind.
    Schema,
    /// Bad input that is not about channels or kinds: an oversized payload, a deadline
    /// in the past, an unknown option value.
    InvalidInput,
    /// A request, gather or operation did not finish in time.
    Timeout,
    /// A request was published to a channel that no group is subscribed to.
    NoResponders,
    /// The channel's retention limit is reached and it is configured to reject new
    /// messages.
    Full,
    /// A delivery was settled (acked, nacked or rejected) a second time.
    AlreadySettled,
    /// A dead letter, channel or group that does not exist.
    NotFound,
    /// The engine or bus is shut down or closing.
    Closed,
    /// No agent can take a task for a capability.
    NoAgentFound,
    /// The engine or backend does not support the operation (see its capabilities).
    Unsupported,
    /// The backend could not be reached or failed underneath; usually temporary.
    Backend,
    /// A handler returned an error or panicked.
    Handler,
    /// Something that should not happen; a bug in agentbus.
    Internal,
    /// A durable engine's data directory is held by another process (the message
    /// names its PID).
    DataDirLocked,
    /// Stored data failed its checksum or does not decode; the message names the
    /// file and offset, and how to repair.
    Corrupt,
}

impl ErrorKind {
    /// A short stable name, used in logs, metrics labels and the CLI's `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidChannel => "invalid_channel",
            ErrorKind::MessageKindNotRegistered => "message_kind_not_registered",
            ErrorKind::UndeclaredMessage => "undeclared_message",
            ErrorKind::Schema => "schema",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NoResponders => "no_responders",
            ErrorKind::Full => "full",
            ErrorKind::AlreadySettled => "already_settled",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Closed => "closed",
            ErrorKind::NoAgentFound => "no_agent_found",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Backend => "backend",
            ErrorKind::Handler => "handler",
            ErrorKind::Internal => "internal",
            ErrorKind::DataDirLocked => "data_dir_locked",
            ErrorKind::Corrupt => "corrupt",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An agentbus error: a kind to branch on, a message for people, and context.
///
/// # Examples
///
/// ```
/// use agentbus::{ChannelName, ErrorKind};
///
/// let err = ChannelName::new("orders..created").unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::InvalidChannel);
/// assert!(err.to_string().contains("token 2"));
/// ```
pub struct Error {
    kind: ErrorKind,
    message: String,
    context: Vec<(&'static str, String)>,
    temporary: bool,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The result type of agentbus operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message that says what happened, why and what to do.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            context: Vec::new(),
            temporary: matches!(kind, ErrorKind::Backend | ErrorKind::Timeout),
            source: None,
        }
    }

    /// Adds a key/value of context (the channel, the group, the dead-letter id…).
    pub fn with_context(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Marks whether retrying the same operation may succeed.
    pub fn set_temporary(mut self, temporary: bool) -> Self {
        self.temporary = temporary;
        self
    }

    /// What went wrong, to branch on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human message, without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The context key/values attached along the way.
    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }

    /// Whether retrying the operation may succeed (backend outages, timeouts).
    pub fn is_temporary(&self) -> bool {
        self.temporary
    }

    pub(crate) fn invalid_input(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    pub(crate) fn closed(what: &str) -> Self {
        Error::new(
            ErrorKind::Closed,
            format!("{what} is closed: it was shut down; create a new one to continue"),
        )
    }

    pub(crate) fn timeout(operation: &str, channel: &str, after: Duration) -> Self {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "{operation} on channel '{channel}' timed out after {after:?}: no reply came in time; \
                 check that a responder is running and healthy, or raise the timeout"
            ),
        )
        .with_context("channel", channel)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if !self.context.is_empty() {
            f.write_str(" (")?;
            for (i, (k, v)) in self.context.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{k}: {v}")?;
            }
            f.write_str(")")?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if !self.context.is_empty() {
            d.field("context", &self.context);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}
