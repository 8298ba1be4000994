//! Named config sets (`shoal config`): values the apps of a namespace share. An app names
//! sets in `config_sets`; every apply fills in their values as they are then
//! ([`ControlPlane::resolve_config_sets`]), so each revision keeps the values it was made
//! with. Changing a set applies each of its users again, which rolls them like any change;
//! a set in use cannot be deleted.

use crate::error::ControlError;
use crate::state::{ControlPlane, Read, encode};
use shoal_api::ConfigSetView;
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::spec::{AppKey, AppSpec, check_config};
use shoal_core::{App, ConfigSet, EventType, Revision};
use shoal_store::{Op, Txn};
use std::collections::BTreeMap;

/// What a write of a config set does to its values.
#[derive(Debug, Clone)]
pub enum ConfigChange {
    /// These, whole.
    Replace(BTreeMap<String, String>),
    /// `set`'s keys set and `unset`'s removed, in the values the set has when it is written.
    Merge {
        set: BTreeMap<String, String>,
        unset: Vec<String>,
    },
}

impl ControlPlane {
    /// Applies each of `users` again, after a config set or secret (`what`) they name
    /// changed: the ones applied. Each is read just before, and an apply that raced another
    /// writer is made again on the app as it then is; one that still fails is logged, and
    /// the app takes the new values at its next apply, or when a controller next starts
    /// ([`ControlPlane::apply_references_again`]).
    pub(crate) fn apply_users_again(&self, users: Vec<App>, what: &str) -> Vec<AppKey> {
        let mut applied = Vec::new();
        for key in users.into_iter().map(|a| a.spec.key()) {
            match self.apply_again(&key) {
                Ok(()) => applied.push(key),
                Err(e) => self.not_applied_again(&key, what, &e),
            }
        }
        applied
    }

    /// Says, in the log and as a Warning event on the app (`shoal describe app`), that app
    /// `key` keeps the values it runs with: applying it again failed with `e`.
    fn not_applied_again(&self, key: &AppKey, what: &str, e: &ControlError) {
        tracing::warn!(app = %key, error = %e, "an app of a changed {what} was not applied again");
        let event = self.event_op(
            EventType::Warning,
            "NotAppliedAgain",
            format!("app/{key}"),
            Some(key),
            format!("app {key} keeps the values it runs with: applying it again with its {what} as now failed: {e}"),
        );
        if let Err(e) = self.inner.store.txn(Txn::new().then(event)) {
            tracing::warn!(app = %key, error = %e, "cannot record that an app was not applied again");
        }
    }

    /// Applies app `key`'s stored spec again with the config sets and secrets it names as
    /// they are now, only over the app as read (an apply made meanwhile is not undone),
    /// reading it again up to three times if another write came first. An app deleted
    /// meanwhile is left alone.
    fn apply_again(&self, key: &AppKey) -> Result<(), ControlError> {
        let mut tries = 1;
        loop {
            let Some((app, at)) = self.get::<App>(&keys::app(key))? else {
                return Ok(());
            };
            match self.apply_over(app.spec, false, Some(at), false, None) {
                Err(ControlError::Conflict(_) | ControlError::Raced(_)) if tries < 3 => tries += 1,
                other => return other.map(|_| ()),
            }
        }
    }

    /// Applies again every app that names a config set or a secret, so each runs with
    /// their values as stored: a change to one is written before its users are applied
    /// again, and a crash in between would otherwise leave them on the old values. An app
    /// already up to date writes nothing, and one that `rollout undo` took back to older
    /// values after their last change keeps them ([`ControlPlane::undone_since`]). The
    /// controller runs it when it starts. Answers the apps that were applied again, whether
    /// or not anything changed for them.
    pub(crate) fn apply_references_again(&self) -> Result<Vec<AppKey>, ControlError> {
        let mut users = Vec::new();
        for app in self.list::<App>(&keys::APPS)? {
            if names_values(&app.spec) && !self.undone_since(&app)? {
                users.push(app);
            }
        }
        Ok(self.apply_users_again(users, "config set or secret"))
    }

    /// Whether `app` runs a revision `rollout undo` made after the last change of every
    /// config set and secret it names: the user chose those older values, and only a change
    /// made since (whose applying a crash may have cut short) takes it to the new ones.
    fn undone_since(&self, app: &App) -> Result<bool, ControlError> {
        let key = app.spec.key();
        let Some((revision, made_at)) =
            self.get::<Revision>(&keys::revision(&key, app.revision))?
        else {
            return Ok(false);
        };
        if revision.undid.is_none() {
            return Ok(false);
        }
        let mut read = Read::new();
        let resolved = self
            .resolve_config_sets(app.spec.clone(), &mut read)
            .and_then(|spec| self.resolve_secrets(spec, &mut read));
        // One gone since: applying it again says why it cannot be.
        if resolved.is_err() {
            return Ok(false);
        }
        Ok(read.values().all(|(changed_at, _)| *changed_at < made_at))
    }

    /// `spec` with the values of the sets it names, as they are now; an unknown set is
    /// refused, naming it.
    pub(crate) fn resolve_config_sets(
        &self,
        mut spec: AppSpec,
        read: &mut Read,
    ) -> Result<AppSpec, ControlError> {
        for set in &mut spec.config_sets {
            let key = keys::config_set(&spec.namespace, &set.name);
            let Some((found, at)) = self.get(&key)? else {
                return Err(ControlError::Invalid {
                    code: ErrorCode::InvalidSpec,
                    field: Some("config_sets".into()),
                    message: format!(
                        "config set {} does not exist in namespace {}: create it with `shoal config create {}`",
                        set.name, spec.namespace, set.name
                    ),
                });
            };
            read.entry(key.to_string())
                .or_insert_with(|| (at, encode(&found)));
            set.data = Some(found.data);
        }
        Ok(spec)
    }

    /// Writes set `name` of namespace `ns` (creates it only if `create`, else changes it
    /// only if it exists), then applies each app that names it again, so they roll to the
    /// new values. Answers the set and the apps that were applied again (`None`: the data
    /// was the set's already, and nothing was written).
    pub fn put_config_set(
        &self,
        ns: &str,
        name: &str,
        change: ConfigChange,
        create: bool,
    ) -> Result<(ConfigSet, Option<Vec<AppKey>>), ControlError> {
        let bad = |m: String| ControlError::invalid(ErrorCode::InvalidSpec, m);
        shoal_core::validate_name(name).map_err(|e| bad(format!("config set name: {e}")))?;
        shoal_core::validate_name(ns).map_err(|e| bad(format!("namespace: {e}")))?;
        let key = keys::config_set(ns, name);
        let existing = self.get::<ConfigSet>(&key)?;
        let data = match (change, &existing) {
            (ConfigChange::Replace(data), _) => data,
            (ConfigChange::Merge { set, unset }, Some((current, _))) if !create => {
                let mut data = current.data.clone();
                data.extend(set);
                for k in unset {
                    if data.remove(&k).is_none() {
                        return Err(ControlError::not_found(format!(
                            "config set {name} has no key {k:?}"
                        )));
                    }
                }
                data
            }
            // Refused below: it exists, or it does not.
            (ConfigChange::Merge { set, .. }, _) => set,
        };
        check_config(&data).map_err(|m| bad(format!("config set {name}: {m}")))?;
        // Any value may become an env value (`$(config.KEY)`), which would end at the NUL.
        if let Some(k) = data.iter().find_map(|(k, v)| v.contains('\0').then_some(k)) {
            return Err(bad(format!(
                "config set {name}: key {k} holds a NUL character, which no environment variable can"
            )));
        }
        if let Some((set, _)) = existing.as_ref().filter(|(s, _)| !create && s.data == data) {
            return Ok((set.clone(), None));
        }
        if !create {
            self.users_take(ns, name, &data)?;
        }
        let txn = match (&existing, create) {
            (Some(_), true) => {
                return Err(ControlError::conflict(format!(
                    "config set {name} exists in namespace {ns}: change it with `shoal config set`"
                )));
            }
            (None, false) => {
                return Err(ControlError::not_found(format!(
                    "config set {name} does not exist in namespace {ns}: create it with `shoal config create`"
                )));
            }
            (Some((_, at)), false) => Txn::new().when_mod_revision(key.clone(), *at),
            (None, true) => Txn::new().when_absent(key.clone()),
        };
        let set = ConfigSet {
            namespace: ns.to_string(),
            name: name.to_string(),
            data,
            updated_at: self.now(),
        };
        let verb = if create { "created" } else { "changed" };
        let txn = txn.then(Op::put(key, encode(&set))).then(self.event_op(
            EventType::Normal,
            if create {
                "ConfigSetCreated"
            } else {
                "ConfigSetChanged"
            },
            format!("config/{ns}/{name}"),
            None,
            format!(
                "config set {name} {verb} ({})",
                shoal_core::counted(set.data.len() as u64, "key")
            ),
        ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Err(ControlError::Raced(format!(
                "config set {name} changed meanwhile; try again"
            )));
        }
        let users = self.config_set_users(ns, name)?;
        Ok((set, Some(self.apply_users_again(users, "config set"))))
    }

    /// Refuses new `data` for set `name` that one of its users could not be applied with (a
    /// key its `$(config.KEY)` names, gone): the change would leave it on the old values, as
    /// unsetting a secret's key an app names is refused.
    fn users_take(
        &self,
        ns: &str,
        name: &str,
        data: &BTreeMap<String, String>,
    ) -> Result<(), ControlError> {
        let mut refused = Vec::new();
        for app in self.config_set_users(ns, name)? {
            let mut spec = self.resolve_config_sets(app.spec, &mut Read::new())?;
            for set in spec.config_sets.iter_mut().filter(|s| s.name == name) {
                set.data = Some(data.clone());
            }
            if let Err(e) = spec.validate() {
                refused.push(format!("app {}: {e}", spec.name));
            }
        }
        match refused.is_empty() {
            true => Ok(()),
            false => Err(ControlError::conflict(format!(
                "config set {name} cannot change so: {}",
                refused.join("; ")
            ))),
        }
    }

    /// The apps of namespace `ns` that name set `name`.
    fn config_set_users(&self, ns: &str, name: &str) -> Result<Vec<App>, ControlError> {
        Ok(self
            .list(&keys::apps_in(ns))?
            .into_iter()
            .filter(|a: &App| a.spec.config_sets.iter().any(|s| s.name == name))
            .collect())
    }

    pub fn config_set(&self, ns: &str, name: &str) -> Result<ConfigSet, ControlError> {
        self.get(&keys::config_set(ns, name))?
            .map(|(set, _)| set)
            .ok_or_else(|| {
                ControlError::not_found(format!(
                    "config set {name} does not exist in namespace {ns}"
                ))
            })
    }

    /// Every set of namespace `ns` (of all namespaces if `None`): names, keys, users.
    pub fn config_sets(&self, ns: Option<&str>) -> Result<Vec<ConfigSetView>, ControlError> {
        let sets: Vec<ConfigSet> = match ns {
            Some(ns) => self.list(&keys::config_sets_in(ns))?,
            None => self.list(&keys::CONFIG_SETS)?,
        };
        let apps: Vec<App> = self.list(&keys::APPS)?;
        Ok(sets
            .into_iter()
            .map(|set| ConfigSetView {
                used_by: apps
                    .iter()
                    .filter(|a| {
                        a.spec.namespace == set.namespace
                            && a.spec.config_sets.iter().any(|s| s.name == set.name)
                    })
                    .map(|a| a.spec.name.clone())
                    .collect(),
                keys: set.data.keys().cloned().collect(),
                namespace: set.namespace,
                name: set.name,
                updated_at: set.updated_at,
            })
            .collect())
    }

    /// Deletes set `name` of `ns`, unless an app names it.
    pub fn delete_config_set(&self, ns: &str, name: &str) -> Result<(), ControlError> {
        let key = keys::config_set(ns, name);
        let Some((_, at)) = self.get(&key)? else {
            return Err(ControlError::not_found(format!(
                "config set {name} does not exist in namespace {ns}"
            )));
        };
        let users: Vec<String> = self
            .config_set_users(ns, name)?
            .into_iter()
            .map(|a| a.spec.name)
            .collect();
        if !users.is_empty() {
            return Err(ControlError::conflict(format!(
                "config set {name} is used by {}: take it out of their config_sets first",
                users.join(", ")
            )));
        }
        self.delete_as_read(
            key.to_string(),
            at,
            &format!("config set {name}"),
            "ConfigSetDeleted",
            format!("config/{ns}/{name}"),
        )
    }
}

/// Whether `spec` takes values from outside itself: config sets, secrets, a TLS secret.
fn names_values(spec: &AppSpec) -> bool {
    !spec.config_sets.is_empty()
        || !spec.secret_env.is_empty()
        || !spec.secret_config.is_empty()
        || spec.http.as_ref().is_some_and(|h| h.tls.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{control_plane, uploaded};
    use shoal_core::spec::parse_app;

    fn data(greeting: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("greeting".to_string(), greeting.to_string())])
    }

    /// A control plane in `dir` with set `shared` (greeting "one") and app `web` naming it,
    /// its spec ending in `more` (TOML).
    fn a_set_and_its_user(dir: &std::path::Path, more: &str) -> ControlPlane {
        let cp = control_plane(dir);
        cp.put_config_set(
            "default",
            "shared",
            ConfigChange::Replace(data("one")),
            true,
        )
        .unwrap();
        let digest = uploaded(&cp);
        let src = format!(
            "name = \"web\"\nconfig_sets = [\"shared\"]\n[component]\ndigest = \"{digest}\"\n\
             kind = \"http\"\n{more}"
        );
        let spec = parse_app(&src).unwrap().resolve(digest).unwrap();
        cp.apply(spec, false).unwrap();
        cp
    }

    /// A set's change was written, and the control plane died before its users were
    /// applied again: the next controller to start applies them again.
    #[test]
    fn users_left_on_old_values_by_a_crash_take_the_new_ones_when_a_controller_starts() {
        let dir = tempfile::tempdir().unwrap();
        let cp = a_set_and_its_user(dir.path(), "");
        let digest = uploaded(&cp);
        let src =
            format!("name = \"plain\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n");
        let spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
        cp.apply(spec, false).unwrap();
        // What `put_config_set` writes before it applies the users again, and nothing more.
        let key = keys::config_set("default", "shared");
        let (mut set, at) = cp.get::<ConfigSet>(&key).unwrap().unwrap();
        set.data = data("two");
        let txn = Txn::new()
            .when_mod_revision(key.clone(), at)
            .then(Op::put(key, encode(&set)));
        assert!(cp.store().txn(txn).unwrap().succeeded);
        let stored = |name: &str| {
            let key = keys::app(&AppKey::new("default", name));
            cp.get::<App>(&key).unwrap().unwrap().0
        };
        assert_eq!(stored("web").spec.config_sets[0].data, Some(data("one")));

        let applied = cp.apply_references_again().unwrap();
        assert_eq!(applied, [AppKey::new("default", "web")]);
        let web = stored("web");
        assert_eq!(web.spec.config_sets[0].data, Some(data("two")));
        assert_eq!(web.revision, 2, "a new revision rolls it");
        assert_eq!(stored("plain").revision, 1);
        // Up to date, it writes nothing more.
        let revision = cp.store().revision();
        cp.apply_references_again().unwrap();
        assert_eq!(cp.store().revision(), revision);

        // One that cannot be applied again (its module gone) keeps its values, and says so.
        cp.store()
            .txn(Txn::new().then(Op::delete(keys::module(&digest))))
            .unwrap();
        let (mut set, at) = cp
            .get::<ConfigSet>(&keys::config_set("default", "shared"))
            .unwrap()
            .unwrap();
        set.data = data("three");
        let key = keys::config_set("default", "shared");
        let txn = Txn::new()
            .when_mod_revision(key.clone(), at)
            .then(Op::put(key, encode(&set)));
        assert!(cp.store().txn(txn).unwrap().succeeded);
        assert_eq!(cp.apply_references_again().unwrap(), Vec::<AppKey>::new());
        assert_eq!(stored("web").spec.config_sets[0].data, Some(data("two")));
        let events = cp.list::<shoal_core::Event>(&keys::EVENTS).unwrap();
        let warned = events.last().unwrap();
        assert_eq!(
            (warned.kind, warned.reason.as_str(), warned.app.clone()),
            (
                EventType::Warning,
                "NotAppliedAgain",
                Some(AppKey::new("default", "web"))
            )
        );
        assert!(
            warned.message.contains("has not been uploaded"),
            "{}",
            warned.message
        );
    }

    /// `rollout undo` back to a set's older values holds when a controller starts: only a
    /// change of the set made after the undo takes the app to the new values.
    #[test]
    fn an_undo_to_older_values_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cp = a_set_and_its_user(dir.path(), "");
        cp.put_config_set(
            "default",
            "shared",
            ConfigChange::Replace(data("two")),
            false,
        )
        .unwrap();
        let web = AppKey::new("default", "web");
        let stored = || cp.get::<App>(&keys::app(&web)).unwrap().unwrap().0;
        assert_eq!(stored().revision, 2);
        cp.rollback(&web, Some(1)).unwrap();
        assert_eq!(stored().revision, 3);
        assert_eq!(stored().spec.config_sets[0].data, Some(data("one")));

        assert_eq!(cp.apply_references_again().unwrap(), Vec::<AppKey>::new());
        assert_eq!(stored().revision, 3, "the undo holds");
        assert_eq!(stored().spec.config_sets[0].data, Some(data("one")));

        // A change written after the undo, its users not applied again yet (a crash).
        let key = keys::config_set("default", "shared");
        let (mut set, at) = cp.get::<ConfigSet>(&key).unwrap().unwrap();
        set.data = data("three");
        let txn = Txn::new()
            .when_mod_revision(key.clone(), at)
            .then(Op::put(key, encode(&set)));
        assert!(cp.store().txn(txn).unwrap().succeeded);
        assert_eq!(
            cp.apply_references_again().unwrap(),
            std::slice::from_ref(&web)
        );
        assert_eq!(stored().revision, 4);
        assert_eq!(stored().spec.config_sets[0].data, Some(data("three")));
    }

    #[test]
    fn a_value_with_a_nul_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let nul = BTreeMap::from([("v".to_string(), "LEAK\0abc".to_string())]);
        let e = cp
            .put_config_set("default", "nul", ConfigChange::Replace(nul), true)
            .unwrap_err();
        assert!(e.to_string().contains("key v holds a NUL character"), "{e}");
        assert!(
            cp.get::<ConfigSet>(&keys::config_set("default", "nul"))
                .unwrap()
                .is_none()
        );
    }

    /// A change a user could not take (the key its env names, gone) is refused, naming it,
    /// as a secret's is; the set is left as it was.
    #[test]
    fn a_change_a_user_cannot_take_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let cp = a_set_and_its_user(dir.path(), "[env]\nGREETING = \"$(config.greeting)\"\n");

        let e = cp
            .put_config_set(
                "default",
                "shared",
                ConfigChange::Replace(BTreeMap::new()),
                false,
            )
            .unwrap_err();
        assert!(matches!(e, ControlError::Conflict(_)), "{e}");
        let said = e.to_string();
        assert!(
            said.contains("app web") && said.contains("greeting"),
            "{said}"
        );
        assert_eq!(
            cp.config_set("default", "shared").unwrap().data,
            data("one")
        );
        // A change it can take goes through, and rolls it.
        let (_, rolled) = cp
            .put_config_set(
                "default",
                "shared",
                ConfigChange::Replace(data("two")),
                false,
            )
            .unwrap();
        assert_eq!(rolled.unwrap(), [AppKey::new("default", "web")]);
        // The same data again writes nothing and rolls nothing.
        let web = || {
            cp.get::<App>(&keys::app(&AppKey::new("default", "web")))
                .unwrap()
        };
        let before = web();
        let (_, rolled) = cp
            .put_config_set(
                "default",
                "shared",
                ConfigChange::Replace(data("two")),
                false,
            )
            .unwrap();
        assert_eq!(rolled, None);
        assert_eq!(web(), before);
    }

    /// A spec read from the store and applied again cannot undo an apply made since.
    #[test]
    fn an_apply_over_a_revision_since_changed_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let spec = |greeting: &str| {
            let src = format!(
                "name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[env]\nGREETING = \"{greeting}\"\n"
            );
            parse_app(&src).unwrap().resolve(digest.clone()).unwrap()
        };
        cp.apply(spec("one"), false).unwrap();
        let key = keys::app(&AppKey::new("default", "web"));
        let (read, at) = cp.get::<App>(&key).unwrap().unwrap();
        cp.apply(spec("two"), false).unwrap();
        let stale = cp.apply_over(read.spec, false, Some(at), false, None);
        assert!(matches!(stale, Err(ControlError::Conflict(_))), "{stale:?}");
        let (stored, _) = cp.get::<App>(&key).unwrap().unwrap();
        assert_eq!(stored.spec.env["GREETING"], "two");
    }
}
