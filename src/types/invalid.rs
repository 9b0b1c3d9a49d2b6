//! The one error of the types layer: a value that breaks a naming rule.

/// A stream name or a subscription pattern that breaks its rule; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A stream name broke the naming rule.
    #[error("invalid stream name {name:?}: {rule}")]
    Name { name: String, rule: &'static str },

    /// A subscription pattern broke the pattern rule.
    #[error("invalid pattern {pattern:?}: {rule}")]
    Pattern { pattern: String, rule: &'static str },
}
