//! Wasm components in OCI registries, in the layout wasm-pkg-tools (`wkg`)
//! writes: a manifest whose config has media type
//! `application/vnd.wasm.config.v0+json` and whose one layer is the component,
//! `application/wasm`. The control plane resolves and pulls with it at apply
//! (nodes never talk to a registry); `shoal push` writes the same layout.
//!
//! Loopback registries, and those the operator lists as insecure, speak plain
//! HTTP; every other registry HTTPS.

use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use shoal_core::oci::OciRef;
use thiserror::Error;

/// The config media type of a Wasm component artifact (the wkg convention).
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// The media type of the layer that is the component.
pub const WASM_LAYER: &str = "application/wasm";
/// The layer media type of the older wasm-to-oci convention, still pushed by some tools.
const LEGACY_WASM_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";

/// The most a manifest may hold. A component's is under a kilobyte; a registry that sends
/// more is cut off there rather than fill the control plane's memory (anyone who may apply
/// may name any registry).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// The most a registry's token answer, or an error's body, may hold.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// How long a manifest's or a token's request may take, whole.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The manifests a pull asks for: OCI's and Docker's image manifests.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Error)]
pub enum OciError {
    /// What the registry (or the way to it) said, every cause once: its errors repeat the
    /// words of their sources, which a cause chain would say again.
    #[error("{reference}: {why}")]
    Registry { reference: String, why: String },
    /// The registry wants credentials, or refused the ones given.
    #[error("{reference}: the registry refused {}", if *.anonymous { "anonymous access: it wants credentials" } else { "the credentials given" })]
    Unauthorized { reference: String, anonymous: bool },
    /// No manifest under that tag or digest (or no such repository).
    #[error("{reference}: the registry has no such tag or digest (manifest unknown)")]
    NotFound { reference: String },
    #[error("{reference} is not a Wasm component: {why}")]
    NotAComponent { reference: String, why: String },
    /// What the registry sent does not hash to the digest that named it.
    #[error("{reference}: the registry sent a {what} with digest {got}, not {expected}")]
    DigestMismatch {
        reference: String,
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("{reference}: downloading the component failed: {why}")]
    Download { reference: String, why: String },
}

/// `e` and its sources, each said once: one that repeats the words of the one before is
/// left out, and one whose words the one before ends with is too.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut said: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let words = cause.to_string();
        if !said.last().is_some_and(|last| last.ends_with(&words)) {
            said.push(words);
        }
        next = cause.source();
    }
    said.join(": ")
}

/// The layer of `manifest` that is the component: its only layer, of a Wasm media
/// type. The config's media type is not required to be Wasm's, so plain
/// single-layer `application/wasm` images are accepted too.
pub fn component_layer(manifest: &OciImageManifest) -> Result<&OciDescriptor, String> {
    let types = || {
        manifest
            .layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match manifest.layers.as_slice() {
        [layer] if layer.media_type == WASM_LAYER || layer.media_type == LEGACY_WASM_LAYER => {
            Ok(layer)
        }
        [_] => Err(format!(
            "its layer is {}, not {WASM_LAYER} (config {})",
            types(),
            manifest.config.media_type
        )),
        layers => Err(format!(
            "it has {} layers ({}), a component artifact has one, of type {WASM_LAYER}",
            layers.len(),
            types()
        )),
    }
}

/// The manifest `shoal push` writes for `component` (a Wasm component's bytes) with
/// `config` as its config blob, and that config's bytes.
pub fn component_manifest(component: &[u8], config: &[u8]) -> OciImageManifest {
    let descriptor = |media_type: &str, data: &[u8]| OciDescriptor {
        media_type: media_type.to_string(),
        digest: sha256(data),
        size: data.len() as i64,
        ..Default::default()
    };
    OciImageManifest {
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
        config: descriptor(WASM_CONFIG, config),
        layers: vec![descriptor(WASM_LAYER, component)],
        ..Default::default()
    }
}

/// The config blob of the wkg layout: what wkg itself writes, minus the
/// component's WIT summary, which no reader requires.
pub fn component_config(component: &[u8], created: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "created": created,
        "architecture": "wasm",
        "os": "wasip2",
        "layerDigests": [sha256(component)],
    }))
    .expect("a JSON value serialises")
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A reference resolved to what an apply pins.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The manifest's digest.
    pub manifest: String,
    /// The component layer: its digest is the module's.
    pub layer: OciDescriptor,
}

/// A user name and password for a registry's basic or token authentication,
/// as `docker login` takes them.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    /// An `Authorization` header of these, basic.
    fn basic(&self) -> http::HeaderValue {
        use base64::Engine as _;
        let pair = format!("{}:{}", self.username, self.password);
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut value = http::HeaderValue::try_from(format!("Basic {encoded}"))
            .expect("base64 is a header value");
        value.set_sensitive(true);
        value
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The HTTP client pulls go through: the platform's certificate verifier (the system's CA
/// store, as for pushes through oci-client: a company's registry with a certificate of its
/// own CA installed on the machine), and timeouts for connecting and for each read.
fn pull_client() -> reqwest::Client {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
        .expect("the platform's certificate verifier starts");
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("the pull client's settings are valid")
}

/// `response`'s body, if it holds at most `limit` bytes.
async fn bounded(response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(format!("it is larger than {limit} bytes"));
    }
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| causes(&e))?;
        if body.len() + chunk.len() > limit {
            return Err(format!("it is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The `key="value"` (or `key=value`) pairs of a challenge, comma-separated.
fn challenge_params(text: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.split_once('"') {
                Some((value, next)) => (value, next),
                None => (quoted, ""),
            },
            None => after.split_once(',').unwrap_or((after, "")),
        };
        params.push((key, value.to_string()));
        rest = next.trim_start().trim_start_matches(',');
    }
    params
}

/// One registry conversation about one reference (the client keeps the
/// registry's token between the manifest and the blob). Pulls (`resolve`, `layer`) are
/// Shoal's own requests, every answer read within a bound; pushes go through oci-client.
pub struct Registry {
    client: Client,
    reference: Reference,
    name: String,
    auth: RegistryAuth,
    http: reqwest::Client,
    /// `https://host` or `http://host:port`: where the registry's API is.
    base: String,
    credentials: Option<Credentials>,
    /// What the registry took last: a bearer token got for this conversation, or basic.
    authorization: std::sync::Mutex<Option<http::HeaderValue>>,
}

impl Registry {
    /// `insecure`: registries (`host:port`) that speak plain HTTP besides loopback ones.
    /// Without `credentials` the registry is asked anonymously.
    pub fn new(
        reference: &OciRef,
        insecure: &[String],
        credentials: Option<Credentials>,
    ) -> Registry {
        let plain = reference.is_loopback() || insecure.contains(&reference.registry);
        let protocol = if plain {
            ClientProtocol::HttpsExcept(vec![reference.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        // oci-client's HTTP client takes the process's default rustls provider; ring is the
        // one every other TLS connection of Shoal uses (an error: one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        });
        let (registry, repository) = (reference.registry.clone(), reference.repository.clone());
        let oci = match (&reference.tag, &reference.digest) {
            (Some(t), Some(d)) => {
                Reference::with_tag_and_digest(registry, repository, t.clone(), d.clone())
            }
            (None, Some(d)) => Reference::with_digest(registry, repository, d.clone()),
            (Some(t), None) => Reference::with_tag(registry, repository, t.clone()),
            (None, None) => Reference::with_tag(registry, repository, "latest".into()),
        };
        let scheme = if plain { "http" } else { "https" };
        let base = format!("{scheme}://{}", oci.resolve_registry());
        Registry {
            client,
            reference: oci,
            name: reference.to_string(),
            auth: match credentials.clone() {
                Some(c) => RegistryAuth::Basic(c.username, c.password),
                None => RegistryAuth::Anonymous,
            },
            http: pull_client(),
            base,
            credentials,
            authorization: std::sync::Mutex::new(None),
        }
    }

    /// `source` as what it means to whoever wrote the reference: refused access and an
    /// unknown tag are said plainly, anything else keeps the registry's words.
    fn registry_error(&self, source: OciDistributionError) -> OciError {
        let reference = self.name.clone();
        let codes = |codes: &[OciErrorCode]| match &source {
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.iter().any(|e| codes.contains(&e.code))
            }
            _ => false,
        };
        let unauthorized = matches!(
            source,
            OciDistributionError::UnauthorizedError { .. }
                | OciDistributionError::AuthenticationFailure(_)
                | OciDistributionError::ServerError {
                    code: 401 | 403,
                    ..
                }
        ) || codes(&[OciErrorCode::Unauthorized, OciErrorCode::Denied]);
        let unknown = matches!(source, OciDistributionError::ImageManifestNotFoundError(_))
            || codes(&[OciErrorCode::ManifestUnknown, OciErrorCode::NameUnknown]);
        if unauthorized {
            OciError::Unauthorized {
                reference,
                anonymous: matches!(self.auth, RegistryAuth::Anonymous),
            }
        } else if unknown {
            OciError::NotFound { reference }
        } else {
            OciError::Registry {
                reference,
                why: causes(&source),
            }
        }
    }

    /// Fetches the manifest the reference names now and picks its component layer.
    pub async fn resolve(&self) -> Result<Resolved, OciError> {
        let target = match (self.reference.digest(), self.reference.tag()) {
            (Some(digest), _) => digest,
            (None, tag) => tag.unwrap_or("latest"),
        };
        let url = format!(
            "{}/v2/{}/manifests/{target}",
            self.base,
            self.reference.repository()
        );
        let response = self.get(&url, Some(MANIFEST_TYPES), true).await?;
        // Checked when it is a sha256 one, the only kind computed here.
        let announced = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| d.starts_with("sha256:"))
            .map(str::to_string);
        let body = bounded(response, MAX_MANIFEST_BYTES)
            .await
            .map_err(|why| self.failed(format!("reading its manifest: {why}")))?;
        let digest = sha256(&body);
        for expected in [self.reference.digest(), announced.as_deref()]
            .into_iter()
            .flatten()
        {
            if expected != digest {
                return Err(OciError::DigestMismatch {
                    reference: self.name.clone(),
                    what: "manifest",
                    expected: expected.to_string(),
                    got: digest,
                });
            }
        }
        let manifest: OciImageManifest =
            serde_json::from_slice(&body).map_err(|e| OciError::NotAComponent {
                reference: self.name.clone(),
                why: format!("its manifest is no image manifest: {e}"),
            })?;
        let layer = component_layer(&manifest)
            .map_err(|why| OciError::NotAComponent {
                reference: self.name.clone(),
                why,
            })?
            .clone();
        Ok(Resolved {
            manifest: digest,
            layer,
        })
    }

    /// The bytes of `layer`, as they arrive; the caller bounds and hashes them.
    pub async fn layer(
        &self,
        layer: &OciDescriptor,
    ) -> Result<BoxStream<'static, Result<bytes::Bytes, String>>, OciError> {
        let url = format!(
            "{}/v2/{}/blobs/{}",
            self.base,
            self.reference.repository(),
            layer.digest
        );
        let response = self.get(&url, None, false).await?;
        Ok(response.bytes_stream().map_err(|e| causes(&e)).boxed())
    }

    /// GETs `url` (within [`ANSWER_TIMEOUT`] if `whole`), answering the registry's challenge
    /// once if it asks for credentials: basic, or a bearer token from its token service.
    /// Only a success comes back; any other answer is the error it means.
    async fn get(
        &self,
        url: &str,
        accept: Option<&str>,
        whole: bool,
    ) -> Result<reqwest::Response, OciError> {
        let mut challenged = false;
        loop {
            let mut request = self.http.get(url);
            if whole {
                request = request.timeout(ANSWER_TIMEOUT);
            }
            if let Some(accept) = accept {
                request = request.header(http::header::ACCEPT, accept);
            }
            if let Some(authorization) = self.held() {
                request = request.header(http::header::AUTHORIZATION, authorization);
            }
            let response = request.send().await.map_err(|e| self.failed(causes(&e)))?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status == http::StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let challenge = response
                    .headers()
                    .get(http::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                if let Some(answer) = self.answer(challenge.as_deref()).await? {
                    *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(answer);
                    continue;
                }
            }
            return Err(self.refused(response).await);
        }
    }

    /// What to send for `challenge` (a `WWW-Authenticate` header), if anything: the
    /// credentials, as basic, or a token the challenge's realm gives for them (or for
    /// anyone, as public registries give one).
    async fn answer(&self, challenge: Option<&str>) -> Result<Option<http::HeaderValue>, OciError> {
        let Some(challenge) = challenge else {
            return Ok(None);
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Ok(self.credentials.as_ref().map(Credentials::basic));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Ok(None);
        }
        let params = challenge_params(params);
        let Some(realm) = params.iter().find(|(k, _)| k == "realm").map(|(_, v)| v) else {
            return Ok(None);
        };
        let scope = format!("repository:{}:pull", self.reference.repository());
        let mut query: Vec<(&str, &str)> = vec![("scope", &scope)];
        if let Some((_, service)) = params.iter().find(|(k, _)| k == "service") {
            query.push(("service", service));
        }
        let mut request = self.http.get(realm).query(&query).timeout(ANSWER_TIMEOUT);
        if let Some(c) = &self.credentials {
            // Not in plain text to a realm, when the registry itself is spoken to over TLS.
            if self.base.starts_with("https://") && !realm.starts_with("https://") {
                return Err(self.failed(format!(
                    "its token service {realm} is not HTTPS: the credentials are not sent there"
                )));
            }
            request = request.header(http::header::AUTHORIZATION, c.basic());
        }
        let response = request.send().await.map_err(|e| self.failed(causes(&e)))?;
        let status = response.status();
        if matches!(status.as_u16(), 401 | 403) {
            return Err(OciError::Unauthorized {
                reference: self.name.clone(),
                anonymous: self.credentials.is_none(),
            });
        }
        if !status.is_success() {
            return Err(self.failed(format!("its token service {realm} answered {status}")));
        }
        let body = bounded(response, MAX_ANSWER_BYTES)
            .await
            .map_err(|why| self.failed(format!("reading its token service's answer: {why}")))?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token = serde_json::from_slice(&body)
            .map_err(|e| self.failed(format!("its token service answered no token: {e}")))?;
        let Some(token) = token.token.or(token.access_token) else {
            return Err(self.failed("its token service answered no token".to_string()));
        };
        http::HeaderValue::try_from(format!("Bearer {token}"))
            .map(Some)
            .map_err(|_| self.failed("its token service answered a token that is no header".into()))
    }

    /// The error a registry's answer other than a success means, from its status and the
    /// OCI error codes of its body (read within a bound).
    async fn refused(&self, response: reqwest::Response) -> OciError {
        let status = response.status();
        let body = bounded(response, MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        let codes: Vec<OciErrorCode> = serde_json::from_slice::<OciEnvelope>(&body)
            .map(|e| e.errors.into_iter().map(|e| e.code).collect())
            .unwrap_or_default();
        let has = |wanted: &[OciErrorCode]| codes.iter().any(|c| wanted.contains(c));
        if matches!(status.as_u16(), 401 | 403)
            || has(&[OciErrorCode::Unauthorized, OciErrorCode::Denied])
        {
            return OciError::Unauthorized {
                reference: self.name.clone(),
                anonymous: self.credentials.is_none(),
            };
        }
        if has(&[OciErrorCode::ManifestUnknown, OciErrorCode::NameUnknown])
            || (status == http::StatusCode::NOT_FOUND && codes.is_empty())
        {
            return OciError::NotFound {
                reference: self.name.clone(),
            };
        }
        let said = String::from_utf8_lossy(&body);
        let said: String = said.trim().chars().take(200).collect();
        self.failed(match said.is_empty() {
            true => format!("the registry answered {status}"),
            false => format!("the registry answered {status}: {said}"),
        })
    }

    /// What the registry took last, to send again.
    fn held(&self) -> Option<http::HeaderValue> {
        self.authorization
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn failed(&self, why: String) -> OciError {
        OciError::Registry {
            reference: self.name.clone(),
            why,
        }
    }

    /// Pushes `component` under the reference in the wkg layout; returns the
    /// manifest's digest.
    pub async fn push(&self, component: &[u8]) -> Result<String, OciError> {
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let config = component_config(component, &created);
        let manifest = component_manifest(component, &config);
        self.client
            .store_auth_if_needed(self.reference.resolve_registry(), &self.auth)
            .await;
        self.client
            .push_blob(
                &self.reference,
                component.to_vec(),
                &manifest.layers[0].digest,
            )
            .await
            .map_err(|e| self.registry_error(e))?;
        self.client
            .push_blob(&self.reference, config, &manifest.config.digest)
            .await
            .map_err(|e| self.registry_error(e))?;
        let body = serde_json::to_vec(&manifest).expect("a manifest serialises");
        let digest = sha256(&body);
        self.client
            .push_manifest_raw(
                &self.reference,
                body,
                http::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE),
            )
            .await
            .map_err(|e| self.registry_error(e))?;
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once() {
        #[derive(Debug)]
        struct Said(&'static str, Option<Box<Said>>);
        impl std::fmt::Display for Said {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Said {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|s| s as _)
            }
        }
        let chain = Said(
            "error sending request for url (http://r/v2/)",
            Some(Box::new(Said(
                "error sending request for url (http://r/v2/)",
                Some(Box::new(Said("Connection refused", None))),
            ))),
        );
        assert_eq!(
            causes(&chain),
            "error sending request for url (http://r/v2/): Connection refused"
        );
    }

    #[test]
    fn the_pushed_layout_is_the_one_read() {
        let component = b"\0asm\x0d\0\x01\0";
        let config = component_config(component, "2026-01-01T00:00:00Z");
        let manifest = component_manifest(component, &config);
        assert_eq!(manifest.config.media_type, WASM_CONFIG);
        assert_eq!(manifest.config.digest, sha256(&config));
        let layer = component_layer(&manifest).unwrap();
        assert_eq!(layer.digest, sha256(component));
        assert_eq!(layer.size, component.len() as i64);
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(config["layerDigests"][0], sha256(component));
    }

    #[test]
    fn plain_and_legacy_wasm_images_are_components_other_images_are_not() {
        let mut m = component_manifest(b"x", b"{}");
        m.config.media_type = "application/vnd.oci.image.config.v1+json".into();
        assert!(component_layer(&m).is_ok());
        m.layers[0].media_type = LEGACY_WASM_LAYER.into();
        assert!(component_layer(&m).is_ok());

        m.layers[0].media_type = "application/vnd.oci.image.layer.v1.tar+gzip".into();
        let e = component_layer(&m).unwrap_err();
        assert!(e.contains("tar+gzip") && e.contains(WASM_LAYER), "{e}");

        let mut two = component_manifest(b"x", b"{}");
        two.layers.push(two.layers[0].clone());
        assert!(component_layer(&two).unwrap_err().contains("2 layers"));
        two.layers.clear();
        assert!(component_layer(&two).unwrap_err().contains("0 layers"));
    }
}
