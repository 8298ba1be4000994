//! [`Servers`]: the API servers of one cluster that a client may call, and which one it calls
//! now. Several `shoal server`s on one etcd store serve the same API, so a node or the CLI
//! given all of them goes on when one dies, as etcd's clients and Nomad's (`servers = […]`)
//! do.

use reqwest::Url;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// The response header in which a server of a shared store names every server running there
/// (its heartbeat answers carry it), comma-separated: a node given one of them learns the
/// others, as Nomad's clients learn the servers from their heartbeats.
pub const SERVERS_HEADER: &str = "x-shoal-servers";

/// One cluster's API servers, in the order given, and the one calls go to now. Clones share
/// that choice: once a call finds the current server gone, every other call moves on too.
/// They share the list too, which only grows ([`Servers::learn`]): a server's position in
/// it never changes.
#[derive(Clone)]
pub struct Servers {
    urls: Arc<RwLock<Arc<[String]>>>,
    current: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers")
            .field("urls", &self.urls())
            .field("current", &self.index())
            .finish()
    }
}

/// Why a list of server URLs was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServersError {
    #[error("no server URL given")]
    Empty,
    #[error("{url:?} is not a server URL: {why}")]
    Invalid { url: String, why: String },
    #[error("{0} is given twice")]
    Duplicate(String),
}

impl Servers {
    /// `URL[,URL…]`: the URLs of one cluster's servers, `http://` or `https://`, each with a
    /// host and nothing after its path; spaces around the commas are ignored. Each is kept
    /// normalised (host in lower case, default port and trailing `/` dropped), so that one
    /// server is never listed twice under two spellings and requests built from it start with
    /// it as written here.
    pub fn parse(text: &str) -> Result<Servers, ServersError> {
        let mut urls: Vec<String> = Vec::new();
        for given in text.split(',').map(str::trim) {
            if given.is_empty() {
                return Err(if text.trim().is_empty() {
                    ServersError::Empty
                } else {
                    invalid(given, "an empty entry between commas")
                });
            }
            let url = normalised(given)?;
            if urls.contains(&url) {
                return Err(ServersError::Duplicate(url));
            }
            urls.push(url);
        }
        Ok(Servers {
            urls: Arc::new(RwLock::new(urls.into())),
            current: Arc::default(),
        })
    }

    /// Adds the servers of `text` (as a [`SERVERS_HEADER`] says them) not listed yet, after
    /// the others, and returns them. Entries that are not server URLs are passed over: a list
    /// a server sent is no reason to stop.
    pub fn learn(&self, text: &str) -> Vec<String> {
        let told: Vec<String> = text
            .split(',')
            .filter_map(|u| normalised(u.trim()).ok())
            .collect();
        // Most heartbeats tell what is known already: the write lock only when not.
        let known = self.urls();
        if told.iter().all(|u| known.contains(u)) {
            return Vec::new();
        }
        let mut urls = self.urls.write().unwrap_or_else(PoisonError::into_inner);
        let mut grown = urls.to_vec();
        let mut new = Vec::new();
        for url in told {
            if !grown.contains(&url) {
                grown.push(url.clone());
                new.push(url);
            }
        }
        *urls = grown.into();
        new
    }

    /// Every server, in the order given, then those learnt.
    pub fn urls(&self) -> Arc<[String]> {
        Arc::clone(&self.urls.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The server calls go to now.
    pub fn current(&self) -> String {
        let urls = self.urls();
        urls[self.current.load(Ordering::Relaxed) % urls.len()].clone()
    }

    /// The position of the server calls go to now, in [`Servers::urls`].
    pub fn index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.len()
    }

    fn len(&self) -> usize {
        self.urls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Server `i`, as given.
    pub(crate) fn url(&self, i: usize) -> String {
        self.urls()[i].clone()
    }

    /// The servers a call starting at server `first` tries, each once: that one, then the
    /// ones after it, round robin.
    pub(crate) fn order(&self, first: usize) -> impl Iterator<Item = usize> + use<> {
        let n = self.len();
        (first..first + n).map(move |i| i % n)
    }

    /// Server `i` failed a call: calls go to the one after it from now on, unless another
    /// call has already moved them off it (so two calls failing at once skip one server, not
    /// two). Whether this call moved them.
    pub fn failed(&self, i: usize) -> bool {
        let next = (i + 1) % self.len();
        next != i
            && self
                .current
                .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Which server a request's `url` was made for, or an answer came from: the one it
    /// starts with (the longest, so `https://a:1` is not taken for `https://a:10`).
    pub fn of(&self, url: &str) -> Option<usize> {
        self.urls()
            .iter()
            .enumerate()
            .filter(|(_, base)| {
                url.strip_prefix(base.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?']))
            })
            .max_by_key(|(_, base)| base.len())
            .map(|(i, _)| i)
    }
}

impl std::fmt::Display for Servers {
    /// As [`Servers::parse`] reads them: comma-separated.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.urls().join(","))
    }
}

fn invalid(url: &str, why: &str) -> ServersError {
    ServersError::Invalid {
        url: url.to_string(),
        why: why.to_string(),
    }
}

/// `given` as a server URL, normalised as [`Servers::parse`] keeps it.
fn normalised(given: &str) -> Result<String, ServersError> {
    let url = Url::parse(given).map_err(|e| invalid(given, &e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(given, "the scheme is neither http nor https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(given, "it names no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(invalid(
            given,
            "a server URL has no query, fragment or user: scheme, host, port and path",
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_or_several_are_read_and_normalised() {
        let one = Servers::parse("https://127.0.0.1:7700/").unwrap();
        assert_eq!(*one.urls(), ["https://127.0.0.1:7700"]);
        let several =
            Servers::parse("https://CP-1.example.com:443 , http://10.0.0.2:7700,https://lb/shoal/")
                .unwrap();
        assert_eq!(
            *several.urls(),
            [
                "https://cp-1.example.com",
                "http://10.0.0.2:7700",
                "https://lb/shoal"
            ]
        );
        assert_eq!(several.to_string(), several.urls().join(","));
        assert_eq!(
            Servers::parse(&several.to_string()).unwrap().urls(),
            several.urls()
        );
    }

    #[test]
    fn bad_lists_are_refused_naming_the_entry() {
        assert_eq!(Servers::parse("").unwrap_err(), ServersError::Empty);
        assert_eq!(Servers::parse("  ").unwrap_err(), ServersError::Empty);
        for (text, entry) in [
            ("https://a:1,,https://b:1", ""),
            ("https://a:1,", ""),
            ("127.0.0.1:7700", "127.0.0.1:7700"),
            ("ftp://a:1", "ftp://a:1"),
            ("https://a:1/?x=1", "https://a:1/?x=1"),
            ("https://user@a:1", "https://user@a:1"),
        ] {
            match Servers::parse(text) {
                Err(ServersError::Invalid { url, .. }) => assert_eq!(url, entry, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert_eq!(
            Servers::parse("https://a:1,https://A:1/").unwrap_err(),
            ServersError::Duplicate("https://a:1".into())
        );
    }

    /// Servers told later are added after those given, normalised, once; clones share them,
    /// and what is not a server URL is passed over.
    #[test]
    fn servers_learnt_are_added_after_the_others_once() {
        let servers = Servers::parse("http://a:1,http://b:1").unwrap();
        let clone = servers.clone();
        servers.failed(0);
        assert_eq!(
            servers.learn("http://B:1/, http://c:1,ftp://d:1,,http://c:1,http://e:1"),
            ["http://c:1", "http://e:1"]
        );
        assert_eq!(
            *clone.urls(),
            ["http://a:1", "http://b:1", "http://c:1", "http://e:1"]
        );
        assert_eq!(clone.current(), "http://b:1", "where calls go stays");
        assert_eq!(clone.order(3).collect::<Vec<_>>(), [3, 0, 1, 2]);
        assert!(servers.learn("http://a:1").is_empty());
        assert_eq!(servers.urls().len(), 4);
    }

    #[test]
    fn calls_start_at_the_current_server_and_go_round_once() {
        let servers = Servers::parse("http://a:1,http://b:1,http://c:1").unwrap();
        assert_eq!(servers.current(), "http://a:1");
        assert_eq!(servers.order(0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(servers.order(2).collect::<Vec<_>>(), [2, 0, 1]);
        let one = Servers::parse("http://a:1").unwrap();
        assert_eq!(one.order(0).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn a_failed_server_hands_over_to_the_next_once_and_wraps_around() {
        let servers = Servers::parse("http://a:1,http://b:1,http://c:1").unwrap();
        let other = servers.clone();
        assert!(servers.failed(0));
        assert_eq!(other.current(), "http://b:1", "clones share the choice");
        // A second call that saw server 0 fail too moves nothing: b has not failed.
        assert!(!other.failed(0));
        assert_eq!(servers.current(), "http://b:1");
        assert!(servers.failed(1));
        assert!(servers.failed(2));
        assert_eq!(servers.current(), "http://a:1");
        // One server: it stays the one.
        let one = Servers::parse("http://a:1").unwrap();
        assert!(!one.failed(0));
        assert_eq!(one.current(), "http://a:1");
    }

    #[test]
    fn a_request_is_traced_to_the_server_it_was_made_for() {
        let servers = Servers::parse("https://a:1,https://a:10,https://lb/shoal").unwrap();
        assert_eq!(servers.of("https://a:10/v1/apps"), Some(1));
        assert_eq!(servers.of("https://a:1/v1/apps?namespace=x"), Some(0));
        assert_eq!(servers.of("https://lb/shoal/v1/apps"), Some(2));
        assert_eq!(servers.of("https://lb/shoalx/v1"), None);
        assert_eq!(servers.of("https://b:1/v1/apps"), None);
    }
}
