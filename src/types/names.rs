//! Stream names and subscription patterns: the naming rule and matching.
//!
//! A name is 1 to 255 bytes of segments separated by `/`, each segment of `[A-Za-z0-9_.-]+`. A
//! pattern is a name in which a segment may be `*` (exactly one segment) and the last segment may
//! be `**` (any number of trailing segments, including none).

use super::Invalid;
use std::fmt;
use std::sync::Arc;

/// The longest stream name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// A stream name that passed the naming rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

impl StreamName {
    /// Checks `name` against the naming rule.
    pub fn parse(name: &str) -> Result<StreamName, Invalid> {
        let invalid = |rule| Err(Invalid::Name { name: quoted(name), rule });
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return invalid("a name is 1 to 255 bytes long");
        }
        for segment in name.split('/') {
            if segment.is_empty() {
                return invalid("segments separated by '/' must not be empty");
            }
            if !segment.bytes().all(is_name_byte) {
                return invalid("each segment may only hold the characters A-Z a-z 0-9 _ . -");
            }
        }
        Ok(StreamName(Arc::from(name)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shared text, cheap to clone into every record of the stream.
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: any number of trailing segments.
    Rest,
}

/// A subscription selector: an exact name or a pattern with `*` / `**`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Checks `pattern` against the pattern rule.
    pub fn parse(pattern: &str) -> Result<Pattern, Invalid> {
        let invalid = |rule| Err(Invalid::Pattern { pattern: quoted(pattern), rule });
        if pattern.is_empty() || pattern.len() > MAX_NAME_BYTES {
            return invalid("a pattern is 1 to 255 bytes long");
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "" => return invalid("segments separated by '/' must not be empty"),
                "*" => Segment::One,
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => return invalid("'**' may only be the last segment"),
                p if p.bytes().all(is_name_byte) => Segment::Literal(p.to_string()),
                _ => {
                    return invalid(
                        "each segment is '*', a final '**', or only the characters A-Z a-z 0-9 _ . -",
                    )
                }
            };
            segments.push(segment);
        }
        Ok(Pattern { text: pattern.to_string(), segments })
    }

    /// The name this pattern stands for when it has no wildcard.
    pub fn exact(&self) -> Option<&str> {
        self.segments.iter().all(|s| matches!(s, Segment::Literal(_))).then_some(self.text.as_str())
    }

    /// Whether `name` is selected by this pattern.
    pub fn matches(&self, name: &str) -> bool {
        let mut parts = name.split('/');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return true,
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// The pattern as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A value as quoted in an error: whole up to 80 bytes, else its start and its length. An error
/// travels back in a gRPC trailer, which clients cap (16 KiB by default): quoting a huge name
/// whole would turn a clear refusal into a protocol error.
fn quoted(value: &str) -> String {
    const SHOWN: usize = 80;
    if value.len() <= SHOWN {
        return value.to_string();
    }
    let mut end = SHOWN;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &value[..end], value.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "sensors/imu.0/accel-x", "A_b.c-D", &"x".repeat(255)] {
            assert!(StreamName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/a", "a/", "a//b", "a b", "é", "a/*", &"x".repeat(256)] {
            assert!(StreamName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_names_the_rule_and_the_value() {
        let err = StreamName::parse("a//b").unwrap_err().to_string();
        assert!(err.contains("\"a//b\"") && err.contains("must not be empty"), "{err}");
    }

    #[test]
    fn patterns_match() {
        let p = Pattern::parse("sensors/*/accel").unwrap();
        assert!(p.matches("sensors/imu/accel"));
        assert!(!p.matches("sensors/accel"));
        assert!(!p.matches("sensors/imu/accel/x"));
        let p = Pattern::parse("sensors/**").unwrap();
        assert!(p.matches("sensors"));
        assert!(p.matches("sensors/a"));
        assert!(p.matches("sensors/a/b/c"));
        assert!(!p.matches("sensorsx/a"));
        let p = Pattern::parse("**").unwrap();
        assert!(p.matches("anything/at/all"));
        assert_eq!(Pattern::parse("a/b").unwrap().exact(), Some("a/b"));
        assert_eq!(Pattern::parse("a/*").unwrap().exact(), None);
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "a/**/b", "a//b", "a/b*", "a/%"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
