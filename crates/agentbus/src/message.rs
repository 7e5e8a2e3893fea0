//! Typed messages and the registry of kinds.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};

/// A typed payload: serde for the wire, a stable [`Message::KIND`] naming the type on
/// the wire, and a JSON Schema (schemars) describing it.
///
/// The kind is a compatibility promise: renaming the Rust type must not change it.
///
/// # Examples
///
/// ```
/// use agentbus::Message;
///
/// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
/// struct SchedulingRequest {
///     vehicle_id: String,
///     urgency: u8,
/// }
///
/// impl Message for SchedulingRequest {
///     const KIND: &'static str = "scheduling.request";
/// }
/// ```
pub trait Message: Serialize + DeserializeOwned + JsonSchema + Send + Sync + 'static {
    /// The stable type name on the wire, e.g. `vehicle.data`.
    const KIND: &'static str;
}

type Validator = Arc<dyn Fn(&[u8]) -> std::result::Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct KindEntry {
    schema: serde_json::Value,
    validate: Validator,
}

/// The kinds a bus knows: name → JSON Schema and a validator that decodes the payload.
///
/// Cheap to clone; clones share the same registry.
#[derive(Clone, Default)]
pub struct KindRegistry {
    kinds: Arc<RwLock<BTreeMap<String, KindEntry>>>,
}

impl std::fmt::Debug for KindRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KindRegistry")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl KindRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `M` under `M::KIND`. Registering the same kind again replaces it.
    pub fn register<M: Message>(&self) {
        let schema = serde_json::to_value(schemars::schema_for!(M)).unwrap_or_default();
        let validate: Validator = Arc::new(|bytes: &[u8]| {
            serde_json::from_slice::<M>(bytes)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        self.kinds
            .write()
            .insert(M::KIND.to_string(), KindEntry { schema, validate });
    }

    /// Whether `kind` is registered.
    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.read().contains_key(kind)
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.kinds.read().keys().cloned().collect()
    }

    /// The JSON Schema of `kind`, if registered.
    pub fn schema(&self, kind: &str) -> Option<serde_json::Value> {
        self.kinds.read().get(kind).map(|e| e.schema.clone())
    }

    /// Checks an envelope against the registry.
    ///
    /// Registered kinds must decode. Unknown kinds pass unless `require_registered`.
    ///
    /// # Errors
    /// [`ErrorKind::Schema`] if the payload does not decode for its registered kind;
    /// [`ErrorKind::MessageKindNotRegistered`] naming the registered kinds if the kind is
    /// unknown and `require_registered` is set.
    pub fn validate(&self, envelope: &Envelope, require_registered: bool) -> Result<()> {
        let kind = envelope.header.kind.as_str();
        let validate = self.kinds.read().get(kind).map(|e| e.validate.clone());
        match validate {
            Some(validate) => validate(&envelope.payload).map_err(|why| {
                Error::new(
                    ErrorKind::Schema,
                    format!(
                        "payload of kind '{kind}' on channel '{}' does not match its schema: {why}",
                        envelope.channel
                    ),
                )
                .with_context("message_id", envelope.header.id)
            }),
            None if require_registered => Err(self.not_registered(kind)),
            None => Ok(()),
        }
    }

    /// The `MessageKindNotRegistered` error for `kind`, listing what is registered.
    pub fn not_registered(&self, kind: &str) -> Error {
        let known = self.kinds();
        let listed = if known.is_empty() {
            "none are registered".to_string()
        } else {
            format!("registered kinds: {}", known.join(", "))
        };
        Error::new(
            ErrorKind::MessageKindNotRegistered,
            format!(
                "message kind '{kind}' is not registered ({listed}); register its type with \
                 `bus.register::<T>()` or send one of the registered kinds"
            ),
        )
        .with_context("kind", kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelName;

    #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    struct Ping {
        n: u32,
    }
    impl Message for Ping {
        const KIND: &'static str = "ping";
    }

    #[test]
    fn validates_registered_kinds_and_names_them_when_unknown() {
        let registry = KindRegistry::new();
        registry.register::<Ping>();
        let ch = ChannelName::new("a").unwrap();
        let good = Envelope::new(ch.clone(), "ping", &b"{\"n\":1}"[..]);
        registry.validate(&good, true).unwrap();
        let bad = Envelope::new(ch.clone(), "ping", &b"{\"n\":\"x\"}"[..]);
        assert_eq!(
            registry.validate(&bad, false).unwrap_err().kind(),
            ErrorKind::Schema
        );
        let unknown = Envelope::new(ch, "pong", &b"{}"[..]);
        registry.validate(&unknown, false).unwrap();
        let e = registry.validate(&unknown, true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MessageKindNotRegistered);
        assert!(e.to_string().contains("registered kinds: ping"), "{e}");
        assert!(registry.schema("ping").unwrap()["properties"]["n"].is_object());
    }
}
