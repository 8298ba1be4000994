//! Components from OCI registries: an apply of a spec with `component.oci`
//! resolves the reference to the module it names now and pulls that module into
//! the module store once, validated as an upload is. Nodes then fetch it from
//! the control plane as any module; none talks to a registry.
//!
//! A registry that wants credentials gets them from the secret the spec names in
//! `[component] pull_secret` (`registry`, `username`, `password`), opened for the pull
//! only, and only if the secret says it is for the registry the reference names: a
//! reference changed to another host never carries the credentials there.

use crate::error::ControlError;
use crate::state::ControlPlane;
use shoal_core::objects::keys;
use shoal_core::oci::OciRef;
use shoal_core::problem::ErrorCode;
use shoal_core::spec::{REGISTRY_KEY, REGISTRY_PASSWORD_KEY, REGISTRY_USERNAME_KEY};
use shoal_core::{App, AppSpec, Module, OciOrigin, Secret, SpecError};
use shoal_oci::{Credentials, OciError, Registry};
use shoal_store::BlobError;

/// `e` as the apply's error; `pull_secret` is the secret whose credentials were given.
fn registry_error(e: OciError, pull_secret: Option<&str>) -> ControlError {
    let code = match e {
        OciError::NotAComponent { .. } => ErrorCode::NotAComponent,
        // Credentials the registry refused are the spec's to mend (its pull secret), not an
        // outage to wait out: the CLI says 1, not 5.
        OciError::NotFound { .. } | OciError::Unauthorized { .. } => ErrorCode::InvalidSpec,
        OciError::Registry { .. } | OciError::DigestMismatch { .. } | OciError::Download { .. } => {
            ErrorCode::Registry
        }
    };
    let hint = match (&e, pull_secret) {
        (OciError::Unauthorized { .. }, None) => " (name a secret with its credentials in `[component] pull_secret`: `shoal secret create NAME --registry HOST --username USER --password-stdin`)".to_string(),
        (OciError::Unauthorized { .. }, Some(name)) => format!(
            " (from pull secret {name}: change them with `shoal secret set {name} --registry HOST --username USER --password-stdin`)"
        ),
        _ => String::new(),
    };
    // A registry that cannot be reached says why only deep in the chain (connection
    // refused, no such host): the message carries every cause it does not already say.
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let said = c.to_string();
        if !message.contains(&said) {
            message = format!("{message}: {said}");
        }
        cause = c.source();
    }
    message.push_str(&hint);
    ControlError::Invalid {
        code,
        field: Some("component.oci".into()),
        message,
    }
}

impl ControlPlane {
    /// Pins `spec` to the module its OCI reference names now (a no-op for a spec
    /// without one), pulling the module unless the store has it or this is a dry run.
    /// On any failure nothing is stored.
    pub(crate) async fn resolve_oci(
        &self,
        mut spec: AppSpec,
        dry_run: bool,
    ) -> Result<AppSpec, ControlError> {
        let Some(written) = spec.component.oci.clone() else {
            return Ok(spec);
        };
        let reference =
            OciRef::parse(&written).map_err(|m| SpecError::field("component.oci", m))?;
        // The rest of the spec is judged before the registry is asked: a spec refused
        // anyway pulls nothing.
        let mut probe = spec.clone();
        probe.component.digest = format!("sha256:{}", "0".repeat(64));
        probe.validate()?;
        // The app applied again as it is, pinned by a manifest digest, needs no registry: what
        // a digest names never changes, and this app pulled it with these credentials (a
        // GitOps loop goes on through a registry's outage, as kubectl's apply never asks one).
        if reference.digest.is_some()
            && let Some((app, _)) = self.get::<App>(&keys::app(&spec.key()))?
            && app.spec.component.oci.as_deref() == Some(written.as_str())
            && app.spec.pull_secret == spec.pull_secret
            && self
                .get::<Module>(&keys::module(&app.spec.component.digest))?
                .is_some()
        {
            spec.component.digest = app.spec.component.digest;
            return Ok(spec);
        }
        let credentials = match &spec.pull_secret {
            Some(name) => Some(self.pull_credentials(&spec.namespace, name, &reference)?),
            None => None,
        };
        let registry = Registry::new(&reference, &self.config().insecure_registries, credentials);
        let pull_secret = spec.pull_secret.clone();
        let registry_error = |e| registry_error(e, pull_secret.as_deref());
        let resolved = registry.resolve().await.map_err(registry_error)?;
        let digest = resolved.layer.digest.clone();
        if digest.parse::<shoal_core::Digest>().is_err() {
            return Err(registry_error(OciError::NotAComponent {
                reference: written,
                why: format!("its layer digest {digest} is not sha256"),
            }));
        }
        let limit = self.config().max_module_bytes;
        let too_large = || ControlError::Invalid {
            code: ErrorCode::TooLarge,
            field: Some("component.oci".into()),
            message: format!(
                "{written}: the component is larger than the {limit}-byte module limit (set --max-module-size on the server to raise it)"
            ),
        };
        if u64::try_from(resolved.layer.size).is_ok_and(|size| size > limit) {
            return Err(too_large());
        }
        spec.component.digest = digest.clone();
        if dry_run || self.get::<Module>(&keys::module(&digest))?.is_some() {
            return Ok(spec);
        }
        let stream = registry
            .layer(&resolved.layer)
            .await
            .map_err(registry_error)?;
        let put = self
            .blobs()
            .put_stream(stream, limit)
            .await
            .map_err(|e| match e {
                BlobError::TooLarge { .. } => too_large(),
                BlobError::Stream(why) => registry_error(OciError::Download {
                    reference: written.clone(),
                    why,
                }),
                other => ControlError::internal(other),
            })?;
        if put.digest != digest {
            if !put.existed {
                self.blobs()
                    .delete(&put.digest)
                    .map_err(ControlError::internal)?;
            }
            return Err(registry_error(OciError::DigestMismatch {
                reference: written,
                what: "a layer",
                expected: digest,
                got: put.digest,
            }));
        }
        let cp = self.clone();
        let origin = OciOrigin {
            reference: written.clone(),
            manifest: resolved.manifest,
        };
        crate::state::blocking(move || {
            cp.register_module(&put.digest, put.size, put.existed, Some(origin))
        })
        .await
        .map_err(|e| match e {
            ControlError::Invalid { code, message, .. } => ControlError::Invalid {
                code,
                field: Some("component.oci".into()),
                message: format!("{written}: {message}"),
            },
            other => other,
        })?;
        Ok(spec)
    }
}

impl ControlPlane {
    /// The credentials pull secret `name` of namespace `ns` holds for `reference`'s
    /// registry; refused, naming what is wrong, if it lacks them or is for another registry.
    fn pull_credentials(
        &self,
        ns: &str,
        name: &str,
        reference: &OciRef,
    ) -> Result<Credentials, ControlError> {
        let bad = |message: String| ControlError::Invalid {
            code: ErrorCode::InvalidSpec,
            field: Some("component.pull_secret".into()),
            message,
        };
        let Some((secret, _)) = self.get::<Secret>(&keys::secret(ns, name))? else {
            return Err(bad(format!(
                "component.pull_secret names secret {name}, which does not exist in namespace {ns}: create it with `shoal secret create {name} --registry {} --username USER --password-stdin`",
                reference.registry
            )));
        };
        let mut values = self.open_secret(&secret)?;
        let mut take = |key: &str| {
            values.remove(key).ok_or_else(|| {
                bad(format!(
                    "secret {name} has no key {key}: a pull secret holds {REGISTRY_KEY}, {REGISTRY_USERNAME_KEY} and {REGISTRY_PASSWORD_KEY} (`shoal secret create {name} --registry HOST --username USER --password-stdin`)"
                ))
            })
        };
        let (registry, username, password) = (
            take(REGISTRY_KEY)?,
            take(REGISTRY_USERNAME_KEY)?,
            take(REGISTRY_PASSWORD_KEY)?,
        );
        if *registry != reference.registry {
            return Err(bad(format!(
                "secret {name} holds credentials for registry {}, not {}, which {reference} names",
                *registry, reference.registry
            )));
        }
        Ok(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        })
    }
}
