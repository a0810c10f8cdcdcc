//! Loading TOML config files. Errors name the file and, through toml's own messages, the line
//! and field that was wrong.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, flattened to one line.
        message: String,
    },
    /// The file parsed but a value is not acceptable.
    #[error("invalid config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
}

/// Reads and parses a TOML file into `T`. Unknown fields are rejected where `T` says
/// `#[serde(deny_unknown_fields)]`, which every rollgate config does.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(path, &text)
}

/// Parses TOML text that came from `path` (used for error messages only).
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: one_line(&e.to_string()),
    })
}

/// The longest name (server, pool, domain, coordinator id, version) anywhere in rollgate.
pub const MAX_NAME_LEN: usize = 128;

/// The longest operation id an agent accepts. A coordinator's ids are
/// `<plan id>/<server>/<direction>/<step>/<attempt>`, and a plan id is `<pool>-<start ms>`,
/// so the longest names must fit with room to spare: the agent used to cap ids at 128
/// characters while pool and server names could each be 128, and every step of a pool with
/// long names failed.
pub const MAX_OPERATION_ID_LEN: usize = 512;

// plan id (pool + '-' + up to 20 digits) + '/' + server + "/rst/rollback/" + u32 digits.
const _: () = assert!(MAX_NAME_LEN + 21 + 1 + MAX_NAME_LEN + 14 + 10 <= MAX_OPERATION_ID_LEN);

/// Checks an identifier (server, pool, domain, coordinator id): 1-128 letters, digits, '-',
/// '_' or '.', so that it is safe in store keys, SAN URIs and file names.
pub fn check_name(field: &str, v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= MAX_NAME_LEN
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field}: {v:?} must be 1-128 characters of letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Joins a multi-line message (toml draws a caret diagram) into one line for logs and exit errors.
pub fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
    }

    #[test]
    fn unknown_field_is_named_on_one_line() {
        let err = parse_toml::<Sample>(Path::new("x.toml"), "name = \"a\"\nnmae = \"b\"\n")
            .expect_err("unknown field must fail");
        let msg = err.to_string();
        assert!(msg.contains("x.toml"), "{msg}");
        assert!(msg.contains("nmae"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = load_toml::<Sample>(Path::new("/nonexistent/rollgate.toml"))
            .expect_err("missing file must fail");
        assert!(err.to_string().contains("/nonexistent/rollgate.toml"));
    }
}
