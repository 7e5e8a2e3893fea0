//! Channel names, subscription patterns and the typed channel template.
//!
//! A channel name is dot-separated tokens (`channel.vehicle.data.input`), each token
//! `[A-Za-z0-9_-]+`, at most [`MAX_TOKENS`] tokens and [`MAX_CHANNEL_BYTES`] bytes.
//! Patterns add `*` (exactly one token) and `>` (one or more trailing tokens), as in
//! NATS. Names starting with `_` are reserved for the system (`_inbox.*`, `_sys.*`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

/// The most tokens a channel name or pattern may have.
pub const MAX_TOKENS: usize = 16;
/// The longest a channel name or pattern may be, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 255;

fn invalid(input: &str, why: impl fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidChannel,
        format!(
            "invalid channel '{input}': {why}; a channel is dot-separated tokens of \
             [A-Za-z0-9_-], at most {MAX_TOKENS} tokens and {MAX_CHANNEL_BYTES} bytes, \
             e.g. 'channel.vehicle.data.input'"
        ),
    )
    .with_context("channel", input)
}

fn token_is_valid(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| TOKEN_BYTES[usize::from(b)] == TOKEN)
}

/// Checks the shape shared by names and patterns; `allow_wildcards` admits `*` and a
/// final `>`.
fn validate(input: &str, allow_wildcards: bool) -> Result<()> {
    // Names are made for every message a backend decodes (a request's channel, its
    // reply inbox): the one-pass check costs a fraction of the per-token one.
    if is_plain_name(input) {
        return Ok(());
    }
    validate_tokens(input, allow_wildcards)
}

/// Whether `input` is a valid channel name (no wildcards), in one pass over its
/// bytes. `false` does not mean invalid: patterns and bad names go on to
/// [`validate_tokens`], which also says what is wrong.
fn is_plain_name(input: &str) -> bool {
    let bytes = input.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_CHANNEL_BYTES {
        return false;
    }
    let mut tokens = 1;
    // A leading dot, two in a row, or a trailing one make an empty token.
    let mut after_dot = true;
    for &b in bytes {
        match TOKEN_BYTES[usize::from(b)] {
            TOKEN => after_dot = false,
            DOT if !after_dot => {
                tokens += 1;
                after_dot = true;
            }
            _ => return false,
        }
    }
    !after_dot && tokens <= MAX_TOKENS
}

/// What each byte is in a plain channel name: one table lookup per byte instead of
/// the three range checks of `is_ascii_alphanumeric` and two comparisons (half of
/// [`is_plain_name`]'s time).
const TOKEN_BYTES: [u8; 256] = {
    let mut table = [OTHER; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' {
            table[b] = TOKEN;
        }
        b += 1;
    }
    table[b'.' as usize] = DOT;
    table
};
const OTHER: u8 = 0;
const TOKEN: u8 = 1;
const DOT: u8 = 2;

/// The full check, token by token, with an error naming the bad token.
fn validate_tokens(input: &str, allow_wildcards: bool) -> Result<()> {
    if input.is_empty() {
        return Err(invalid(input, "it is empty"));
    }
    if input.len() > MAX_CHANNEL_BYTES {
        return Err(invalid(
            input,
            format!("it is {} bytes long, over the limit", input.len()),
        ));
    }
    let count = input.split('.').count();
    if count > MAX_TOKENS {
        return Err(invalid(
            input,
            format!("it has {count} tokens, over the limit"),
        ));
    }
    for (index, token) in input.split('.').enumerate() {
        let position = index + 1;
        if token.is_empty() {
            return Err(invalid(
                input,
                format!(
                    "token {position} is empty (two dots in a row, or a leading or trailing dot)"
                ),
            ));
        }
        if allow_wildcards && token == "*" {
            continue;
        }
        if allow_wildcards && token == ">" {
            if position != count {
                return Err(invalid(
                    input,
                    format!("token {position} is '>', which may only be the last token"),
                ));
            }
            continue;
        }
        if !token_is_valid(token) {
            let rule = if !allow_wildcards && (token == "*" || token == ">") {
                "wildcards are allowed in subscription patterns, not in channel names".to_string()
            } else {
                let bad = token
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
                    .unwrap_or('?');
                format!("character '{bad}' is not allowed")
            };
            return Err(invalid(
                input,
                format!("token {position} '{token}' is invalid: {rule}"),
            ));
        }
    }
    Ok(())
}

/// A valid, concrete channel name. Cheap to clone.
///
/// # Examples
///
/// ```
/// use agentbus::ChannelName;
///
/// let channel = ChannelName::new("channel.scheduling.request")?;
/// assert_eq!(channel.tokens().count(), 3);
/// assert!(ChannelName::new("channel.*").is_err());
/// # Ok::<(), agentbus::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    /// Validates `name`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidChannel`] naming the bad token and the rule it breaks.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        validate(name, false)?;
        Ok(ChannelName(Arc::from(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The dot-separated tokens.
    pub fn tokens(&self) -> std::str::Split<'_, char> {
        self.0.split('.')
    }

    /// Whether this is a system channel (name starts with `_`).
    pub fn is_system(&self) -> bool {
        self.0.starts_with('_')
    }
}

impl TryFrom<String> for ChannelName {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        ChannelName::new(value)
    }
}

impl From<ChannelName> for String {
    fn from(value: ChannelName) -> Self {
        value.0.to_string()
    }
}

impl FromStr for ChannelName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ChannelName::new(s)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelName({:?})", &*self.0)
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A subscription pattern: a channel name whose tokens may be `*` (exactly one token)
/// or, last, `>` (one or more tokens).
///
/// # Examples
///
/// ```
/// use agentbus::{ChannelName, ChannelPattern};
///
/// let pattern = ChannelPattern::new("channel.*.result")?;
/// assert!(pattern.matches(&ChannelName::new("channel.scheduling.result")?));
/// assert!(!pattern.matches(&ChannelName::new("channel.scheduling.request")?));
/// let all = ChannelPattern::new("channel.>")?;
/// assert!(all.matches(&ChannelName::new("channel.system.timeout")?));
/// # Ok::<(), agentbus::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelPattern(Arc<str>);

impl ChannelPattern {
    /// Validates `pattern`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidChannel`] naming the bad token and the rule it breaks.
    pub fn new(pattern: impl AsRef<str>) -> Result<Self> {
        let pattern = pattern.as_ref();
        validate(pattern, true)?;
        Ok(ChannelPattern(Arc::from(pattern)))
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern has no wildcard, so it names exactly one channel.
    pub fn is_literal(&self) -> bool {
        !self.0.split('.').any(|t| t == "*" || t == ">")
    }

    /// Whether `channel` matches this pattern.
    pub fn matches(&self, channel: &ChannelName) -> bool {
        self.matches_str(channel.as_str())
    }

    /// Whether the (already valid) channel name `channel` matches this pattern.
    pub fn matches_str(&self, channel: &str) -> bool {
        let mut names = channel.split('.');
        let mut patterns = self.0.split('.');
        loop {
            match (patterns.next(), names.next()) {
                (None, None) => return true,
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(p), Some(n)) if p == n => {}
                _ => return false,
            }
        }
    }
}

impl From<ChannelName> for ChannelPattern {
    fn from(name: ChannelName) -> Self {
        ChannelPattern(name.0)
    }
}

impl TryFrom<String> for ChannelPattern {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        ChannelPattern::new(value)
    }
}

impl From<ChannelPattern> for String {
    fn from(value: ChannelPattern) -> Self {
        value.0.to_string()
    }
}

impl FromStr for ChannelPattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ChannelPattern::new(s)
    }
}

impl fmt::Display for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelPattern({:?})", &*self.0)
    }
}

/// The direction token of a typed channel (seed 002's `MessageClass:direction:session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A request that expects a response.
    Request,
    /// The response to a request.
    Response,
    /// A fact that happened; no reply expected.
    Event,
    /// An instruction to act; no reply expected.
    Command,
}

impl Direction {
    /// The token used in channel names.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
            Direction::Event => "event",
            Direction::Command => "command",
        }
    }

    fn parse(token: &str) -> Option<Direction> {
        Some(match token {
            "request" => Direction::Request,
            "response" => Direction::Response,
            "event" => Direction::Event,
            "command" => Direction::Command,
            _ => return None,
        })
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builders for the typed channel template `<kind>.<direction>.<session>`.
#[derive(Debug)]
pub struct Channel;

impl Channel {
    /// The channel for message type `M`, `direction` and `session`:
    /// `<M::KIND>.<direction>.<session>`.
    ///
    /// # Examples
    ///
    /// ```
    /// use agentbus::{Channel, Direction, Message, parse_channel};
    /// # #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    /// # struct PaymentRequest { amount: f64 }
    /// # impl Message for PaymentRequest { const KIND: &'static str = "payment"; }
    ///
    /// let channel = Channel::typed::<PaymentRequest>(Direction::Request, "session-456")?;
    /// assert_eq!(channel.as_str(), "payment.request.session-456");
    /// let parts = parse_channel(channel.as_str())?;
    /// assert_eq!(parts.kind, "payment");
    /// assert_eq!(parts.session, "session-456");
    /// # Ok::<(), agentbus::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidChannel`] if the session is not a valid token.
    pub fn typed<M: Message>(direction: Direction, session: &str) -> Result<ChannelName> {
        Self::typed_kind(M::KIND, direction, session)
    }

    /// Like [`Channel::typed`] with the kind given at run time.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidChannel`] if the kind or session does not make valid tokens.
    pub fn typed_kind(kind: &str, direction: Direction, session: &str) -> Result<ChannelName> {
        if session.contains('.') || !token_is_valid(session) {
            return Err(invalid(
                session,
                "the session must be a single token of [A-Za-z0-9_-] (no dots)",
            ));
        }
        ChannelName::new(format!("{kind}.{}.{session}", direction.as_str()))
    }
}

/// The parts of a typed channel name, from [`parse_channel`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedChannel {
    /// The message kind (may contain dots).
    pub kind: String,
    /// The direction token.
    pub direction: Direction,
    /// The session token.
    pub session: String,
}

/// Splits a typed channel name `<kind>.<direction>.<session>` into its parts.
///
/// # Errors
/// [`ErrorKind::InvalidChannel`] when the name is invalid or does not fit the template;
/// the message shows the expected shape and what was found.
pub fn parse_channel(name: &str) -> Result<ParsedChannel> {
    let channel = ChannelName::new(name)?;
    let tokens: Vec<&str> = channel.tokens().collect();
    if tokens.len() < 3 {
        return Err(invalid(
            name,
            format!(
                "a typed channel has the form '<kind>.<direction>.<session>' (at least 3 tokens), \
                 found {} token(s)",
                tokens.len()
            ),
        ));
    }
    let direction_token = tokens[tokens.len() - 2];
    let direction = Direction::parse(direction_token).ok_or_else(|| {
        invalid(
            name,
            format!(
                "token {} '{direction_token}' should be a direction: request, response, event or command",
                tokens.len() - 1
            ),
        )
    })?;
    Ok(ParsedChannel {
        kind: tokens[..tokens.len() - 2].join("."),
        direction,
        session: tokens[tokens.len() - 1].to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A deliberately naive matcher: recursion over token slices.
    fn reference_match(pattern: &[&str], name: &[&str]) -> bool {
        match (pattern.first(), name.first()) {
            (None, None) => true,
            (Some(&">"), Some(_)) => true,
            (Some(&"*"), Some(_)) => reference_match(&pattern[1..], &name[1..]),
            (Some(p), Some(n)) => p == n && reference_match(&pattern[1..], &name[1..]),
            _ => false,
        }
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            "[a-c0-9_-]{1,3}"
        ]
    }

    fn name() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(token(), 1..6)
    }

    fn pattern() -> impl Strategy<Value = Vec<String>> {
        (
            prop::collection::vec(prop_oneof![token(), Just("*".to_string())], 1..6),
            any::<bool>(),
        )
            .prop_map(|(mut tokens, tail)| {
                if tail {
                    tokens.push(">".to_string());
                }
                tokens
            })
    }

    proptest! {
        #[test]
        fn the_one_pass_check_agrees_with_the_token_check(
            input in prop_oneof![
                "(\\.|[a-z0-9_-]{1,20}|[*> %é]){0,40}",
                "([a-z]{1,3}\\.){10,20}[a-z]",
                "[a-z]{200,300}",
                any::<String>(),
            ]
        ) {
            prop_assert_eq!(is_plain_name(&input), validate_tokens(&input, false).is_ok());
            prop_assert_eq!(
                validate(&input, true).is_ok(),
                validate_tokens(&input, true).is_ok()
            );
        }

        #[test]
        fn matching_agrees_with_reference(p in pattern(), n in name()) {
            let pattern = ChannelPattern::new(p.join(".")).unwrap();
            let channel = ChannelName::new(n.join(".")).unwrap();
            let pr: Vec<&str> = p.iter().map(String::as_str).collect();
            let nr: Vec<&str> = n.iter().map(String::as_str).collect();
            prop_assert_eq!(pattern.matches(&channel), reference_match(&pr, &nr));
        }

        #[test]
        fn a_literal_pattern_matches_exactly_its_name(n in name(), m in name()) {
            let pattern = ChannelPattern::new(n.join(".")).unwrap();
            let other = ChannelName::new(m.join(".")).unwrap();
            prop_assert_eq!(pattern.matches(&other), n == m);
        }

        #[test]
        fn arbitrary_input_never_panics(s in ".{0,300}") {
            let _ = ChannelName::new(&s);
            let _ = ChannelPattern::new(&s);
            let _ = parse_channel(&s);
        }
    }

    #[test]
    fn errors_name_the_token_and_the_rule() {
        let e = ChannelName::new("a.b$.c").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidChannel);
        assert!(e.to_string().contains("token 2 'b$'"), "{e}");
        assert!(e.to_string().contains("'$' is not allowed"), "{e}");

        let e = ChannelName::new("a.*").unwrap_err();
        assert!(
            e.to_string()
                .contains("wildcards are allowed in subscription patterns"),
            "{e}"
        );

        let e = ChannelPattern::new("a.>.b").unwrap_err();
        assert!(e.to_string().contains("may only be the last token"), "{e}");

        let e = ChannelName::new("a..b").unwrap_err();
        assert!(e.to_string().contains("token 2 is empty"), "{e}");

        let long = vec!["a"; MAX_TOKENS + 1].join(".");
        assert!(ChannelName::new(&long)
            .unwrap_err()
            .to_string()
            .contains("tokens"));
        let wide = "a".repeat(MAX_CHANNEL_BYTES + 1);
        assert!(ChannelName::new(&wide)
            .unwrap_err()
            .to_string()
            .contains("bytes"));
    }

    #[test]
    fn wildcards() {
        let p = ChannelPattern::new("a.>").unwrap();
        assert!(!p.matches_str("a"));
        assert!(p.matches_str("a.b.c"));
        let p = ChannelPattern::new(">").unwrap();
        assert!(p.matches_str("x"));
        let p = ChannelPattern::new("*.b").unwrap();
        assert!(p.matches_str("a.b"));
        assert!(!p.matches_str("a.b.c"));
    }

    #[test]
    fn parse_channel_reports_what_does_not_fit() {
        let e = parse_channel("payment.sideways.s1").unwrap_err();
        assert!(
            e.to_string().contains("'sideways' should be a direction"),
            "{e}"
        );
        let e = parse_channel("invalid_format").unwrap_err();
        assert!(e.to_string().contains("at least 3 tokens"), "{e}");
        let p = parse_channel("analysis.request.response.s-9").unwrap();
        assert_eq!(p.kind, "analysis.request");
        assert_eq!(p.direction, Direction::Response);
    }
}
