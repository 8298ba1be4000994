//! Host and longest-prefix path matching. Pure; one app's routes can be
//! replaced in place (the gateway does so under its routing lock), so a route
//! change costs that app's routes, not every app's.

use shoal_core::Route;
use shoal_core::spec::{AppKey, path_prefixes};
use std::collections::HashMap;

/// Routes indexed by host and path, so a lookup costs a few hash probes (one
/// per segment of the request's path), however many apps the node serves.
#[derive(Debug, Default, Clone)]
pub struct RoutingTable {
    /// Host-bound routes: (lowercase host, path) → who claims it, in sort order.
    hosted: HashMap<(String, String), Claims>,
    /// Routes for any host: path → who claims it, in sort order.
    any_host: HashMap<String, Claims>,
    /// The namespaces binding each host (lowercase), with how many routes each binds it by:
    /// a bound host's requests go to no other namespace's any-host route.
    bound: HashMap<String, HashMap<String, usize>>,
    /// Each app's routes, so they can be taken out again.
    apps: HashMap<AppKey, Vec<Route>>,
}

/// The apps claiming one host and path, sorted; the first serves it. More than
/// one only for a moment (the control plane refuses a route already taken).
type Claims = Vec<(Route, AppKey)>;

impl RoutingTable {
    /// Of two routes claiming the same host and path (the control plane
    /// refuses that), the first in sort order is kept.
    pub fn new(routes: Vec<(Route, AppKey)>) -> Self {
        let mut table = RoutingTable::default();
        for (route, app) in routes {
            table.claim(route.clone(), app.clone());
            table.apps.entry(app).or_default().push(route);
        }
        table
    }

    /// Replaces the routes `app` serves (none: it serves nothing any more),
    /// keeping every other app's. Claims resolve as in [`RoutingTable::new`].
    pub fn set_app(&mut self, app: &AppKey, routes: Vec<Route>) {
        for route in self.apps.remove(app).unwrap_or_default() {
            self.unclaim(&route, app);
        }
        if routes.is_empty() {
            return;
        }
        for route in &routes {
            self.claim(route.clone(), app.clone());
        }
        self.apps.insert(app.clone(), routes);
    }

    fn claim(&mut self, route: Route, app: AppKey) {
        let claims = match &route.host {
            Some(host) => {
                let host = host.to_ascii_lowercase();
                *self
                    .bound
                    .entry(host.clone())
                    .or_default()
                    .entry(app.namespace.clone())
                    .or_default() += 1;
                self.hosted.entry((host, route.path.clone())).or_default()
            }
            None => self.any_host.entry(route.path.clone()).or_default(),
        };
        let claim = (route, app);
        if let Err(at) = claims.binary_search(&claim) {
            claims.insert(at, claim);
        }
    }

    fn unclaim(&mut self, route: &Route, app: &AppKey) {
        let keep = |claims: &mut Claims| {
            claims.retain(|(_, a)| a != app);
            !claims.is_empty()
        };
        match &route.host {
            Some(host) => {
                let key = (host.to_ascii_lowercase(), route.path.clone());
                if let Some(claims) = self.hosted.get_mut(&key)
                    && !keep(claims)
                {
                    self.hosted.remove(&key);
                }
                if let Some(owners) = self.bound.get_mut(&key.0) {
                    if let Some(n) = owners.get_mut(&app.namespace) {
                        *n -= 1;
                        if *n == 0 {
                            owners.remove(&app.namespace);
                        }
                    }
                    if owners.is_empty() {
                        self.bound.remove(&key.0);
                    }
                }
            }
            None => {
                if let Some(claims) = self.any_host.get_mut(&route.path)
                    && !keep(claims)
                {
                    self.any_host.remove(&route.path);
                }
            }
        }
    }

    /// The route serving `path` on `host`: a route bound to the host before
    /// one for any host, then the longest path prefix on segment boundaries. A host
    /// that routes bind is their namespaces': of the routes for any host, only theirs
    /// serve it, so another tenant's catch-all never answers on it.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<(&Route, &AppKey)> {
        let (found, owners) = match host {
            Some(h) if !self.hosted.is_empty() => {
                let h = h.to_ascii_lowercase();
                let found = path_prefixes(path)
                    .find_map(|p| self.hosted.get(&(h.clone(), p.to_string())))
                    .and_then(|claims| claims.first());
                (found, self.bound.get(&h))
            }
            _ => (None, None),
        };
        found
            .or_else(|| {
                path_prefixes(path).find_map(|p| {
                    self.any_host.get(p)?.iter().find(|(_, app)| {
                        owners.is_none_or(|owners| owners.contains_key(&app.namespace))
                    })
                })
            })
            .map(|(r, k)| (r, k))
    }

    pub fn serves(&self, app: &AppKey) -> bool {
        self.apps.contains_key(app)
    }

    pub fn len(&self) -> usize {
        self.hosted.len() + self.any_host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `path` has a `.` or `..` segment, plain or percent-encoded. Routes match
/// prefixes of the path as sent, so `/a/../b` would reach `/a`'s app, which might resolve it
/// to `/b`; a client resolves those before it sends (RFC 3986, 5.2.4), so the gateway
/// refuses them rather than guess.
pub(crate) fn has_dot_segment(path: &str) -> bool {
    path.split('/')
        .any(|segment| matches!(dots(segment.as_bytes()), Some(1 | 2)))
}

/// How many dots `segment` is made of, each `.` or `%2e` (either case); `None` if anything
/// else is in it. Byte by byte: this runs on every request.
fn dots(mut segment: &[u8]) -> Option<usize> {
    let mut n = 0;
    while !segment.is_empty() {
        segment = match segment {
            [b'.', rest @ ..] => rest,
            [b'%', b'2', b'e' | b'E', rest @ ..] => rest,
            _ => return None,
        };
        n += 1;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_plain_or_encoded_are_found_and_dots_in_names_are_not() {
        for path in [
            "/a/../b",
            "/a/./b",
            "/a/..",
            "/%2e%2e/x",
            "/a/%2E/b",
            "/a/.%2e",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/",
            "/a/b",
            "/a/.well-known",
            "/v1.2/x",
            "/a/...",
            "/a/%2e%2e%2e",
            "/a..b",
            "/a/%2e%2f",
            "/a/%2",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

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
    fn a_bound_host_is_served_by_its_namespaces_apps_only() {
        let team = |ns: &str, app: &str| AppKey::new(ns, app);
        let route = |r: &str| Route::parse(r).unwrap();
        let mut t = RoutingTable::new(vec![
            (route("/"), team("team-a", "catch-all")),
            (route("shop.test/x"), team("team-b", "shop")),
            (route("/health"), team("team-b", "health")),
        ]);
        assert_eq!(app(&t, Some("shop.test"), "/x/1"), Some("shop"));
        assert_eq!(app(&t, Some("SHOP.test"), "/y"), None, "not team-a's");
        assert_eq!(app(&t, Some("shop.test"), "/"), None);
        assert_eq!(app(&t, Some("shop.test"), "/health"), Some("health"));
        assert_eq!(app(&t, Some("other.test"), "/y"), Some("catch-all"));
        assert_eq!(app(&t, None, "/y"), Some("catch-all"));
        // Once team-b binds the host no more, it is anyone's again.
        t.set_app(&team("team-b", "shop"), vec![route("/shop")]);
        assert_eq!(app(&t, Some("shop.test"), "/y"), Some("catch-all"));
        assert!(t.bound.is_empty());
    }

    #[test]
    fn one_apps_routes_are_replaced_in_place() {
        let mut t = table(&[("/a", "a"), ("/b", "b"), ("shop.example.com/", "shop")]);
        let shop = AppKey::new("default", "shop");
        t.set_app(&shop, vec![Route::parse("/shop").unwrap()]);
        assert_eq!(app(&t, Some("shop.example.com"), "/cart"), None);
        assert_eq!(app(&t, None, "/shop/cart"), Some("shop"));
        assert_eq!(app(&t, None, "/a"), Some("a"), "other apps keep theirs");
        t.set_app(&AppKey::new("default", "a"), vec![]);
        assert_eq!(app(&t, None, "/a"), None);
        assert!(!t.serves(&AppKey::new("default", "a")));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_route_claimed_twice_goes_to_the_first_claimant_left() {
        let mut t = table(&[("/x", "b"), ("/x", "a")]);
        assert_eq!(
            app(&t, None, "/x"),
            Some("a"),
            "first in sort order, as new() does"
        );
        t.set_app(&AppKey::new("default", "a"), vec![]);
        assert_eq!(app(&t, None, "/x"), Some("b"));
        t.set_app(
            &AppKey::new("default", "a"),
            vec![Route::parse("/x").unwrap()],
        );
        assert_eq!(app(&t, None, "/x"), Some("a"));
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
