//! `s3://BUCKET/PREFIX`: where a remote store lives.

use crate::error::{RemoteError, Result};

/// A remote store: a bucket and a key prefix (no leading or trailing `/`;
/// empty for the bucket's root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    pub bucket: String,
    pub prefix: String,
}

impl RemoteUrl {
    /// Whether `s` names a remote store rather than a local directory.
    pub fn is_remote(s: &str) -> bool {
        s.starts_with("s3://")
    }

    /// Parse `s3://BUCKET[/PREFIX]`.
    pub fn parse(s: &str) -> Result<RemoteUrl> {
        let bad = |why| RemoteError::Url { url: s.into(), why };
        let rest = s.strip_prefix("s3://").ok_or_else(|| bad("only s3:// is supported"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // Bucket names: 3 to 63 lowercase letters, digits, dots and hyphens.
        if !(3..=63).contains(&bucket.len())
            || !bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        {
            return Err(bad(
                "the bucket name must be 3 to 63 lowercase letters, digits, dots or hyphens",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || prefix.bytes().any(|c| c.is_ascii_control())
        {
            return Err(bad("the prefix has an empty, '.' or '..' part, or a control character"));
        }
        Ok(RemoteUrl {
            bucket: bucket.into(),
            prefix: prefix.into(),
        })
    }

    /// The key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.into()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }
}

impl std::fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print_back() {
        let u = RemoteUrl::parse("s3://consnap-test/vm1/store/").unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("consnap-test", "vm1/store"));
        assert_eq!(u.to_string(), "s3://consnap-test/vm1/store");
        assert_eq!(u.key("MANIFEST"), "vm1/store/MANIFEST");
        let root = RemoteUrl::parse("s3://bucket").unwrap();
        assert_eq!(root.key("MANIFEST"), "MANIFEST");
        assert_eq!(root.to_string(), "s3://bucket");
        for bad in [
            "http://b/x",
            "s3://",
            "s3://ab",
            "s3://Upper/x",
            "s3://b_b/x",
            "s3://bucket/a//b",
            "s3://bucket/../x",
            "s3://bucket/a/./b",
        ] {
            let e = RemoteUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("s3://BUCKET/PREFIX"), "{bad}: {e}");
        }
        assert!(RemoteUrl::is_remote("s3://b/x") && !RemoteUrl::is_remote("/var/snaps"));
    }
}
