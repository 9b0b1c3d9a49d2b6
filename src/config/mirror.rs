//! Relay mode's settings: which upstreams this broker copies, which streams, from when.

use crate::error::{Error, Result};
use crate::types::Pattern;
use std::time::Duration;

/// Where a mirror starts the first time; afterwards it resumes from what it stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorFrom {
    /// Everything the upstream has.
    Beginning,
    /// What the upstream appends from now on.
    Now,
    /// What the upstream appended in this last span of time, then live.
    Ago(Duration),
}

impl std::str::FromStr for MirrorFrom {
    type Err = Error;

    fn from_str(value: &str) -> Result<MirrorFrom> {
        let wrong = || Error::Config {
            key: "mirror-from",
            value: value.to_string(),
            expected: "beginning, now, or -DURATION such as -10m",
        };
        match value {
            "beginning" => Ok(MirrorFrom::Beginning),
            "now" => Ok(MirrorFrom::Now),
            v => {
                let span = v.strip_prefix('-').ok_or_else(wrong)?;
                humantime::parse_duration(span).map(MirrorFrom::Ago).map_err(|_| wrong())
            }
        }
    }
}

/// One upstream and the streams copied from it.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// The upstream's URL (an origin or another relay).
    pub upstream: String,
    /// Names or patterns of the mirrored streams.
    pub patterns: Vec<String>,
    pub from: MirrorFrom,
    /// How this relay's link authenticates at the upstream, and the CA it trusts for it.
    pub credentials: crate::client::Credentials,
}

impl Mirror {
    /// Checks the URL and the patterns.
    pub fn validate(&self) -> Result<()> {
        tonic::transport::Endpoint::from_shared(self.upstream.clone()).map_err(|_| Error::Config {
            key: "upstream",
            value: self.upstream.clone(),
            expected: "a URL such as http://10.0.0.5:7411 or https://upstream.example:7411",
        })?;
        let tls = self.credentials.ca.is_some() || self.credentials.identity.is_some();
        if tls && !self.upstream.starts_with("https://") {
            return Err(Error::Config {
                key: "upstream",
                value: self.upstream.clone(),
                expected: "an https:// URL when a CA or client certificate is given for the link",
            });
        }
        if self.patterns.is_empty() {
            return Err(Error::Config {
                key: "mirror",
                value: String::new(),
                expected:
                    "at least one stream name or pattern to mirror from the upstream (--mirror PATTERN)",
            });
        }
        for pattern in &self.patterns {
            Pattern::parse(pattern)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_parses_and_names_the_rule() {
        assert_eq!("beginning".parse::<MirrorFrom>().unwrap(), MirrorFrom::Beginning);
        assert_eq!("now".parse::<MirrorFrom>().unwrap(), MirrorFrom::Now);
        assert_eq!("-10m".parse::<MirrorFrom>().unwrap(), MirrorFrom::Ago(Duration::from_secs(600)));
        let err = "yesterday".parse::<MirrorFrom>().unwrap_err().to_string();
        assert!(err.contains("mirror-from") && err.contains("yesterday"), "{err}");
    }
}
