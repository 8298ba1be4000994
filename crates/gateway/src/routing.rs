//! Host and longest-prefix path matching. Pure, rebuilt whole on every route
//! change and swapped in, so lookups never take a lock that writers hold long.

use shoal_core::{Route, spec::AppKey};
use std::collections::{HashMap, HashSet};

/// Routes indexed by host and path, so a lookup costs a few hash probes (one
/// per segment of the request's path), however many apps the node serves.
#[derive(Debug, Default, Clone)]
pub struct RoutingTable {
    /// Host-bound routes: (lowercase host, path) → (route, app).
    hosted: HashMap<(String, String), (Route, AppKey)>,
    /// Routes for any host: path → (route, app).
    any_host: HashMap<String, (Route, AppKey)>,
    apps: HashSet<AppKey>,
}

impl RoutingTable {
    /// Of two routes claiming the same host and path (the control plane
    /// refuses that), the first in sort order is kept.
    pub fn new(mut routes: Vec<(Route, AppKey)>) -> Self {
        routes.sort();
        let mut table = RoutingTable::default();
        for (route, app) in routes {
            table.apps.insert(app.clone());
            match &route.host {
                Some(host) => {
                    let key = (host.to_ascii_lowercase(), route.path.clone());
                    table.hosted.entry(key).or_insert((route, app));
                }
                None => {
                    let key = route.path.clone();
                    table.any_host.entry(key).or_insert((route, app));
                }
            }
        }
        table
    }

    /// The route serving `path` on `host`: a route bound to the host before
    /// one for any host, then the longest path prefix on segment boundaries.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<(&Route, &AppKey)> {
        let found = match host {
            Some(h) if !self.hosted.is_empty() => {
                let h = h.to_ascii_lowercase();
                prefixes(path).find_map(|p| self.hosted.get(&(h.clone(), p.to_string())))
            }
            _ => None,
        };
        found
            .or_else(|| prefixes(path).find_map(|p| self.any_host.get(p)))
            .map(|(r, k)| (r, k))
    }

    pub fn serves(&self, app: &AppKey) -> bool {
        self.apps.contains(app)
    }

    pub fn len(&self) -> usize {
        self.hosted.len() + self.any_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The prefixes of `path` a route may be, longest first: the path itself,
/// then cut at each `/` (`/a/b/c`, `/a/b`, `/a`), then `/`.
fn prefixes(path: &str) -> impl Iterator<Item = &str> {
    let cuts = path
        .char_indices()
        .rev()
        .filter(|&(i, c)| c == '/' && i > 0)
        .map(move |(i, _)| &path[..i]);
    std::iter::once(path)
        .filter(|p| *p != "/")
        .chain(cuts)
        .chain(std::iter::once("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &str)]) -> RoutingTable {
        RoutingTable::new(
            routes
                .iter()
                .map(|(r, app)| (Route::parse(r).unwrap(), AppKey::new("default", app)))
                .collect(),
        )
    }

    fn app<'a>(t: &'a RoutingTable, host: Option<&str>, path: &str) -> Option<&'a str> {
        t.lookup(host, path).map(|(_, k)| k.name.as_str())
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = table(&[("/", "root"), ("/api", "api"), ("/api/v2", "v2")]);
        assert_eq!(app(&t, None, "/api/v2/x"), Some("v2"));
        assert_eq!(app(&t, None, "/api/v2"), Some("v2"));
        assert_eq!(app(&t, None, "/api/v1"), Some("api"));
        assert_eq!(app(&t, None, "/apiary"), Some("root"));
        assert_eq!(app(&t, None, "/"), Some("root"));
    }

    #[test]
    fn unknown_path_has_no_route() {
        let t = table(&[("/hello", "hello")]);
        assert_eq!(app(&t, None, "/nope"), None);
        assert_eq!(app(&t, None, "/hellox"), None);
        assert_eq!(app(&t, Some("x.com"), "/hello/a"), Some("hello"));
    }

    #[test]
    fn host_routes_win_and_only_match_their_host() {
        let t = table(&[("/", "any"), ("shop.example.com/", "shop")]);
        assert_eq!(app(&t, Some("shop.example.com"), "/cart"), Some("shop"));
        assert_eq!(app(&t, Some("SHOP.example.com"), "/cart"), Some("shop"));
        assert_eq!(app(&t, Some("other.com"), "/cart"), Some("any"));
        assert_eq!(app(&t, None, "/cart"), Some("any"));
        // A route bound to the host wins over a longer one for any host.
        let t = table(&[("/api/v2", "v2"), ("shop.example.com/", "shop")]);
        assert_eq!(app(&t, Some("shop.example.com"), "/api/v2/x"), Some("shop"));
        assert_eq!(app(&t, Some("other.com"), "/api/v2/x"), Some("v2"));
    }

    #[test]
    fn trailing_slashes_and_many_apps() {
        let mut routes: Vec<(String, String)> = (0..10_000)
            .map(|i| (format!("/app{i}"), format!("a{i}")))
            .collect();
        routes.push(("/app7/deep/er".into(), "deep".into()));
        let t = RoutingTable::new(
            routes
                .iter()
                .map(|(r, a)| (Route::parse(r).unwrap(), AppKey::new("default", a)))
                .collect(),
        );
        assert_eq!(t.len(), 10_001);
        assert_eq!(app(&t, None, "/app9999/"), Some("a9999"));
        assert_eq!(app(&t, None, "/app7/deep/er/x"), Some("deep"));
        assert_eq!(app(&t, None, "/app7/deep"), Some("a7"));
        assert_eq!(app(&t, None, "/app10000"), None);
        assert!(t.serves(&AppKey::new("default", "a42")));
        assert!(!t.serves(&AppKey::new("default", "b")));
    }
}
