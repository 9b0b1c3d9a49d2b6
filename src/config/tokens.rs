//! Bearer tokens: 256 random bits each, shown once when created and stored only as a SHA-256
//! digest, one line per token (`NAME sha256:HEX`) in a file others may not read.

use super::access::check_private;
use crate::error::{Error, Result};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// What every token starts with, so a leaked one is recognised for what it is.
const PREFIX: &str = "tlt_";

/// The known tokens, by digest.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    names: HashMap<[u8; 32], String>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A principal name: what permissions and logs call it.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@/:".contains(c));
    if !ok {
        return Err(Error::Config {
            key: "token name",
            value: name.to_string(),
            expected: "1 to 128 characters of letters, digits and - _ . @ / :",
        });
    }
    Ok(())
}

impl Tokens {
    /// Reads a token file, refusing one others may read.
    pub fn load(path: &Path) -> Result<Tokens> {
        check_private(path, "the token file")?;
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("cannot read the token file {}", path.display()),
            source,
        })?;
        let mut names = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || Error::ConfigFile {
                path: path.to_path_buf(),
                detail: format!(
                    "line {}: expected `NAME sha256:HEX` (64 hex digits), as `tapeline token create` writes",
                    number + 1
                ),
            };
            let (name, hash) = line.split_once(char::is_whitespace).ok_or_else(bad)?;
            let hash = hash.trim().strip_prefix("sha256:").and_then(unhex).ok_or_else(bad)?;
            check_name(name)?;
            names.insert(hash, name.to_string());
        }
        Ok(Tokens { names })
    }

    /// The principal a presented token stands for.
    pub fn name_of(&self, token: &str) -> Option<&str> {
        self.names.get(&digest(token)).map(String::as_str)
    }

    /// Makes a new token for `name`, appends its digest to the file at `path` (created private
    /// when missing) and returns the token, which is stored nowhere else.
    pub fn create(path: &Path, name: &str) -> Result<String> {
        check_name(name)?;
        if path.exists() {
            let existing = Tokens::load(path)?;
            if existing.names.values().any(|n| n == name) {
                return Err(Error::Config {
                    key: "token name",
                    value: name.to_string(),
                    expected: "a name the token file does not have yet (remove its line to revoke the old token first)",
                });
            }
        }
        let token = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
        );
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|source| Error::Io {
            context: format!("cannot open the token file {}", path.display()),
            source,
        })?;
        writeln!(file, "{name} sha256:{}", hex(&digest(&token)))
            .and_then(|()| file.sync_all())
            .map_err(|source| Error::Io { context: format!("cannot write {}", path.display()), source })?;
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_token_is_known_by_its_name_and_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let token = Tokens::create(&path, "sensor-1").unwrap();
        assert!(token.starts_with(PREFIX) && token.len() > 40, "{token}");
        let other = Tokens::create(&path, "relay.a").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token[PREFIX.len()..]), "the token itself is not stored");
        let tokens = Tokens::load(&path).unwrap();
        assert_eq!(tokens.name_of(&token), Some("sensor-1"));
        assert_eq!(tokens.name_of(&other), Some("relay.a"));
        assert_eq!(tokens.name_of("tlt_guess"), None);
        let again = Tokens::create(&path, "sensor-1").unwrap_err().to_string();
        assert!(again.contains("sensor-1") && again.contains("revoke"), "{again}");
        let bad = Tokens::create(&path, "a b").unwrap_err().to_string();
        assert!(bad.contains("token name"), "{bad}");
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        Tokens::create(&path, "a").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Tokens::load(&path).unwrap_err().to_string();
        assert!(err.contains("644") && err.contains("chmod 600"), "{err}");
    }
}
