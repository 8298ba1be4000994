//! Who may call what on the admin API: API tokens with a role and a
//! namespace scope (`shoal token create|list|revoke`), and one rule per
//! route (the list is `crate::api::RULES`, made with the router from one
//! table, so no route goes without a rule).

use crate::error::ControlError;
use crate::nodes::random_secret;
use crate::state::{ControlPlane, encode};
use shoal_api::{CreatedToken, TokenRequest, TokenView};
use shoal_core::auth::{Credential, Role, constant_time_eq};
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::{ApiToken, EventType, Millis};
use shoal_store::{Op, Txn};

/// The name the admin token from the data dir acts under (in the audit log, events): no API
/// token may take it, or the log could not tell them apart.
const ADMIN: &str = "admin";

/// Whoever presented a valid token: the admin token from the data dir, or an
/// API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub name: String,
    pub role: Role,
    /// Where it may act; empty: every namespace.
    pub namespaces: Vec<String>,
}

impl Caller {
    pub(crate) fn admin() -> Caller {
        Caller {
            name: ADMIN.into(),
            role: Role::Admin,
            namespaces: Vec::new(),
        }
    }

    fn everywhere(&self) -> bool {
        self.namespaces.is_empty()
    }

    fn acts_in(&self, namespace: &str) -> bool {
        self.everywhere() || self.namespaces.iter().any(|n| n == namespace)
    }

    /// Refuses an app in a namespace out of this caller's scope.
    pub(crate) fn check_namespace(&self, namespace: &str) -> Result<(), String> {
        if self.acts_in(namespace) {
            Ok(())
        } else {
            Err(format!(
                "token {} acts in namespaces {}, not {namespace}",
                self.name,
                self.namespaces.join(", ")
            ))
        }
    }
}

/// What namespace a route acts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The whole cluster (nodes, tokens): tokens limited to namespaces may not.
    Cluster,
    /// Content-addressed modules, shared by every namespace.
    Shared,
    /// `?namespace=`, `default` when absent.
    Namespace,
    /// `?namespace=`, every namespace when absent: tokens limited to
    /// namespaces must name one of theirs.
    NamespaceOrAll,
    /// The namespace of the app in the body: the handler checks it.
    Body,
    /// The path's `/v1/namespaces/{namespace}/…`, for routes whose query is not the API's
    /// (the proxy's belongs to the app).
    InPath,
}

/// One route's rule: the least role that may call it, and where it acts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rule {
    pub method: &'static str,
    pub path: &'static str,
    pub role: Role,
    pub scope: Scope,
}

/// The rule of `method` on the router's `path`, if it has one.
pub(crate) fn rule_for(method: &str, path: &str) -> Option<&'static Rule> {
    crate::api::RULES
        .iter()
        .find(|r| r.method == method && r.path == path)
}

/// Whether `caller` may call a route under `rule`, asking for `namespace`
/// (`?namespace=`, or the path's for [`Scope::InPath`], if given); the reason when not.
pub(crate) fn authorize(
    caller: &Caller,
    rule: &Rule,
    namespace: Option<&str>,
) -> Result<(), String> {
    if caller.role < rule.role {
        let a = |role: &Role| match role.to_string().starts_with(['a', 'e', 'i', 'o', 'u']) {
            true => format!("an {role}"),
            false => format!("a {role}"),
        };
        return Err(format!(
            "token {} is {}; this needs {}",
            caller.name,
            a(&caller.role),
            a(&rule.role)
        ));
    }
    match rule.scope {
        Scope::Shared | Scope::Body => Ok(()),
        Scope::Cluster if caller.everywhere() => Ok(()),
        Scope::Cluster => Err(format!(
            "token {} acts in namespaces {} only; this is cluster-wide",
            caller.name,
            caller.namespaces.join(", ")
        )),
        Scope::Namespace | Scope::InPath => {
            caller.check_namespace(namespace.unwrap_or(shoal_core::spec::DEFAULT_NAMESPACE))
        }
        Scope::NamespaceOrAll => match namespace {
            Some(ns) => caller.check_namespace(ns),
            None if caller.everywhere() => Ok(()),
            None => Err(format!(
                "token {} acts in namespaces {} only: name one (?namespace=, the CLI's -n)",
                caller.name,
                caller.namespaces.join(", ")
            )),
        },
    }
}

fn view(token: &ApiToken) -> TokenView {
    TokenView {
        name: token.name.clone(),
        role: token.role,
        namespaces: token.namespaces.clone(),
        created_at: token.created_at,
        expires_at: token.expires_at,
    }
}

/// Why a presented token is refused (401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No token of ours: unknown, revoked, or not a token at all.
    Invalid,
    /// Token `name`, which stopped working `ago` milliseconds since.
    Expired { name: String, ago: Millis },
}

impl Refused {
    pub(crate) fn message(&self) -> String {
        match self {
            Refused::Invalid => "invalid token".into(),
            Refused::Expired { name, ago } => format!(
                "token {name} expired {} ago; an admin can make a new one (`shoal token create`)",
                shoal_core::quantity::format_duration_ms(ago / 1000 * 1000)
            ),
        }
    }
}

/// The longest life a token may be given: ten years.
const MAX_TOKEN_LIFE_SECONDS: u64 = 10 * 366 * 86_400;

impl ControlPlane {
    /// Whether `bearer` is the admin token: a comparison in memory, so callers make it
    /// before [`ControlPlane::authenticate`]'s store read, which must run off the executor.
    pub(crate) fn is_admin_token(&self, bearer: &str) -> bool {
        constant_time_eq(bearer.as_bytes(), self.config().token.as_bytes())
    }

    /// Who presented `bearer`: the admin token, or an API token neither revoked nor expired.
    pub(crate) fn authenticate(
        &self,
        bearer: &str,
    ) -> Result<Result<Caller, Refused>, ControlError> {
        if self.is_admin_token(bearer) {
            return Ok(Ok(Caller::admin()));
        }
        let Some(credential) = Credential::parse(bearer) else {
            return Ok(Err(Refused::Invalid));
        };
        let Some((token, _)) = self
            .get::<ApiToken>(&keys::token(&credential.id))?
            .filter(|(token, _)| credential.matches(&token.hash))
        else {
            return Ok(Err(Refused::Invalid));
        };
        let now = self.now();
        if let Some(at) = token.expires_at.filter(|at| *at <= now) {
            return Ok(Err(Refused::Expired {
                name: token.name,
                ago: now - at,
            }));
        }
        Ok(Ok(Caller {
            name: token.name,
            role: token.role,
            namespaces: token.namespaces,
        }))
    }

    /// A new API token; its secret is in the answer and nowhere else.
    pub fn create_token(&self, req: TokenRequest) -> Result<CreatedToken, ControlError> {
        let invalid = |m: String| ControlError::invalid(ErrorCode::BadRequest, m);
        shoal_core::validate_name(&req.name).map_err(|e| invalid(format!("token name: {e}")))?;
        if req.name == ADMIN {
            return Err(invalid(format!(
                "token name {ADMIN} is the admin token's (the data dir's), as the audit log names it: choose another"
            )));
        }
        for ns in &req.namespaces {
            shoal_core::validate_name(ns).map_err(|e| invalid(format!("namespace {ns:?}: {e}")))?;
        }
        let life = match req.expires_in_seconds {
            Some(0) => return Err(invalid("a token's life must be at least 1 second".into())),
            Some(s) if s > MAX_TOKEN_LIFE_SECONDS => {
                return Err(invalid(format!(
                    "a token's life may be at most ten years ({MAX_TOKEN_LIFE_SECONDS} seconds), not {s}"
                )));
            }
            life => life.map(|s| s * 1000),
        };
        let mut namespaces = req.namespaces;
        namespaces.sort();
        namespaces.dedup();
        let credential = Credential::new(&req.name, &random_secret()?);
        let now = self.now();
        let token = ApiToken {
            name: req.name.clone(),
            role: req.role,
            namespaces,
            hash: credential.hash(),
            created_at: now,
            expires_at: life.map(|ms| now + ms),
        };
        let mut scope = if token.namespaces.is_empty() {
            "every namespace".to_string()
        } else {
            format!("namespaces {}", token.namespaces.join(", "))
        };
        if let Some(ms) = life {
            scope.push_str(&format!(
                ", expires in {}",
                shoal_core::quantity::format_duration_ms(ms)
            ));
        }
        let txn = Txn::new()
            .when_absent(keys::token(&req.name))
            .then(Op::put(keys::token(&req.name), encode(&token)))
            .then(self.event_op(
                EventType::Normal,
                "TokenCreated",
                format!("token/{}", req.name),
                None,
                format!("token {} created: {} in {scope}", req.name, token.role),
            ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "token {} exists; revoke it first or pick another name",
                req.name
            )));
        }
        Ok(CreatedToken {
            view: view(&token),
            token: credential.expose(),
        })
    }

    pub fn tokens(&self) -> Result<Vec<TokenView>, ControlError> {
        Ok(self
            .list::<ApiToken>(&keys::TOKENS)?
            .iter()
            .map(view)
            .collect())
    }

    /// Revokes a token: the next request carrying it is refused.
    pub fn revoke_token(&self, name: &str) -> Result<(), ControlError> {
        let Some((_, at)) = self.get(&keys::token(name))? else {
            return Err(ControlError::not_found(format!(
                "token {name} does not exist"
            )));
        };
        let txn = Txn::new()
            .when_mod_revision(keys::token(name), at)
            .then(Op::delete(keys::token(name)))
            .then(self.event_op(
                EventType::Normal,
                "TokenRevoked",
                format!("token/{name}"),
                None,
                format!("token {name} revoked"),
            ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::conflict(format!(
                "token {name} changed meanwhile; try again"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::{Admin, Deployer, Viewer};

    fn caller(role: Role, namespaces: &[&str]) -> Caller {
        Caller {
            name: "t".into(),
            role,
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_role_opens_its_routes_and_those_of_the_roles_below() {
        let apply = rule_for("POST", "/v1/apps").unwrap();
        let read = rule_for("GET", "/v1/apps/{name}").unwrap();
        let drain = rule_for("POST", "/v1/nodes/{name}/{action}").unwrap();
        let viewer = caller(Viewer, &[]);
        let deployer = caller(Deployer, &[]);
        assert!(authorize(&viewer, read, None).is_ok());
        assert!(
            authorize(&viewer, apply, None)
                .unwrap_err()
                .contains("needs a deployer")
        );
        assert!(authorize(&deployer, apply, None).is_ok());
        assert!(authorize(&deployer, drain, None).is_err());
        assert!(authorize(&caller(Admin, &[]), drain, None).is_ok());
    }

    #[test]
    fn a_namespaced_token_acts_in_its_namespaces_only() {
        let team = caller(Admin, &["team-a"]);
        let read = rule_for("GET", "/v1/apps/{name}").unwrap();
        let list = rule_for("GET", "/v1/apps").unwrap();
        let nodes = rule_for("GET", "/v1/nodes").unwrap();
        let upload = rule_for("POST", "/v1/modules").unwrap();
        assert!(authorize(&team, read, Some("team-a")).is_ok());
        assert!(authorize(&team, read, Some("team-b")).is_err());
        assert!(authorize(&team, read, None).is_err(), "absent is `default`");
        assert!(authorize(&team, list, Some("team-a")).is_ok());
        assert!(
            authorize(&team, list, None)
                .unwrap_err()
                .contains("?namespace=")
        );
        assert!(
            authorize(&team, nodes, None)
                .unwrap_err()
                .contains("cluster-wide")
        );
        assert!(authorize(&team, upload, None).is_ok(), "modules are shared");
        assert!(team.check_namespace("team-b").is_err());
    }

    /// A token made to expire works until then, and is refused after, saying why; one made
    /// without a life works on. A life of nothing, or past ten years, is refused.
    #[test]
    fn a_token_with_a_life_is_refused_once_it_is_over_and_says_so() {
        use std::sync::Arc;
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(crate::state::tests::SetClock(1_000_000.into()));
        let cp = ControlPlane::with_clock(
            Arc::new(shoal_store::Store::open(&dir.path().join("state.redb")).unwrap()),
            shoal_store::BlobStore::open(&dir.path().join("modules")).unwrap(),
            crate::ControlConfig::default(),
            clock.clone(),
        )
        .unwrap();
        let token = |name: &str, life: Option<u64>| {
            cp.create_token(TokenRequest {
                name: name.into(),
                role: Deployer,
                namespaces: Vec::new(),
                expires_in_seconds: life,
            })
        };
        let short = token("ci", Some(60)).unwrap();
        let long = token("ops", None).unwrap();
        assert_eq!(short.view.expires_at, Some(1_060_000));
        assert_eq!(long.view.expires_at, None);
        let caller = |t: &CreatedToken| cp.authenticate(&t.token).unwrap();
        clock.0.store(1_059_999, SeqCst);
        assert_eq!(caller(&short).unwrap().name, "ci");
        clock.0.store(1_062_500, SeqCst);
        let refused = caller(&short).unwrap_err();
        assert_eq!(
            refused,
            Refused::Expired {
                name: "ci".into(),
                ago: 2_500
            }
        );
        assert!(refused.message().starts_with("token ci expired 2s ago"));
        assert_eq!(caller(&long).unwrap().name, "ops");
        assert_eq!(
            cp.authenticate("shoal_nope.nope").unwrap(),
            Err(Refused::Invalid)
        );
        for life in [0, MAX_TOKEN_LIFE_SECONDS + 1] {
            let refused = token("bad", Some(life)).err().unwrap().to_string();
            assert!(refused.contains("life"), "{refused}");
        }
    }

    #[test]
    fn every_rule_is_one_of_a_kind() {
        let rules = crate::api::RULES;
        for (i, a) in rules.iter().enumerate() {
            for b in &rules[i + 1..] {
                assert!((a.method, a.path) != (b.method, b.path), "{a:?}");
            }
        }
    }
}
