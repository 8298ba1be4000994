//! Host and longest-prefix path matching. Pure, rebuilt whole on every route
//! change and swapped in, so lookups never take a lock that writers hold long.

use shoal_core::{Route, spec::AppKey};

#[derive(Debug, Default, Clone)]
pub struct RoutingTable {
    /// Sorted: host-bound routes first, then longer paths first.
    routes: Vec<(Route, AppKey)>,
}

impl RoutingTable {
    pub fn new(mut routes: Vec<(Route, AppKey)>) -> Self {
        routes.sort_by(|(a, _), (b, _)| {
            b.host
                .is_some()
                .cmp(&a.host.is_some())
                .then(b.path.len().cmp(&a.path.len()))
                .then(a.cmp(b))
        });
        RoutingTable { routes }
    }

    /// The app serving `path` on `host` (`host` without port). A host-bound
    /// route wins over a host-less one; among those, the longest prefix wins,
    /// matching whole segments only (`/hello` serves `/hello/x`, not `/helloworld`).
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<(&Route, &AppKey)> {
        self.routes
            .iter()
            .find(|(r, _)| {
                let host_ok = match (&r.host, host) {
                    (None, _) => true,
                    (Some(rh), Some(h)) => rh.eq_ignore_ascii_case(h),
                    (Some(_), None) => false,
                };
                host_ok && prefix_matches(&r.path, path)
            })
            .map(|(r, k)| (r, k))
    }

    /// Whether any route leads to `app`.
    pub fn serves(&self, app: &AppKey) -> bool {
        self.routes.iter().any(|(_, k)| k == app)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
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
    }
}
