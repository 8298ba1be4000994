//! OCI references to Wasm components (`registry.example.com/team/hello:1.2.0`,
//! or `…@sha256:…`), parsed here so the CLI and the control plane refuse the
//! same ones before anything talks to a registry.

use std::fmt;

/// A component in an OCI registry: always with its registry host (there is no
/// implicit Docker Hub, so a reference means the same thing everywhere), and a
/// tag or a digest (no implicit `latest`: what an apply pins must be written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    /// `host` or `host:port`.
    pub registry: String,
    /// `team/hello`.
    pub repository: String,
    pub tag: Option<String>,
    /// A manifest digest, `sha256:<hex>`.
    pub digest: Option<String>,
}

impl OciRef {
    /// Parses `reference`, with the reason as the message.
    pub fn parse(reference: &str) -> Result<OciRef, String> {
        let (name, digest) = match reference.split_once('@') {
            Some((name, d)) => {
                d.parse::<crate::Digest>()
                    .map_err(|e| format!("{reference:?}: the part after @ is not a digest: {e}"))?;
                (name, Some(d.to_string()))
            }
            None => (reference, None),
        };
        let Some((registry, rest)) = name.split_once('/') else {
            return Err(format!(
                "{reference:?} names no registry: write it in full, as registry.example.com/team/hello:1.0"
            ));
        };
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(format!(
                "{reference:?}: {registry:?} is not a registry host (one with a dot or a port, or localhost): write the reference in full, as registry.example.com/team/hello:1.0"
            ));
        }
        if !registry
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err(format!(
                "{reference:?}: {registry:?} is not a registry host"
            ));
        }
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repo, tag)) => (repo, Some(tag.to_string())),
            None => (rest, None),
        };
        if let Some(tag) = &tag
            && !valid_tag(tag)
        {
            return Err(format!(
                "{reference:?}: {tag:?} is not a tag (letters, digits, `_`, `.` and `-`, at most 128, not starting with `.` or `-`)"
            ));
        }
        if !valid_repository(repository) {
            return Err(format!(
                "{reference:?}: {repository:?} is not a repository name (lowercase letters and digits, separated by `/`, `.`, `_` or `-`)"
            ));
        }
        if tag.is_none() && digest.is_none() {
            return Err(format!(
                "{reference:?} has neither a tag nor a digest: add one (:1.0 or @sha256:…), the version an apply pins must be written"
            ));
        }
        Ok(OciRef {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// The registry's host without its port.
    pub fn host(&self) -> &str {
        let r = self.registry.as_str();
        if let Some(end) = r.strip_prefix('[').and_then(|s| s.find(']')) {
            return &r[1..=end];
        }
        r.rsplit_once(':').map_or(r, |(h, _)| h)
    }

    /// Whether the registry is this machine's: those speak plain HTTP (a registry
    /// started for a test or a build has no certificate), everything else HTTPS.
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn valid_tag(tag: &str) -> bool {
    let mut chars = tag.chars();
    tag.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|part| {
            let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
            part.starts_with(alnum)
                && part.ends_with(alnum)
                && part
                    .chars()
                    .all(|c| alnum(c) || matches!(c, '.' | '_' | '-'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex() -> String {
        "a".repeat(64)
    }

    #[test]
    fn tag_and_digest_forms() {
        let r = OciRef::parse("registry.example.com/team/hello:1.2.0").unwrap();
        assert_eq!(r.registry, "registry.example.com");
        assert_eq!(r.repository, "team/hello");
        assert_eq!(r.tag.as_deref(), Some("1.2.0"));
        assert_eq!(r.digest, None);
        assert!(!r.is_loopback());

        let s = format!("127.0.0.1:5000/hello@sha256:{}", hex());
        let r = OciRef::parse(&s).unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.host(), "127.0.0.1");
        assert_eq!(r.tag, None);
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), s);

        let both = format!("localhost:5000/a/b:v1@sha256:{}", hex());
        let r = OciRef::parse(&both).unwrap();
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), both);

        assert!(OciRef::parse("[::1]:5000/x:1").unwrap().is_loopback());
        assert!(!OciRef::parse("10.0.0.1:5000/x:1").unwrap().is_loopback());
    }

    #[test]
    fn refused_forms_say_why() {
        for (bad, says) in [
            ("hello:1.0", "names no registry"),
            ("team/hello:1.0", "is not a registry host"),
            ("r.example.com/team/hello", "neither a tag nor a digest"),
            ("r.example.com/Team/hello:1", "not a repository name"),
            ("r.example.com/team//hello:1", "not a repository name"),
            ("r.example.com/hello:-x", "is not a tag"),
            ("r.example.com/hello@sha256:zz", "not a digest"),
            ("r.exa mple.com/hello:1", "is not a registry host"),
        ] {
            let e = OciRef::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
