//! Secrets (`shoal secret`): values an app reads as env values or config keys, kept sealed
//! in the store under the control plane's key file (`shoal_secrets`).
//!
//! An app names a secret's keys (`{ secret = "db", key = "password" }`); every apply pins
//! the secret's latest version in the spec ([`ControlPlane::resolve_secrets`]), unless the
//! version pinned now holds the same value ([`ControlPlane::keep_secret_versions`]), so a
//! revision names the values it was made with and a change of a value rolls the apps that
//! read it like any change.
//! Values are opened only for a node that runs a replica of a revision naming them
//! ([`ControlPlane::replica_secrets`]); the API, events and logs name keys and versions,
//! never values.
//!
//! An app's `[http] tls` names a secret holding a certificate and its key for its route
//! hosts (`tls.crt`, `tls.key`). An apply checks that they belong together and name those
//! hosts, and pins the version; every node's gateway gets them
//! ([`ControlPlane::ingress_certificates`]), since every gateway serves every route.

use crate::error::ControlError;
use crate::state::{ControlPlane, Read, encode};
use shoal_api::{IngressCertificate, KeyRotated, ReplicaSecrets, SecretView, SecretWrite};
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::spec::{
    AppKey, AppSpec, SecretKeyRef, TLS_CERT_KEY, TLS_KEY_KEY, Template, check_secret_key,
    secrets_named,
};
use shoal_core::{App, EventType, Replica, Revision, Secret, SecretVersion};
use shoal_secrets::{Keyring, binding};
use shoal_store::{KvStore, Op, Txn};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use zeroize::Zeroizing;

/// The most bytes one secret's keys and values may take, as Kubernetes allows.
pub const MAX_SECRET_BYTES: usize = 1 << 20;

/// The control plane's key file, or why there is none to use.
pub(crate) enum Keys {
    Ready(Keyring),
    Unavailable(String),
}

/// Opens the key file at `path`, making one only if the store holds no secret yet: with
/// secrets stored, a missing or unusable key file is said (and every secret operation
/// refused with that reason), never replaced by a key that opens nothing.
pub(crate) fn open_keys(path: Option<&Path>, store: &dyn KvStore) -> Keys {
    let Some(path) = path else {
        return Keys::Unavailable("this control plane has no secret key file".into());
    };
    match Keyring::load(path) {
        Ok(Some(ring)) => Keys::Ready(ring),
        Ok(None) => {
            let stored = store
                .range(keys::SECRETS.as_str())
                .map(|(kvs, _)| kvs.len())
                .unwrap_or(0);
            if stored > 0 {
                let reason = format!(
                    "the secret key file {} is missing, so the {stored} stored secrets cannot be opened; restore it from a backup",
                    path.display()
                );
                tracing::error!("{reason}");
                return Keys::Unavailable(reason);
            }
            match Keyring::create(path) {
                Ok(ring) => Keys::Ready(ring),
                Err(e) => {
                    tracing::error!(error = %e, "no secret key file");
                    Keys::Unavailable(e.to_string())
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "secrets are unavailable");
            Keys::Unavailable(e.to_string())
        }
    }
}

fn unavailable(reason: &str) -> ControlError {
    ControlError::Unavailable(format!("secrets are unavailable: {reason}"))
}

fn not_found(ns: &str, name: &str) -> ControlError {
    ControlError::not_found(format!("secret {name} does not exist in namespace {ns}"))
}

impl ControlPlane {
    fn with_keys<T>(
        &self,
        f: impl FnOnce(&Keyring) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        match &*self
            .inner
            .secret_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
        {
            Keys::Ready(ring) => f(ring),
            Keys::Unavailable(reason) => Err(unavailable(reason)),
        }
    }

    /// `spec` with each secret key it names pinned to the secret's latest version; an
    /// unknown secret or key is refused, naming it.
    pub(crate) fn resolve_secrets(
        &self,
        mut spec: AppSpec,
        read: &mut Read,
    ) -> Result<AppSpec, ControlError> {
        let ns = spec.namespace.clone();
        let mut found: BTreeMap<String, Secret> = BTreeMap::new();
        for (field, refs) in [
            ("env", &mut spec.secret_env),
            ("config", &mut spec.secret_config),
        ] {
            for (name, r) in refs.iter_mut() {
                let bad = |message: String| ControlError::Invalid {
                    code: ErrorCode::InvalidSpec,
                    field: Some(field.into()),
                    message,
                };
                if !found.contains_key(&r.secret) {
                    let key = keys::secret(&ns, &r.secret);
                    let Some((secret, at)) = self.get(&key)? else {
                        return Err(bad(format!(
                            "{field}.{name} names secret {}, which does not exist in namespace {ns}: create it with `shoal secret create {}`",
                            r.secret, r.secret
                        )));
                    };
                    read.entry(key.to_string())
                        .or_insert_with(|| (at, encode(&secret)));
                    found.insert(r.secret.clone(), secret);
                }
                let secret = &found[&r.secret];
                if !secret.keys().contains(&r.key) {
                    return Err(bad(format!(
                        "{field}.{name} names key {:?} of secret {}, which has only {}",
                        r.key,
                        r.secret,
                        secret.keys().join(", ")
                    )));
                }
                r.version = Some(secret.version);
            }
        }
        self.resolve_tls(&mut spec, read)?;
        Ok(spec)
    }

    /// Keeps, in `spec` (its secret keys pinned to their latest versions by
    /// [`Self::resolve_secrets`]), the version `current` (the app's spec now) pins for each
    /// key whose value there is the latest's: another key of the secret changing is no reason
    /// to roll the app, nor is applying it again (a controller does so for every app naming a
    /// secret when it starts). Without the key file no value can be compared, and every
    /// pinned version is kept: a restart without it must not roll apps to versions whose
    /// values nobody can tell apart. Other values that cannot be opened leave the latest.
    pub(crate) fn keep_secret_versions(&self, spec: &mut AppSpec, current: &AppSpec) {
        let ns = spec.namespace.clone();
        let comparable = self.with_keys(|_| Ok(())).is_ok();
        let mut secrets: BTreeMap<String, Option<Secret>> = BTreeMap::new();
        // Each version's values, opened once; `None`: it cannot be.
        type Values = Option<BTreeMap<String, Zeroizing<String>>>;
        let mut opened: BTreeMap<(String, u64), Values> = BTreeMap::new();
        let mut value = |secret: &str, version: u64, key: &str| -> Option<Zeroizing<String>> {
            let slot = (secret.to_string(), version);
            if !opened.contains_key(&slot) {
                let stored = secrets.entry(secret.to_string()).or_insert_with(|| {
                    self.get::<Secret>(&keys::secret(&ns, secret))
                        .ok()
                        .flatten()
                        .map(|(s, _)| s)
                });
                let values = stored
                    .as_ref()
                    .and_then(|s| self.with_keys(|ring| open_version(ring, s, version)).ok());
                opened.insert(slot.clone(), values);
            }
            opened[&slot].as_ref()?.get(key).cloned()
        };
        for (refs, was) in [
            (&mut spec.secret_env, &current.secret_env),
            (&mut spec.secret_config, &current.secret_config),
        ] {
            for (name, r) in refs.iter_mut() {
                let Some(w) = was
                    .get(name)
                    .filter(|w| w.secret == r.secret && w.key == r.key)
                else {
                    continue;
                };
                let (Some(latest), Some(pinned)) = (r.version, w.version) else {
                    continue;
                };
                if pinned == latest {
                    continue;
                }
                if !comparable {
                    r.version = Some(pinned);
                    continue;
                }
                let now = value(&r.secret, latest, &r.key);
                if now.is_some() && now == value(&r.secret, pinned, &r.key) {
                    r.version = Some(pinned);
                }
            }
        }
    }

    /// Pins `[http] tls` to its secret's latest version, once the certificate there is
    /// checked to have its key and to name every host the app's routes bind.
    fn resolve_tls(&self, spec: &mut AppSpec, read: &mut Read) -> Result<(), ControlError> {
        let ns = spec.namespace.clone();
        let Some(http) = &mut spec.http else {
            return Ok(());
        };
        let Some(tls) = &mut http.tls else {
            return Ok(());
        };
        let bad = |message: String| ControlError::Invalid {
            code: ErrorCode::InvalidSpec,
            field: Some("http.tls".into()),
            message,
        };
        let key = keys::secret(&ns, &tls.secret);
        let Some((secret, at)) = self.get::<Secret>(&key)? else {
            return Err(bad(format!(
                "http.tls names secret {}, which does not exist in namespace {ns}: create it with `shoal secret create {} --tls-cert FILE --tls-key FILE`",
                tls.secret, tls.secret
            )));
        };
        let hosts = route_hosts(&http.routes);
        let chain = self.with_keys(|ring| tls_pair(ring, &secret, secret.version))?;
        let chain = chain.map_err(|e| bad(format!("http.tls: {e}")))?;
        shoal_tls::HostCertificate::new(&chain, &hosts).map_err(|e| {
            bad(format!(
                "http.tls: secret {}'s {TLS_CERT_KEY} and {TLS_KEY_KEY}: {e}",
                tls.secret
            ))
        })?;
        read.entry(key.to_string())
            .or_insert_with(|| (at, encode(&secret)));
        tls.version = Some(secret.version);
        Ok(())
    }

    /// The latest version of `secret`, opened: for what the control plane itself does
    /// with a secret (a registry pull), never for a reply.
    pub(crate) fn open_secret(
        &self,
        secret: &Secret,
    ) -> Result<BTreeMap<String, Zeroizing<String>>, ControlError> {
        self.with_keys(|ring| open_version(ring, secret, secret.version))
    }

    /// Every app's HTTPS certificate and key, for the nodes' gateways. One that cannot be
    /// opened now (its version gone, the key file unusable) is left out and said in the log:
    /// the others still serve.
    pub fn ingress_certificates(&self) -> Result<Vec<IngressCertificate>, ControlError> {
        let apps: Vec<App> = self.list(&keys::APPS)?;
        let mut out = Vec::new();
        for app in apps {
            let Some(http) = &app.spec.http else { continue };
            let Some(tls) = &http.tls else { continue };
            let Some(version) = tls.version else { continue };
            let key = app.spec.key();
            let opened = self
                .get::<Secret>(&keys::secret(&key.namespace, &tls.secret))?
                .ok_or_else(|| format!("secret {} is gone", tls.secret))
                .and_then(|(secret, _)| {
                    self.with_keys(|ring| tls_pair(ring, &secret, version))
                        .map_err(|e| e.to_string())?
                });
            match opened {
                Ok(chain) => out.push(IngressCertificate {
                    namespace: key.namespace.clone(),
                    app: key.name.clone(),
                    hosts: route_hosts(&http.routes),
                    secret: tls.secret.clone(),
                    version,
                    chain: chain.chain,
                    key: chain.key,
                }),
                Err(e) => {
                    tracing::warn!(app = %key, error = %e, "an app's HTTPS certificate cannot be served")
                }
            }
        }
        Ok(out)
    }

    /// Creates secret `name` of namespace `ns`, or makes a new version of it, as `write`
    /// says; then applies each app that names it again, so they roll to the new values
    /// (those apps, `None` for a write that left every value as it was: no new version, and
    /// nothing rolls, as `kubectl apply` of an unchanged Secret).
    pub fn put_secret(
        &self,
        ns: &str,
        name: &str,
        write: SecretWrite,
    ) -> Result<(SecretView, Option<Vec<AppKey>>), ControlError> {
        let bad = |m: String| ControlError::invalid(ErrorCode::InvalidSpec, m);
        shoal_core::validate_name(name).map_err(|e| bad(format!("secret name: {e}")))?;
        shoal_core::validate_name(ns).map_err(|e| bad(format!("namespace: {e}")))?;
        for key in write.set.keys().chain(&write.unset) {
            check_secret_key(key).map_err(|m| bad(format!("secret {name}: {m}")))?;
        }
        if let Some(key) = write.unset.iter().find(|k| write.set.contains_key(*k)) {
            return Err(bad(format!("secret {name}: {key} is both set and unset")));
        }
        // A key an app names would leave it pinned to the old version, and its next apply
        // failing: refused, as deleting a secret in use is.
        if !write.unset.is_empty() {
            let mut users: BTreeMap<&String, Vec<String>> = BTreeMap::new();
            let apps = self.secret_users(ns, name)?;
            for app in &apps {
                let used = keys_used(&app.spec, name);
                for k in write.unset.iter().filter(|k| used.contains(k.as_str())) {
                    users.entry(k).or_default().push(app.spec.name.clone());
                }
            }
            if let Some((k, apps)) = users.into_iter().next() {
                return Err(ControlError::conflict(format!(
                    "secret {name}'s key {k} is used by {}: take it out of their specs first",
                    apps.join(", ")
                )));
            }
        }
        let key = keys::secret(ns, name);
        let existing = self.get(&key)?;
        let tls_users: Vec<(String, Vec<String>)> = self
            .list::<App>(&keys::apps_in(ns))?
            .into_iter()
            .filter_map(|a| {
                let http = a.spec.http.as_ref()?;
                (http.tls.as_ref()?.secret == name)
                    .then(|| (a.spec.name, route_hosts(&http.routes)))
            })
            .collect();
        let written = self.with_keys(|ring| {
            let now = self.now();
            let (mut values, mut secret, txn) = match (&existing, write.create) {
                (Some(_), true) => {
                    return Err(ControlError::conflict(format!(
                        "secret {name} exists in namespace {ns}: change it with `shoal secret set`"
                    )));
                }
                (None, false) => {
                    return Err(ControlError::not_found(format!(
                        "secret {name} does not exist in namespace {ns}: create it with `shoal secret create`"
                    )));
                }
                (None, true) => {
                    if !write.unset.is_empty() {
                        return Err(bad(format!("secret {name} is new: it has nothing to unset")));
                    }
                    // Versions go on from the last one a revision still names, of a secret of
                    // that name deleted since: such a revision (`rollout undo` to it) must not
                    // get this secret's values under its old version number.
                    let named = self.pinned_versions(ns, name)?;
                    let secret = Secret {
                        namespace: ns.into(),
                        name: name.into(),
                        version: named.last().copied().unwrap_or(0),
                        versions: BTreeMap::new(),
                        updated_at: now,
                    };
                    (BTreeMap::new(), secret, Txn::new().when_absent(key.clone()))
                }
                (Some((old, at)), false) => {
                    let values = open_version(ring, old, old.version)?;
                    let txn = Txn::new().when_mod_revision(key.clone(), *at);
                    (values, old.clone(), txn)
                }
            };
            let before = (!write.create).then(|| values.clone());
            for k in &write.unset {
                if values.remove(k).is_none() {
                    return Err(ControlError::not_found(format!(
                        "secret {name} has no key {k:?}"
                    )));
                }
            }
            for (k, v) in write.set {
                // Any value may become an environment variable, which ends at a NUL.
                if v.contains('\0') {
                    return Err(bad(format!(
                        "secret {name}'s key {k} holds a NUL character, which no environment variable can"
                    )));
                }
                values.insert(k, Zeroizing::new(v));
            }
            if before.as_ref() == Some(&values) {
                return Ok(None);
            }
            // The keys whose value changed (came, went or differs): only apps that use one
            // of them roll.
            let changed: BTreeSet<String> = values
                .keys()
                .chain(before.iter().flat_map(|b| b.keys()))
                .filter(|k| before.as_ref().and_then(|b| b.get(*k)) != values.get(*k))
                .cloned()
                .collect();
            check_tls(name, &values, &tls_users)?;
            let bytes: usize = values.iter().map(|(k, v)| k.len() + v.len()).sum();
            if bytes > MAX_SECRET_BYTES {
                return Err(bad(format!(
                    "secret {name}: {bytes} bytes of keys and values: at most {MAX_SECRET_BYTES}"
                )));
            }
            let previous = secret.version;
            secret.version += 1;
            let data = values
                .iter()
                .map(|(k, v)| {
                    let sealed = ring.seal(&binding(ns, name, secret.version, k), v.as_bytes());
                    (k.clone(), sealed)
                })
                .collect();
            secret.versions.insert(
                secret.version,
                SecretVersion {
                    data,
                    created_at: now,
                },
            );
            secret.updated_at = now;
            // Keep the versions revisions name, and the one an apply may be pinning now.
            let pinned = self.pinned_versions(ns, name)?;
            let latest = secret.version;
            secret
                .versions
                .retain(|v, _| *v == latest || *v == previous || pinned.contains(v));
            let (reason, verb) = if write.create {
                ("SecretCreated", "created")
            } else {
                ("SecretChanged", "changed")
            };
            let txn = txn.then(Op::put(key.clone(), encode(&secret))).then(self.event_op(
                EventType::Normal,
                reason,
                format!("secret/{ns}/{name}"),
                None,
                format!(
                    "secret {name} {verb}: version {} (keys: {})",
                    secret.version,
                    secret.keys().join(", ")
                ),
            ));
            if !self.inner.store.txn(txn)?.succeeded {
                return Err(ControlError::Raced(format!(
                    "secret {name} changed meanwhile; try again"
                )));
            }
            Ok(Some((secret, changed)))
        })?;
        let apps: Vec<App> = self.list(&keys::apps_in(ns))?;
        let Some((secret, changed)) = written else {
            let (old, _) = existing.expect("only an existing secret is left unchanged");
            return Ok((view(old, &apps), None));
        };
        // An app that uses none of the keys that changed keeps the version it pins: its
        // values are the same.
        let users = self
            .secret_users(ns, name)?
            .into_iter()
            .filter(|a| {
                keys_used(&a.spec, name)
                    .iter()
                    .any(|k| changed.contains(*k))
            })
            .collect();
        let rolled = self.apply_users_again(users, "secret");
        let apps: Vec<App> = self.list(&keys::apps_in(ns))?;
        Ok((view(secret, &apps), Some(rolled)))
    }

    /// The versions of secret `name` that revisions of namespace `ns` name, and those apps'
    /// `[http] tls` name.
    fn pinned_versions(&self, ns: &str, name: &str) -> Result<BTreeSet<u64>, ControlError> {
        let revisions: Vec<Revision> = self.list(&keys::revisions_in(ns))?;
        let apps: Vec<App> = self.list(&keys::apps_in(ns))?;
        let tls = apps
            .iter()
            .filter_map(|a| a.spec.http.as_ref()?.tls.as_ref())
            .filter(|t| t.secret == name)
            .filter_map(|t| t.version);
        Ok(revisions
            .iter()
            .flat_map(|r| {
                r.template
                    .secret_env
                    .values()
                    .chain(r.template.secret_config.values())
            })
            .filter(|r| r.secret == name)
            .filter_map(|r| r.version)
            .chain(tls)
            .collect())
    }

    /// The apps of namespace `ns` that name secret `name`.
    fn secret_users(&self, ns: &str, name: &str) -> Result<Vec<App>, ControlError> {
        Ok(self
            .list(&keys::apps_in(ns))?
            .into_iter()
            .filter(|a: &App| uses(&a.spec, name))
            .collect())
    }

    pub fn secret(&self, ns: &str, name: &str) -> Result<SecretView, ControlError> {
        let (secret, _) = self
            .get(&keys::secret(ns, name))?
            .ok_or_else(|| not_found(ns, name))?;
        let apps: Vec<App> = self.list(&keys::apps_in(ns))?;
        Ok(view(secret, &apps))
    }

    /// Every secret of namespace `ns` (of all namespaces if `None`): names, keys, versions
    /// and users, never values.
    pub fn secrets(&self, ns: Option<&str>) -> Result<Vec<SecretView>, ControlError> {
        let secrets: Vec<Secret> = match ns {
            Some(ns) => self.list(&keys::secrets_in(ns))?,
            None => self.list(&keys::SECRETS)?,
        };
        let apps: Vec<App> = self.list(&keys::APPS)?;
        Ok(secrets.into_iter().map(|s| view(s, &apps)).collect())
    }

    /// Deletes secret `name` of `ns`, unless an app names it.
    pub fn delete_secret(&self, ns: &str, name: &str) -> Result<(), ControlError> {
        let key = keys::secret(ns, name);
        let Some((_, at)) = self.get(&key)? else {
            return Err(not_found(ns, name));
        };
        let users: Vec<String> = self
            .secret_users(ns, name)?
            .into_iter()
            .map(|a| a.spec.name)
            .collect();
        if !users.is_empty() {
            return Err(ControlError::conflict(format!(
                "secret {name} is used by {}: take it out of their specs first",
                users.join(", ")
            )));
        }
        // A revision that replicas still run (the stable one of a rollout in progress, which
        // a rollback returns to) needs its values to start a replica again.
        // A finished job run is kept for its history, and never runs again.
        let running: BTreeSet<(AppKey, u64)> = self
            .list::<Replica>(&keys::replicas_in(ns))?
            .into_iter()
            .filter(|r| !r.phase.is_terminal())
            .map(|r| (r.app, r.revision))
            .collect();
        let revisions: Vec<Revision> = self.list(&keys::revisions_in(ns))?;
        if let Some(r) = revisions
            .iter()
            .find(|r| running.contains(&(r.app.clone(), r.number)) && names(&r.template, name))
        {
            return Err(ControlError::conflict(format!(
                "secret {name} is named by revision {} of app {}, which replicas still run: delete it once its rollout is over",
                r.number, r.app.name
            )));
        }
        self.delete_as_read(
            key.to_string(),
            at,
            &format!("secret {name}"),
            "SecretDeleted",
            format!("secret/{ns}/{name}"),
        )
    }

    /// The values replica `id` of `app` needs, for `node`, which must be where it is placed.
    pub fn replica_secrets(
        &self,
        node: &str,
        app: &AppKey,
        id: &str,
    ) -> Result<ReplicaSecrets, ControlError> {
        let elsewhere = || {
            ControlError::invalid(
                ErrorCode::Forbidden,
                format!("replica {id} of {app} is not placed on node {node}"),
            )
        };
        let (replica, _): (Replica, _) =
            self.get(&keys::replica(app, id))?.ok_or_else(elsewhere)?;
        if replica.node.as_deref() != Some(node) {
            return Err(elsewhere());
        }
        let (revision, _): (Revision, _) = self
            .get(&keys::revision(app, replica.revision))?
            .ok_or_else(|| {
                ControlError::Unavailable(format!("revision {} of {app} is gone", replica.revision))
            })?;
        let t = &revision.template;
        self.with_keys(|ring| {
            let mut opened: BTreeMap<(String, u64), BTreeMap<String, Zeroizing<String>>> =
                BTreeMap::new();
            let mut value = |r: &SecretKeyRef| -> Result<String, ControlError> {
                let version = r.version.ok_or_else(|| {
                    ControlError::Unavailable(format!("{app}: {r} has no version pinned"))
                })?;
                let slot = (r.secret.clone(), version);
                if !opened.contains_key(&slot) {
                    let (secret, _): (Secret, _) = self
                        .get(&keys::secret(&app.namespace, &r.secret))?
                        .ok_or_else(|| {
                            ControlError::Unavailable(format!(
                                "secret {} of namespace {} is gone",
                                r.secret, app.namespace
                            ))
                        })?;
                    opened.insert(slot.clone(), open_version(ring, &secret, version)?);
                }
                opened[&slot]
                    .get(&r.key)
                    .map(|v| v.to_string())
                    .ok_or_else(|| ControlError::Unavailable(format!("{app}: {r} is gone")))
            };
            let mut out = ReplicaSecrets::default();
            for (name, r) in &t.secret_env {
                out.env.insert(name.clone(), value(r)?);
            }
            for (key, r) in &t.secret_config {
                out.config.insert(key.clone(), value(r)?);
            }
            Ok(out)
        })
    }

    /// Seals every secret again under a new key, then drops the old keys from the key file.
    /// A crash between the steps leaves a key file holding every key a stored value needs.
    pub fn rotate_secret_key(&self) -> Result<KeyRotated, ControlError> {
        // Each server sharing a store holds its own copy of the key file: a rotation here would
        // seal every secret under a key the others do not have, while they run.
        if self.inner.config.shared_store {
            let (running, _) = self.inner.store.range(shoal_store::SERVERS_PREFIX)?;
            if running.len() > 1 {
                let names: Vec<String> = running
                    .iter()
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                    .collect();
                return Err(ControlError::conflict(format!(
                    "the secret key cannot be rotated while other servers run on this store \
                     ({}): each holds its own copy of secret.key, and they could not open what \
                     this one seals. Stop every server but this one, rotate here, copy its \
                     secret.key to the others, and start them again",
                    names.join(", ")
                )));
            }
        }
        let mut keys_guard = self
            .inner
            .secret_keys
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let ring = match &mut *keys_guard {
            Keys::Ready(ring) => ring,
            Keys::Unavailable(reason) => return Err(unavailable(reason)),
        };
        ring.add_primary().map_err(ControlError::internal)?;
        // Writers of secrets wait on the lock held here, so only deletions can race this.
        let mut attempts = 0;
        let (secrets, values) = loop {
            attempts += 1;
            let (kvs, _) = self.inner.store.range(keys::SECRETS.as_str())?;
            let mut txn = Txn::new();
            let (mut secrets, mut values) = (0, 0);
            for kv in &kvs {
                let mut secret: Secret = crate::state::decode(kv)?;
                for (version, sealed) in secret.versions.iter_mut() {
                    for (k, value) in sealed.data.iter_mut() {
                        let place = binding(&secret.namespace, &secret.name, *version, k);
                        let plain = ring.open(&place, value).map_err(|e| {
                            ControlError::Unavailable(format!(
                                "secret {} of namespace {}, version {version}, key {k}: {e}",
                                secret.name, secret.namespace
                            ))
                        })?;
                        *value = ring.seal(&place, &plain);
                        values += 1;
                    }
                }
                secrets += 1;
                txn = txn
                    .when_mod_revision(kv.key.clone(), kv.mod_revision)
                    .then(Op::put(kv.key.clone(), encode(&secret)));
            }
            let txn = txn.then(self.event_op(
                EventType::Normal,
                "SecretKeyRotated",
                "secrets".into(),
                None,
                format!(
                    "secrets sealed again under key {}: {secrets} secrets, {values} values",
                    ring.primary()
                ),
            ));
            if self.inner.store.txn(txn)?.succeeded {
                break (secrets, values);
            }
            if attempts == 5 {
                return Err(ControlError::conflict(
                    "secrets kept changing during the rotation; run it again (the new key is in use)",
                ));
            }
        };
        ring.retire_others().map_err(ControlError::internal)?;
        Ok(KeyRotated {
            key: ring.primary().to_string(),
            secrets,
            values,
        })
    }
}

/// Whether `spec` names secret `name`.
fn uses(spec: &AppSpec, name: &str) -> bool {
    secrets_named(&spec.secret_env, &spec.secret_config).contains(name)
        || spec
            .http
            .as_ref()
            .and_then(|h| h.tls.as_ref())
            .is_some_and(|t| t.secret == name)
}

/// Whether a revision's `template` names secret `name` in its env or config.
fn names(template: &Template, name: &str) -> bool {
    secrets_named(&template.secret_env, &template.secret_config).contains(name)
}

/// The keys of secret `name` that `spec` needs: those its env values and config keys name,
/// and a TLS secret's pair.
fn keys_used<'a>(spec: &'a AppSpec, name: &str) -> BTreeSet<&'a str> {
    let mut used: BTreeSet<&str> = spec
        .secret_env
        .values()
        .chain(spec.secret_config.values())
        .filter(|r| r.secret == name)
        .map(|r| r.key.as_str())
        .collect();
    if spec
        .http
        .as_ref()
        .and_then(|h| h.tls.as_ref())
        .is_some_and(|t| t.secret == name)
    {
        used.extend([TLS_CERT_KEY, TLS_KEY_KEY]);
    }
    used
}

/// The hosts `routes` bind, each once.
fn route_hosts(routes: &[shoal_core::spec::Route]) -> Vec<String> {
    let hosts: BTreeSet<&String> = routes.iter().filter_map(|r| r.host.as_ref()).collect();
    hosts.into_iter().cloned().collect()
}

/// Refuses `values` for secret `name` whose certificate does not go with its key, as
/// `kubectl create secret tls` does, or no longer names the route hosts of an app in `users`
/// (name, hosts) that serves it: stored, it would be a secret no apply takes, and those apps
/// would keep the old certificate with no more than a warning event.
fn check_tls(
    name: &str,
    values: &BTreeMap<String, Zeroizing<String>>,
    users: &[(String, Vec<String>)],
) -> Result<(), ControlError> {
    let (cert, key) = (values.get(TLS_CERT_KEY), values.get(TLS_KEY_KEY));
    if cert.is_none() && key.is_none() && users.is_empty() {
        return Ok(());
    }
    let bad = |m: String| ControlError::invalid(ErrorCode::InvalidSpec, m);
    let (Some(cert), Some(key)) = (cert, key) else {
        return Err(bad(format!(
            "secret {name}: a TLS secret holds both {TLS_CERT_KEY} and {TLS_KEY_KEY} (`shoal secret set {name} --tls-cert FILE --tls-key FILE`)"
        )));
    };
    let chain = shoal_tls::KeyedChain {
        chain: cert.to_string(),
        key: key.to_string(),
    };
    shoal_tls::HostCertificate::new(&chain, &[]).map_err(|e| {
        bad(format!(
            "secret {name}'s {TLS_CERT_KEY} and {TLS_KEY_KEY}: {e}"
        ))
    })?;
    let refused: Vec<String> = users
        .iter()
        .filter_map(|(app, hosts)| {
            let e = shoal_tls::HostCertificate::new(&chain, hosts).err()?;
            Some(format!("app {app}: {e}"))
        })
        .collect();
    match refused.is_empty() {
        true => Ok(()),
        false => Err(ControlError::conflict(format!(
            "secret {name} cannot change so: {}",
            refused.join("; ")
        ))),
    }
}

/// Version `version` of TLS secret `secret`: its certificate chain and key; or, as the
/// outer error, what it lacks.
fn tls_pair(
    ring: &Keyring,
    secret: &Secret,
    version: u64,
) -> Result<Result<shoal_tls::KeyedChain, String>, ControlError> {
    let mut values = open_version(ring, secret, version)?;
    let mut take = |key: &str| {
        values.remove(key).map(|v| v.to_string()).ok_or_else(|| {
            format!(
                "secret {} has no key {key}: a TLS secret holds {TLS_CERT_KEY} and {TLS_KEY_KEY} (`shoal secret create NAME --tls-cert FILE --tls-key FILE`)",
                secret.name
            )
        })
    };
    Ok((|| {
        Ok(shoal_tls::KeyedChain {
            chain: take(TLS_CERT_KEY)?,
            key: take(TLS_KEY_KEY)?,
        })
    })())
}

/// Version `version` of `secret`, opened.
fn open_version(
    ring: &Keyring,
    secret: &Secret,
    version: u64,
) -> Result<BTreeMap<String, Zeroizing<String>>, ControlError> {
    let what = || {
        format!(
            "secret {} of namespace {}, version {version}",
            secret.name, secret.namespace
        )
    };
    let stored = secret
        .versions
        .get(&version)
        .ok_or_else(|| ControlError::Unavailable(format!("{} is no longer kept", what())))?;
    let mut out = BTreeMap::new();
    for (k, sealed) in &stored.data {
        let place = binding(&secret.namespace, &secret.name, version, k);
        let plain = ring
            .open(&place, sealed)
            .map_err(|e| ControlError::Unavailable(format!("{}, key {k}: {e}", what())))?;
        let text = String::from_utf8(plain.to_vec())
            .map_err(|_| ControlError::Unavailable(format!("{}, key {k}: not text", what())))?;
        out.insert(k.clone(), Zeroizing::new(text));
    }
    Ok(out)
}

fn view(secret: Secret, apps: &[App]) -> SecretView {
    SecretView {
        used_by: apps
            .iter()
            .filter(|a| a.spec.namespace == secret.namespace && uses(&a.spec, &secret.name))
            .map(|a| a.spec.name.clone())
            .collect(),
        keys: secret.keys(),
        version: secret.version,
        versions: secret.versions.keys().copied().collect(),
        namespace: secret.namespace,
        name: secret.name,
        updated_at: secret.updated_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{control_plane_with, uploaded};
    use crate::state::{ControlConfig, ControlPlane};
    use shoal_core::spec::parse_app;

    fn control_plane(dir: &Path) -> ControlPlane {
        let config = ControlConfig {
            secret_key_file: Some(dir.join("secret.key")),
            ..ControlConfig::default()
        };
        control_plane_with(dir, config)
    }

    fn write(create: bool, set: &[(&str, &str)]) -> SecretWrite {
        SecretWrite {
            create,
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            unset: vec![],
        }
    }

    /// App `name` reading secret `db`'s `password` as env `PASSWORD`, one replica placed on
    /// `node-1`; answers the replica's id.
    fn app_on_node(cp: &ControlPlane, name: &str) -> (AppKey, String) {
        let digest = uploaded(cp);
        let src = format!(
            "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[http]\nroutes = [\"/{name}\"]\n[env]\nPASSWORD = {{ secret = \"db\", key = \"password\" }}\n"
        );
        let spec = parse_app(&src).unwrap().resolve(digest).unwrap();
        let result = cp.apply(spec, false).unwrap();
        let app = result.app.spec.key();
        let replica = crate::state::tests::replica_of(
            &result.app.spec,
            &format!("{name}-1"),
            result.app.revision,
            "node-1",
            shoal_core::Phase::Starting,
        );
        cp.store()
            .txn(Txn::new().then(Op::put(keys::replica(&app, &replica.id), encode(&replica))))
            .unwrap();
        (app, replica.id)
    }

    /// A certificate is checked against its key as it is written, and against the hosts of
    /// the apps serving it: a refused one changes nothing.
    #[test]
    fn a_tls_secret_is_refused_when_its_key_or_hosts_do_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        std::fs::create_dir(dir.path().join("site")).unwrap();
        let ca = shoal_tls::Authority::load_or_create(&dir.path().join("site")).unwrap();
        let pair = |host: &str| ca.issue_server(&[host.to_string()]).unwrap().keyed_chain();
        let (shop, other) = (pair("shop.test"), pair("other.test"));
        let tls = |create, cert: &str, key: &str| {
            write(create, &[(TLS_CERT_KEY, cert), (TLS_KEY_KEY, key)])
        };
        let refused = |r: Result<_, ControlError>| r.map(|_| ()).unwrap_err().to_string();
        // Files swapped, a key of another certificate, a certificate alone.
        let e = refused(cp.put_secret("default", "t", tls(true, &shop.key, &shop.chain)));
        assert!(e.contains("tls.crt and tls.key"), "{e}");
        let e = refused(cp.put_secret("default", "t", tls(true, &shop.chain, &other.key)));
        assert!(e.contains("tls.crt and tls.key"), "{e}");
        let e = refused(cp.put_secret("default", "t", write(true, &[(TLS_CERT_KEY, &shop.chain)])));
        assert!(e.contains("holds both tls.crt and tls.key"), "{e}");
        // Nor a value an environment variable would cut short.
        let e = refused(cp.put_secret("default", "t", write(true, &[("pw", "cut\0here")])));
        assert!(e.contains("NUL"), "{e}");
        assert!(cp.secret("default", "t").is_err());

        cp.put_secret("default", "shop-tls", tls(true, &shop.chain, &shop.key))
            .unwrap();
        let digest = uploaded(&cp);
        let src = format!(
            "name = \"shop\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[http]\nroutes = [\"shop.test/\"]\ntls = \"shop-tls\"\n"
        );
        cp.apply(parse_app(&src).unwrap().resolve(digest).unwrap(), false)
            .unwrap();
        // A certificate for another host, that the app cannot serve: a conflict, as a config
        // set change an app could not take is.
        let e = cp
            .put_secret("default", "shop-tls", tls(false, &other.chain, &other.key))
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, ControlError::Conflict(_)), "{e}");
        assert!(
            e.to_string().contains("app shop:") && e.to_string().contains("shop.test"),
            "{e}"
        );
        let e = refused(cp.put_secret("default", "shop-tls", tls(false, &shop.chain, &other.key)));
        assert!(e.contains("tls.crt and tls.key"), "{e}");
        assert_eq!(cp.secret("default", "shop-tls").unwrap().version, 1);
        // A renewal for the same host goes through.
        let renewed = pair("shop.test");
        let (view, _) = cp
            .put_secret(
                "default",
                "shop-tls",
                tls(false, &renewed.chain, &renewed.key),
            )
            .unwrap();
        assert_eq!(view.version, 2);
    }

    /// A secret set while an app naming it is applied: the app ends on the latest version,
    /// whichever came first (an apply that resolved the version before is judged again,
    /// rather than be missed by the set's re-apply of its users).
    #[test]
    fn an_app_applied_while_its_secret_is_set_ends_on_the_latest_version() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        cp.put_secret("default", "db", write(true, &[("password", "v0")]))
            .unwrap();
        let digest = uploaded(&cp);
        let mut stale = Vec::new();
        for i in 0..20 {
            let src = format!(
                "name = \"w{i}\"\n[component]\ndigest = \"{digest}\"\nkind = \"job\"\n[env]\nPASSWORD = {{ secret = \"db\", key = \"password\" }}\n"
            );
            let spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                s.spawn(|| {
                    start.wait();
                    let value = format!("v{}", i + 1);
                    let set =
                        || cp.put_secret("default", "db", write(false, &[("password", &value)]));
                    crate::state::retrying(set).unwrap();
                });
                s.spawn(|| {
                    start.wait();
                    cp.apply(spec.clone(), false).unwrap();
                });
            });
            let latest = cp.secret("default", "db").unwrap().version;
            let pinned = cp.describe(&spec.key()).unwrap().app.spec.secret_env["PASSWORD"].version;
            if pinned != Some(latest) {
                stale.push(format!("w{i}: {pinned:?} of {latest}"));
            }
        }
        assert!(stale.is_empty(), "left on an old version: {stale:?}");
    }

    /// A secret deleted while an app naming it is applied: either the deletion is refused
    /// or comes first (and the apply is refused), never an app naming a deleted secret.
    #[test]
    fn a_secret_is_not_deleted_under_an_app_applied_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let mut lost = Vec::new();
        for i in 0..20 {
            let secret = format!("s{i}");
            cp.put_secret("default", &secret, write(true, &[("k", "v")]))
                .unwrap();
            let src = format!(
                "name = \"w{i}\"\n[component]\ndigest = \"{digest}\"\nkind = \"job\"\n[env]\nK = {{ secret = \"{secret}\", key = \"k\" }}\n"
            );
            let spec = parse_app(&src).unwrap().resolve(digest.clone()).unwrap();
            let start = std::sync::Barrier::new(2);
            let applied = std::thread::scope(|s| {
                s.spawn(|| {
                    start.wait();
                    let _ = cp.delete_secret("default", &secret);
                });
                let applied = s.spawn(|| {
                    start.wait();
                    cp.apply(spec.clone(), false).is_ok()
                });
                applied.join().unwrap()
            });
            let gone = cp.secret("default", &secret).is_err();
            if applied && gone {
                lost.push(i);
            }
        }
        assert!(lost.is_empty(), "apps naming a deleted secret: {lost:?}");
    }

    /// A secret that no app names any more is kept while replicas still run a revision
    /// that names it (a rollback returns to them); once deleted, `rollout undo` to such a
    /// revision is refused, as its replicas could never start.
    #[test]
    fn a_secret_is_kept_while_replicas_run_a_revision_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        cp.put_secret("default", "db", write(true, &[("password", "v1")]))
            .unwrap();
        let (app, id) = app_on_node(&cp, "web");
        let mut spec = cp.describe(&app).unwrap().app.spec;
        spec.secret_env.clear();
        assert_eq!(cp.apply(spec, false).unwrap().app.revision, 2);
        let e = cp.delete_secret("default", "db").unwrap_err();
        assert!(
            matches!(&e, ControlError::Conflict(m) if m.contains("revision 1 of app web")),
            "{e}"
        );
        cp.store()
            .txn(Txn::new().then(Op::delete(keys::replica(&app, &id))))
            .unwrap();
        cp.delete_secret("default", "db").unwrap();
        let e = cp.rollback(&app, Some(1)).unwrap_err();
        assert!(
            matches!(&e, ControlError::Conflict(m) if m.contains("deleted since")),
            "{e}"
        );
        assert_eq!(cp.describe(&app).unwrap().app.revision, 2);
    }

    #[test]
    fn values_go_to_the_replicas_node_only_and_a_damaged_one_is_refused_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        cp.put_secret("default", "db", write(true, &[("password", "s3cret")]))
            .unwrap();
        let (app, id) = app_on_node(&cp, "web");
        let got = cp.replica_secrets("node-1", &app, &id).unwrap();
        assert_eq!(got.env["PASSWORD"], "s3cret");
        let e = cp.replica_secrets("node-2", &app, &id).unwrap_err();
        assert!(e.to_string().contains("not placed on node node-2"), "{e}");

        // Flip one byte of the stored ciphertext: refused, saying which value, never served.
        let key = keys::secret("default", "db");
        let (mut secret, _) = cp.get(&key).unwrap().unwrap();
        let sealed = secret
            .versions
            .get_mut(&1)
            .unwrap()
            .data
            .get_mut("password")
            .unwrap();
        let first = if sealed.data.starts_with('0') {
            "1"
        } else {
            "0"
        };
        sealed.data.replace_range(0..1, first);
        cp.store()
            .txn(Txn::new().then(Op::put(key, encode(&secret))))
            .unwrap();
        let e = cp.replica_secrets("node-1", &app, &id).unwrap_err();
        assert!(matches!(e, ControlError::Unavailable(_)), "{e}");
        assert!(e.to_string().contains("version 1, key password"), "{e}");
    }

    #[test]
    fn versions_are_kept_while_a_revision_names_them_and_a_rotation_keeps_every_value() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        cp.put_secret("default", "db", write(true, &[("password", "v1")]))
            .unwrap();
        let (app, _) = app_on_node(&cp, "web");
        // Each change rolls the app: its revisions name versions 1, 2 and 3.
        for v in ["v2", "v3"] {
            let (view, rolled) = cp
                .put_secret("default", "db", write(false, &[("password", v)]))
                .unwrap();
            assert_eq!(rolled.unwrap(), std::slice::from_ref(&app));
            assert_eq!(view.used_by, ["web"]);
        }
        assert_eq!(cp.secret("default", "db").unwrap().versions, [1, 2, 3]);
        // The same value again: no new version, nothing rolls.
        let (view, rolled) = cp
            .put_secret("default", "db", write(false, &[("password", "v3")]))
            .unwrap();
        assert_eq!((view.version, rolled), (3, None));
        assert_eq!(cp.secret("default", "db").unwrap().versions, [1, 2, 3]);
        // A key the app does not read: a new version, and the app does not roll; it keeps
        // the version it names, which stays.
        let (view, rolled) = cp
            .put_secret("default", "db", write(false, &[("user", "admin")]))
            .unwrap();
        assert_eq!((view.version, rolled), (4, Some(vec![])));
        let pinned = |cp: &ControlPlane| {
            let now = cp.describe(&app).unwrap().app;
            (now.revision, now.spec.secret_env["PASSWORD"].version)
        };
        assert_eq!(pinned(&cp), (3, Some(3)));
        assert_eq!(cp.secret("default", "db").unwrap().versions, [1, 2, 3, 4]);
        // Nor when applied again, as a controller does when it starts: its value is the
        // latest version's.
        assert_eq!(
            cp.apply_references_again().unwrap(),
            std::slice::from_ref(&app)
        );
        assert_eq!(pinned(&cp), (3, Some(3)));
        // Nor by a controller started without the key file, which cannot compare values.
        let ring = std::mem::replace(
            &mut *cp.inner.secret_keys.write().unwrap(),
            Keys::Unavailable("no key file".into()),
        );
        assert_eq!(
            cp.apply_references_again().unwrap(),
            std::slice::from_ref(&app)
        );
        assert_eq!(pinned(&cp), (3, Some(3)));
        *cp.inner.secret_keys.write().unwrap() = ring;
        // Once nothing names the secret, old versions go at the next change.
        cp.delete_app(&app).unwrap();
        for r in cp.list::<Revision>(&keys::revisions_of(&app)).unwrap() {
            cp.store()
                .txn(Txn::new().then(Op::delete(keys::revision(&app, r.number))))
                .unwrap();
        }
        cp.put_secret("default", "db", write(false, &[("password", "v4")]))
            .unwrap();
        assert_eq!(cp.secret("default", "db").unwrap().versions, [4, 5]);

        let before = std::fs::read(dir.path().join("secret.key")).unwrap();
        let rotated = cp.rotate_secret_key().unwrap();
        assert_eq!((rotated.secrets, rotated.values), (1, 4));
        assert_ne!(
            std::fs::read(dir.path().join("secret.key")).unwrap(),
            before
        );
        // Opened with the new key alone, from the file, as a restart would.
        let ring = Keyring::load(&dir.path().join("secret.key"))
            .unwrap()
            .unwrap();
        assert_eq!(ring.len(), 1);
        let (secret, _) = cp.get(&keys::secret("default", "db")).unwrap().unwrap();
        assert_eq!(
            open_version(&ring, &secret, 5).unwrap()["password"].as_str(),
            "v4"
        );
        assert_eq!(
            open_version(&ring, &secret, 4).unwrap()["password"].as_str(),
            "v3"
        );
    }

    /// A secret deleted and made again does not start its versions over: a revision that
    /// named the old one's version 1 does not run with the new one's values.
    #[test]
    fn a_secret_made_again_goes_on_from_the_versions_revisions_name() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        cp.put_secret("default", "db", write(true, &[("password", "old")]))
            .unwrap();
        let (app, replica) = app_on_node(&cp, "web");
        let mut spec = cp.app(&app).unwrap().spec;
        spec.env.clear();
        spec.secret_env.clear();
        cp.apply(spec, false).unwrap();
        cp.store()
            .txn(Txn::new().then(Op::delete(keys::replica(&app, &replica))))
            .unwrap();
        cp.delete_secret("default", "db").unwrap();
        let (made, _) = cp
            .put_secret("default", "db", write(true, &[("password", "new")]))
            .unwrap();
        assert_eq!(made.version, 2);
        let refused = cp.rollback(&app, Some(1)).unwrap_err();
        assert!(
            refused.to_string().contains("which has been deleted since"),
            "{refused}"
        );
    }

    #[test]
    fn specs_naming_unknown_secrets_or_keys_are_refused_and_a_secret_in_use_stays() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let digest = uploaded(&cp);
        let src = format!(
            "name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[http]\nroutes = [\"/web\"]\n[config]\npw = {{ secret = \"db\", key = \"password\" }}\n"
        );
        let spec = parse_app(&src).unwrap().resolve(digest).unwrap();
        let e = cp.apply(spec.clone(), false).unwrap_err().to_string();
        assert!(
            e.contains("config.pw names secret db, which does not exist"),
            "{e}"
        );
        cp.put_secret("default", "db", write(true, &[("user", "u")]))
            .unwrap();
        let e = cp.apply(spec.clone(), false).unwrap_err().to_string();
        assert!(
            e.contains("key \"password\" of secret db, which has only user"),
            "{e}"
        );
        cp.put_secret("default", "db", write(false, &[("password", "p")]))
            .unwrap();
        cp.apply(spec, false).unwrap();
        let e = cp.delete_secret("default", "db").unwrap_err().to_string();
        assert!(e.contains("used by web"), "{e}");
        let e = cp
            .put_secret("default", "db", write(true, &[("x", "y")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exists"), "{e}");
        // A key an app names stays; one it does not name goes.
        let unset = |key: &str| SecretWrite {
            unset: vec![key.to_string()],
            ..write(false, &[])
        };
        let e = cp
            .put_secret("default", "db", unset("password"))
            .unwrap_err();
        assert!(matches!(e, ControlError::Conflict(_)), "{e:?}");
        assert!(e.to_string().contains("key password is used by web"), "{e}");
        let (view, _) = cp.put_secret("default", "db", unset("user")).unwrap();
        assert_eq!(view.keys, ["password"]);
    }
}
