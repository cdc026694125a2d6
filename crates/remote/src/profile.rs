//! Credentials and settings from an AWS profile (`~/.aws/credentials`,
//! `~/.aws/config`), for what the environment does not give, as S3 tools
//! take them: `AWS_PROFILE` (default `default`), `AWS_SHARED_CREDENTIALS_FILE`
//! and `AWS_CONFIG_FILE` move the files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a profile sets (keys as in the files, lowercase).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Profile {
    pub values: HashMap<String, String>,
}

impl Profile {
    /// A value of the profile.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }
}

/// The `[section]` of an INI text: `key = value` lines, `#` and `;`
/// comments.
fn section(text: &str, want: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == want;
            continue;
        }
        if inside && let Some((k, v)) = line.split_once('=') {
            out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

fn home_file(var: &str, rel: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(rel)))
}

/// The profile named by `AWS_PROFILE` (or `default`): its credentials
/// file section, then its config file section (`[profile NAME]`, or
/// `[default]`) for what the first does not set. Missing files are fine.
pub fn load() -> Profile {
    let name = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let read = |p: Option<PathBuf>| p.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
    let creds = read(home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"));
    let config = read(home_file("AWS_CONFIG_FILE", ".aws/config"));
    from_texts(&name, &creds, &config)
}

fn from_texts(name: &str, creds: &str, config: &str) -> Profile {
    let mut values = section(creds, name);
    let config_section = if name == "default" {
        "default".to_string()
    } else {
        format!("profile {name}")
    };
    for (k, v) in section(config, &config_section) {
        values.entry(k).or_insert(v);
    }
    Profile { values }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_come_from_both_files() {
        let creds = "[default]\naws_access_key_id = A\naws_secret_access_key = S\n\n[vm]\n# a comment\naws_access_key_id=B\naws_secret_access_key = T \n";
        let config = "[default]\nregion = us-east-1\n[profile vm]\nregion = garage\nendpoint_url = http://127.0.0.1:3900\naws_access_key_id = ignored\n";
        let p = from_texts("vm", creds, config);
        assert_eq!(p.get("aws_access_key_id"), Some("B"));
        assert_eq!(p.get("aws_secret_access_key"), Some("T"));
        assert_eq!(p.get("region"), Some("garage"));
        assert_eq!(p.get("endpoint_url"), Some("http://127.0.0.1:3900"));
        let d = from_texts("default", creds, config);
        assert_eq!(
            (d.get("aws_access_key_id"), d.get("region")),
            (Some("A"), Some("us-east-1"))
        );
        assert_eq!(from_texts("none", creds, config), Profile::default());
    }
}
