//! Wasm components in OCI registries, in the layout wasm-pkg-tools (`wkg`)
//! writes: a manifest whose config has media type
//! `application/vnd.wasm.config.v0+json` and whose one layer is the component,
//! `application/wasm`. The control plane resolves and pulls with it at apply
//! (nodes never talk to a registry); `shoal push` writes the same layout.
//!
//! Loopback registries, and those the operator lists as insecure, speak plain
//! HTTP; every other registry HTTPS. A pull follows a registry's token service and
//! redirects over HTTP or HTTPS only, never from HTTPS to plain HTTP, and to this machine
//! or its link only as far as the registry is trusted (`Trust`, `may_follow`).

use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciEnvelope, OciErrorCode};
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
    OciDescriptor, OciImageManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use reqwest::Url;
use sha2::{Digest, Sha256};
use shoal_core::causes;
use shoal_core::oci::OciRef;
use std::net::IpAddr;
use thiserror::Error;

/// The config media type of a Wasm component artifact (the wkg convention).
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// The media type of the layer that is the component.
pub const WASM_LAYER: &str = "application/wasm";
/// The layer media type of the older wasm-to-oci convention, still pushed by some tools.
const LEGACY_WASM_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";

/// The most a manifest (or an index) may hold. A component's is under a kilobyte; a
/// registry that sends more is cut off there rather than fill the control plane's memory
/// (anyone who may apply may name any registry).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// The most a registry's token answer, or an error's body, may hold.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// How long a manifest's or a token's request may take, whole.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long a layer's download may take, whole, at least. Each read has 60 s, but a
/// registry that sends a byte now and then would hold the apply open for ever; ten minutes
/// fetches a module at the default 64 MiB limit at about 110 kB/s.
const LAYER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// The slowest download a larger layer is given time for (bytes per second), by the size
/// its manifest declares (which the caller holds to its module limit before asking): a server
/// whose `--max-module-size` was raised does not cut its own pulls at ten minutes.
const LAYER_BYTES_PER_SECOND: u64 = 112_000;
/// The most redirects a pull follows in one request (reqwest's default).
const MAX_REDIRECTS: usize = 10;
/// The manifests a pull asks for: OCI's and Docker's image manifests, and their
/// multi-platform indexes, since a tag may name one (a registry answers a tag whose
/// manifest is of no type asked for as unknown).
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";
/// The `os` of an index entry of architecture `wasm` that a pull takes, best first: a
/// component targets wasip2; older tools say `wasi` or `wasip1`.
const WASM_OSES: [&str; 3] = ["wasip2", "wasi", "wasip1"];
/// Why a pull does not follow a registry to an address of this machine or its link.
const LOCAL_REFUSED: &str = "where only a registry listed with --insecure-registry (which then speaks plain HTTP) may lead a pull";

/// How far a registry is trusted to send a pull, beyond the public addresses any registry
/// may send it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// A registry anyone who may apply named: nothing on this machine or its link.
    Public,
    /// One on loopback, which anyone may name too: to this machine (where it is), but not
    /// to its link (a cloud's metadata service).
    Loopback,
    /// One the operator listed with `--insecure-registry`: anywhere.
    Operator,
}

impl Trust {
    /// Whether an address of `kind` ([`local_address`]) is out of this registry's reach.
    fn refuses(self, kind: &str) -> bool {
        match self {
            Trust::Public => true,
            Trust::Loopback => kind != "loopback",
            Trust::Operator => false,
        }
    }
}

#[derive(Debug, Error)]
pub enum OciError {
    /// What the registry (or the way to it) said, every cause once: its errors repeat the
    /// words of their sources, which a cause chain would say again.
    /// `unreachable`: no connection was made (refused, timed out), so the registry is down
    /// or elsewhere rather than saying no.
    #[error("{reference}: {why}")]
    Registry {
        reference: String,
        why: String,
        unreachable: bool,
    },
    /// The registry wants credentials, or refused the ones given.
    #[error("{reference}: the registry refused {}", if *.anonymous { "anonymous access: it wants credentials" } else { "the credentials given" })]
    Unauthorized { reference: String, anonymous: bool },
    /// No manifest under that tag or digest (or no such repository).
    #[error("{reference}: the registry has no such tag or digest (manifest unknown)")]
    NotFound { reference: String },
    #[error("{reference} is not a Wasm component: {why}")]
    NotAComponent { reference: String, why: String },
    /// What the registry sent does not hash to the digest that named it.
    #[error("{reference}: the registry sent {what} with digest {got}, not {expected}")]
    DigestMismatch {
        reference: String,
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("{reference}: downloading the component failed: {why}")]
    Download { reference: String, why: String },
}

/// Whether `e` (or a cause of it) is an HTTP request that got no connection: refused, or
/// timed out before one. Some of the OCI client's errors keep only the text of the HTTP
/// client's, whose connect failures say `client error (Connect)`.
fn unconnected(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(cause) = next {
        if let Some(e) = cause.downcast_ref::<reqwest::Error>()
            && (e.is_connect() || e.is_timeout())
        {
            return true;
        }
        if cause.to_string().contains("client error (Connect)") {
            return true;
        }
        next = cause.source();
    }
    false
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

/// What a pull reads of an image index (or a Docker manifest list): its entries' digests
/// and platforms.
#[derive(serde::Deserialize)]
struct Index {
    manifests: Vec<IndexEntry>,
}

#[derive(serde::Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<Platform>,
}

#[derive(serde::Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(variant) => write!(f, "/{variant}"),
            None => Ok(()),
        }
    }
}

/// Whether a manifest the registry sent is an image index or a Docker manifest list: by
/// the media type its body gives, else by the one it was sent as (`content_type`).
fn is_index(body: &[u8], content_type: Option<&str>) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Typed {
        media_type: Option<String>,
    }
    let own = serde_json::from_slice::<Typed>(body)
        .ok()
        .and_then(|t| t.media_type);
    let sent = content_type.map(|c| c.split(';').next().unwrap_or(c).trim());
    own.as_deref()
        .or(sent)
        .is_some_and(|t| t == OCI_IMAGE_INDEX_MEDIA_TYPE || t == IMAGE_MANIFEST_LIST_MEDIA_TYPE)
}

/// The entry of `index` that is the component: the one of architecture `wasm` and an os
/// of [`WASM_OSES`] (the best), else the index's only entry if it names no other
/// architecture.
fn wasm_entry(index: &Index) -> Result<&IndexEntry, String> {
    let wasm = |e: &IndexEntry, os: Option<&str>| {
        e.platform
            .as_ref()
            .map(|p| p.architecture == "wasm" && os.is_none_or(|os| p.os == os))
    };
    let best = WASM_OSES.iter().find_map(|os| {
        index
            .manifests
            .iter()
            .find(|e| wasm(e, Some(os)) == Some(true))
    });
    if let Some(entry) = best {
        return Ok(entry);
    }
    if let [only] = index.manifests.as_slice()
        && wasm(only, None) != Some(false)
    {
        return Ok(only);
    }
    if index.manifests.is_empty() {
        return Err("it is a multi-platform index with no entries".into());
    }
    let platforms: Vec<String> = index
        .manifests
        .iter()
        .map(|e| match &e.platform {
            Some(p) => p.to_string(),
            None => "one with no platform".into(),
        })
        .collect();
    Err(format!(
        "it is a multi-platform index of {}; none is wasm",
        platforms.join(", ")
    ))
}

/// A reference resolved to what an apply pins.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The digest of the image manifest the layer is from: when the reference names a
    /// multi-platform index, that of its wasm entry, not the index's.
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

/// What kind of address of this machine or its link `ip` is, if it is one: loopback,
/// link-local (where clouds' metadata services answer) or unspecified (which reaches
/// this machine too).
fn local_address(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(ip) if ip.is_loopback() => Some("loopback"),
        IpAddr::V4(ip) if ip.is_link_local() => Some("link-local"),
        IpAddr::V6(ip) if ip.is_loopback() => Some("loopback"),
        IpAddr::V6(ip) if ip.is_unicast_link_local() => Some("link-local"),
        ip if ip.is_unspecified() => Some("unspecified"),
        _ => None,
    }
}

/// Why a pull may not follow a token realm or a redirect from `from` to `to`, if it may
/// not: `to` must be HTTP or HTTPS, never plain HTTP after HTTPS, and on this machine or
/// its link (the control plane's own API, a cloud's metadata service) only as far as the
/// registry is trusted ([`Trust`]): anyone who may apply names the registry, and so where
/// it sends the control plane. Names that resolve to such addresses are [`Resolver`]'s to
/// catch.
fn may_follow(trust: Trust, from: &Url, to: &Url) -> Result<(), String> {
    if !matches!(to.scheme(), "http" | "https") {
        return Err("is not HTTP or HTTPS".into());
    }
    if from.scheme() == "https" && to.scheme() != "https" {
        return Err(format!("is not HTTPS, though {from} is"));
    }
    let host = to.host_str().unwrap_or_default();
    let local = match host.trim_start_matches('[').trim_end_matches(']').parse() {
        Ok(ip) => local_address(ip),
        Err(_) => (host == "localhost" || host.ends_with(".localhost")).then_some("loopback"),
    };
    match local {
        Some(kind) if trust.refuses(kind) => {
            Err(format!("is on a {kind} address, {LOCAL_REFUSED}"))
        }
        _ => Ok(()),
    }
}

/// The system's resolver, but a name other than the registry's own (or a proxy's, from
/// the environment, as reqwest takes them) gets none of the addresses [`may_follow`]
/// refuses: a token realm or a redirect naming a host that resolves there would lead there
/// all the same. Not for registries the operator listed.
struct Resolver {
    /// The registry's host, and the proxies', whose addresses are someone's choice.
    chosen: Vec<String>,
    trust: Trust,
}

impl Resolver {
    fn new(registry: &str, trust: Trust) -> Resolver {
        let proxies = [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
        ]
        .into_iter()
        .filter_map(|var| std::env::var(var).ok())
        .filter_map(|proxy| {
            let proxy = match proxy.contains("://") {
                true => proxy,
                false => format!("http://{proxy}"),
            };
            Url::parse(&proxy).ok()?.host_str().map(str::to_string)
        });
        Resolver {
            chosen: std::iter::once(registry.to_string())
                .chain(proxies)
                .collect(),
            trust,
        }
    }
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let own = self
            .chosen
            .iter()
            .any(|h| name.as_str().eq_ignore_ascii_case(h));
        let (host, trust) = (name.as_str().to_string(), self.trust);
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let mut dropped = None;
            let kept: Vec<std::net::SocketAddr> = found
                .filter(|a| {
                    let local = match own {
                        true => None,
                        false => local_address(a.ip()).filter(|kind| trust.refuses(kind)),
                    };
                    dropped = dropped.or(local);
                    local.is_none()
                })
                .collect();
            match (kept.is_empty(), dropped) {
                (true, Some(kind)) => {
                    Err(format!("{host} resolves to a {kind} address, {LOCAL_REFUSED}").into())
                }
                _ => Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The HTTP client pulls go through: the platform's certificate verifier (the system's CA
/// store, as for pushes through oci-client: a company's registry with a certificate of its
/// own CA installed on the machine), timeouts for connecting and for each read, and
/// redirects and addresses held to [`may_follow`] for a registry at `registry` (its host),
/// trusted as far as `trust`.
fn pull_client(registry: &str, trust: Trust) -> reqwest::Client {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
        .expect("the platform's certificate verifier starts");
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth();
    // reqwest drops the Authorization header itself on a redirect to another host or port.
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        let from = attempt
            .previous()
            .last()
            .expect("reqwest lists the URL a redirect comes from");
        let verdict = may_follow(trust, from, attempt.url())
            .map_err(|why| format!("its redirect to {} {why}", attempt.url()));
        match verdict {
            Ok(()) => attempt.follow(),
            Err(why) => attempt.error(why),
        }
    });
    let mut client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(std::time::Duration::from_secs(60))
        .redirect(redirects);
    if trust != Trust::Operator {
        client = client.dns_resolver(std::sync::Arc::new(Resolver::new(registry, trust)));
    }
    client
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

/// A manifest or index as the registry sent it, its digest checked.
struct Fetched {
    digest: String,
    index: bool,
    body: Vec<u8>,
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
    /// How far the registry may send a pull ([`may_follow`]).
    trust: Trust,
    /// Its host, to tell its own answers from those of where it sent a pull.
    host: String,
    /// How long a layer's download may take, whole, at least: [`LAYER_TIMEOUT`] (tests
    /// shorten it); longer for a larger layer ([`LAYER_BYTES_PER_SECOND`]).
    layer_deadline: std::time::Duration,
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
        let trust = if insecure.contains(&reference.registry) {
            Trust::Operator
        } else if reference.is_loopback() {
            Trust::Loopback
        } else {
            Trust::Public
        };
        let plain = trust != Trust::Public;
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
        let host = Url::parse(&base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        Registry {
            client,
            reference: oci,
            name: reference.to_string(),
            auth: match credentials.clone() {
                Some(c) => RegistryAuth::Basic(c.username, c.password),
                None => RegistryAuth::Anonymous,
            },
            http: pull_client(&host, trust),
            base,
            trust,
            host,
            layer_deadline: LAYER_TIMEOUT,
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
                unreachable: unconnected(&source),
            }
        }
    }

    /// Fetches the manifest the reference names now and picks its component layer. A
    /// multi-platform index is followed one level, to its wasm entry.
    pub async fn resolve(&self) -> Result<Resolved, OciError> {
        let target = match (self.reference.digest(), self.reference.tag()) {
            (Some(digest), _) => digest,
            (None, tag) => tag.unwrap_or("latest"),
        };
        let not_a_component = |why| OciError::NotAComponent {
            reference: self.name.clone(),
            why,
        };
        let mut fetched = self.manifest(target, self.reference.digest()).await?;
        if fetched.index {
            let index: Index = serde_json::from_slice(&fetched.body)
                .map_err(|e| not_a_component(format!("its index does not parse: {e}")))?;
            let entry = wasm_entry(&index).map_err(not_a_component)?;
            if shoal_core::Digest::parse(&entry.digest).is_err() {
                return Err(not_a_component(format!(
                    "its index's wasm entry has digest {}, not a sha256 one",
                    entry.digest
                )));
            }
            fetched = self.manifest(&entry.digest, Some(&entry.digest)).await?;
            if fetched.index {
                return Err(not_a_component(format!(
                    "its index's wasm entry {} is an index itself: one level of index is followed, no more",
                    entry.digest
                )));
            }
        }
        let manifest: OciImageManifest = serde_json::from_slice(&fetched.body)
            .map_err(|e| not_a_component(format!("its manifest is no image manifest: {e}")))?;
        let layer = component_layer(&manifest).map_err(not_a_component)?.clone();
        Ok(Resolved {
            manifest: fetched.digest,
            layer,
        })
    }

    /// The manifest or index under `target` (a tag or digest), read within
    /// [`MAX_MANIFEST_BYTES`] and checked against `pinned` (a digest the reference or an
    /// index names) and the one the registry announces.
    async fn manifest(&self, target: &str, pinned: Option<&str>) -> Result<Fetched, OciError> {
        let url = format!(
            "{}/v2/{}/manifests/{target}",
            self.base,
            self.reference.repository()
        );
        let response = self.get(&url, Some(MANIFEST_TYPES), ANSWER_TIMEOUT).await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        // Checked when it is a sha256 one, the only kind computed here.
        let announced = header("docker-content-digest").filter(|d| d.starts_with("sha256:"));
        let content_type = header("content-type");
        let body = bounded(response, MAX_MANIFEST_BYTES)
            .await
            .map_err(|why| self.failed(format!("reading its manifest: {why}")))?;
        let digest = sha256(&body);
        let index = is_index(&body, content_type.as_deref());
        for expected in [pinned, announced.as_deref()].into_iter().flatten() {
            if expected != digest {
                return Err(OciError::DigestMismatch {
                    reference: self.name.clone(),
                    what: if index { "an index" } else { "a manifest" },
                    expected: expected.to_string(),
                    got: digest,
                });
            }
        }
        Ok(Fetched {
            digest,
            index,
            body,
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
        let response = self.get(&url, None, self.layer_time(layer.size)).await?;
        Ok(response.bytes_stream().map_err(|e| causes(&e)).boxed())
    }

    /// How long a layer of `size` declared bytes may take to download.
    fn layer_time(&self, size: i64) -> std::time::Duration {
        let size = u64::try_from(size).unwrap_or(0);
        self.layer_deadline.max(std::time::Duration::from_secs(
            size / LAYER_BYTES_PER_SECOND,
        ))
    }

    /// GETs `url`, the answer's body included within `deadline`, answering the registry's
    /// challenge once if it asks for credentials: basic, or a bearer token from its token
    /// service. Only a success comes back; any other answer is the error it means.
    async fn get(
        &self,
        url: &str,
        accept: Option<&str>,
        deadline: std::time::Duration,
    ) -> Result<reqwest::Response, OciError> {
        let mut challenged = false;
        loop {
            let mut request = self.http.get(url).timeout(deadline);
            if let Some(accept) = accept {
                request = request.header(http::header::ACCEPT, accept);
            }
            if let Some(authorization) = self.held() {
                request = request.header(http::header::AUTHORIZATION, authorization);
            }
            let response = request.send().await.map_err(|e| self.unanswered(&e))?;
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
                if let Some(answer) = self.answer(challenge.as_deref(), response.url()).await? {
                    *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(answer);
                    continue;
                }
            }
            return Err(self.refused(response).await);
        }
    }

    /// What to send for `challenge` (a `WWW-Authenticate` header of the answer from
    /// `from`), if anything: the credentials, as basic, or a token the challenge's realm
    /// gives for them (or for anyone, as public registries give one).
    async fn answer(
        &self,
        challenge: Option<&str>,
        from: &Url,
    ) -> Result<Option<http::HeaderValue>, OciError> {
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
        // Held to what a redirect is: never plain HTTP after HTTPS, so the credentials do
        // not go in plain text where the registry is spoken to over TLS.
        let to = Url::parse(realm)
            .map_err(|e| self.failed(format!("its token service {realm} is no URL: {e}")))?;
        may_follow(self.trust, from, &to)
            .map_err(|why| self.failed(format!("its token service {realm} {why}")))?;
        let mut request = self.http.get(to).query(&query).timeout(ANSWER_TIMEOUT);
        if let Some(c) = &self.credentials {
            request = request.header(http::header::AUTHORIZATION, c.basic());
        }
        let response = request.send().await.map_err(|e| self.unanswered(&e))?;
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
        // Where the registry sent the pull (a blob store, a CDN) answered, not the registry:
        // its 403 or 404 says nothing of credentials or tags.
        if let Some(host) = response
            .url()
            .host_str()
            .filter(|h| !h.eq_ignore_ascii_case(&self.host))
        {
            return self.failed(format!(
                "where the registry sent the pull, {host}, answered {status}"
            ));
        }
        let body = bounded(response, MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        let errors = serde_json::from_slice::<OciEnvelope>(&body)
            .map(|e| e.errors)
            .unwrap_or_default();
        let has = |wanted: &[OciErrorCode]| errors.iter().any(|e| wanted.contains(&e.code));
        if matches!(status.as_u16(), 401 | 403)
            || has(&[OciErrorCode::Unauthorized, OciErrorCode::Denied])
        {
            return OciError::Unauthorized {
                reference: self.name.clone(),
                anonymous: self.credentials.is_none(),
            };
        }
        if has(&[OciErrorCode::ManifestUnknown, OciErrorCode::NameUnknown])
            || (status == http::StatusCode::NOT_FOUND && errors.is_empty())
        {
            return OciError::NotFound {
                reference: self.name.clone(),
            };
        }
        // Only the messages of its OCI errors: a body of any other kind may be a page of a
        // service the registry sent the pull to, not for the user to read.
        let said = errors
            .iter()
            .map(|e| e.message.trim())
            .filter(|m| !m.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let said: String = said.chars().take(200).collect();
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
            unreachable: false,
        }
    }

    /// A request that got no answer: `unreachable` if it got no connection either.
    fn unanswered(&self, e: &reqwest::Error) -> OciError {
        OciError::Registry {
            reference: self.name.clone(),
            why: causes(e),
            unreachable: unconnected(e),
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
    use axum::Router;
    use axum::response::{IntoResponse, Redirect};
    use axum::routing::get;
    use std::time::Duration;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    /// Serves `router` on a loopback port; its `127.0.0.1:PORT`.
    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        addr.to_string()
    }

    #[test]
    fn a_pull_follows_http_or_https_only_and_never_from_https_to_plain_http() {
        let https = url("https://registry.example/v2/team/hello/manifests/1");
        for trust in [Trust::Public, Trust::Loopback, Trust::Operator] {
            let e = may_follow(trust, &https, &url("http://auth.example/token")).unwrap_err();
            assert!(
                e.contains("is not HTTPS") && e.contains("https://registry.example/"),
                "{e}"
            );
            for to in ["file:///etc/passwd", "ftp://auth.example/token"] {
                let e = may_follow(trust, &https, &url(to)).unwrap_err();
                assert!(e.contains("not HTTP or HTTPS"), "{to}: {e}");
            }
            assert_eq!(
                may_follow(trust, &https, &url("https://auth.example/token")),
                Ok(())
            );
        }
        let http = url("http://10.0.0.5:5000/v2/team/hello/manifests/1");
        for to in ["http://10.0.0.5:5001/token", "https://auth.example/token"] {
            assert_eq!(may_follow(Trust::Operator, &http, &url(to)), Ok(()), "{to}");
        }
    }

    /// A registry anyone may name leads a pull nowhere on this machine or its link; one on
    /// loopback (anyone may name that too) to this machine but not its link; one the
    /// operator listed anywhere.
    #[test]
    fn only_a_registry_the_operator_listed_leads_a_pull_to_this_machine_or_its_link() {
        let from = url("https://registry.example/v2/team/hello/manifests/1");
        let plain_from = url("http://127.0.0.1:5000/v2/team/hello/manifests/1");
        for (to, kind) in [
            ("https://127.0.0.1:8443/v1/apps", "loopback"),
            ("https://127.9.9.9/", "loopback"),
            ("https://[::1]/", "loopback"),
            ("https://[::ffff:127.0.0.1]/", "loopback"),
            ("https://localhost:8443/", "loopback"),
            ("https://api.localhost/", "loopback"),
            ("https://169.254.169.254/latest/meta-data/", "link-local"),
            ("https://[fe80::1]/", "link-local"),
            ("https://0.0.0.0:8443/", "unspecified"),
            ("https://[::]/", "unspecified"),
        ] {
            let e = may_follow(Trust::Public, &from, &url(to)).unwrap_err();
            assert!(
                e.contains(&format!("is on a {kind} address")) && e.contains("--insecure-registry"),
                "{to}: {e}"
            );
            let loopback = may_follow(Trust::Loopback, &plain_from, &url(to));
            assert_eq!(loopback.is_ok(), kind == "loopback", "{to}: {loopback:?}");
            assert_eq!(
                may_follow(Trust::Operator, &plain_from, &url(to)),
                Ok(()),
                "{to}"
            );
        }
        // Private networks are where companies' registries live.
        for to in [
            "https://10.1.2.3/token",
            "https://192.168.0.10:5000/v2/",
            "https://172.16.0.1/",
            "https://auth.docker.io/token",
        ] {
            assert_eq!(may_follow(Trust::Public, &from, &url(to)), Ok(()), "{to}");
        }
    }

    #[tokio::test]
    async fn names_other_than_the_registry_s_resolve_to_no_address_of_this_machine() {
        use reqwest::dns::Resolve as _;
        let other = Resolver::new("registry.example", Trust::Public);
        match other.resolve("localhost".parse().unwrap()).await {
            Ok(found) => panic!("localhost resolved to {:?}", found.collect::<Vec<_>>()),
            Err(e) => assert!(
                e.to_string()
                    .contains("localhost resolves to a loopback address"),
                "{e}"
            ),
        }
        let own = Resolver::new("localhost", Trust::Public);
        let found: Vec<_> = own
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(
            !found.is_empty() && found.iter().all(|a| a.ip().is_loopback()),
            "{found:?}"
        );
    }

    #[tokio::test]
    async fn redirects_are_followed_ten_times_and_to_this_machine_only_from_a_plain_registry() {
        // `/hop/N` redirects to `/hop/N-1`; `/hop/0` answers.
        let addr = serve(Router::new().route(
            "/hop/{n}",
            get(
                |axum::extract::Path(n): axum::extract::Path<u32>| async move {
                    match n {
                        0 => "here".into_response(),
                        n => Redirect::temporary(&format!("/hop/{}", n - 1)).into_response(),
                    }
                },
            ),
        ))
        .await;
        let plain = pull_client("127.0.0.1", Trust::Loopback);
        let ok = plain
            .get(format!("http://{addr}/hop/10"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.text().await.unwrap(), "here");
        let e = plain
            .get(format!("http://{addr}/hop/11"))
            .send()
            .await
            .unwrap_err();
        assert!(
            causes(&e).contains("more than 10 redirects"),
            "{}",
            causes(&e)
        );

        // A registry elsewhere sending the pull to this machine, by address or by name.
        let not_plain = pull_client("registry.example", Trust::Public);
        let e = not_plain
            .get(format!("http://{addr}/hop/1"))
            .send()
            .await
            .unwrap_err();
        let said = causes(&e);
        assert!(
            said.contains(&format!(
                "its redirect to http://{addr}/hop/0 is on a loopback address"
            )),
            "{said}"
        );
        let port = addr.rsplit(':').next().unwrap();
        let e = not_plain
            .get(format!("http://localhost:{port}/hop/0"))
            .send()
            .await
            .unwrap_err();
        let said = causes(&e);
        assert!(
            said.contains("localhost resolves to a loopback address"),
            "{said}"
        );
    }

    #[tokio::test]
    async fn a_token_service_on_this_machine_is_asked_only_for_a_plain_registry() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = component_config(b"x", "2026-01-01T00:00:00Z");
        let manifest = serde_json::to_vec(&component_manifest(b"x", &config)).unwrap();
        let challenge = format!("Bearer realm=\"http://{addr}/token\",service=\"test\"");
        let router = Router::new()
            .route(
                "/token",
                get(|| async { axum::Json(serde_json::json!({"token": "t"})) }),
            )
            .route(
                "/v2/team/hello/manifests/1",
                get(move |headers: http::HeaderMap| async move {
                    match headers.get(http::header::AUTHORIZATION) {
                        Some(v) if v == "Bearer t" => manifest.clone().into_response(),
                        _ => (
                            http::StatusCode::UNAUTHORIZED,
                            [(http::header::WWW_AUTHENTICATE, challenge)],
                        )
                            .into_response(),
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

        let plain = Registry::new(
            &OciRef::parse(&format!("{addr}/team/hello:1")).unwrap(),
            &[],
            None,
        );
        assert_eq!(plain.resolve().await.unwrap().layer.digest, sha256(b"x"));
        // A registry elsewhere whose challenge names this machine's token service (its
        // requests go to the same server).
        let mut elsewhere = Registry::new(
            &OciRef::parse("registry.example/team/hello:1").unwrap(),
            &[],
            None,
        );
        elsewhere.base = format!("http://{addr}");
        let e = elsewhere.resolve().await.unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "its token service http://{addr}/token is on a loopback address"
            )),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_layer_that_never_ends_is_cut_off_at_its_deadline() {
        // A byte every 20 ms: no read waits long, the whole never ends.
        let dribble = || {
            axum::body::Body::from_stream(futures::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b" ")), ()))
            }))
        };
        let addr = serve(Router::new().route(
            "/v2/team/hello/blobs/{digest}",
            get(move || async move { dribble() }),
        ))
        .await;
        let reference = OciRef::parse(&format!("{addr}/team/hello:1")).unwrap();
        let mut registry = Registry::new(&reference, &[], None);
        registry.layer_deadline = Duration::from_secs(3);
        let layer = component_manifest(b"x", b"{}").layers.remove(0);
        let mut bytes = registry.layer(&layer).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(chunk) = bytes.next().await {
                chunk?;
            }
            Ok::<(), String>(())
        })
        .await
        .expect("the download outlived its deadline");
        let e = read.unwrap_err();
        assert!(e.contains("timed out"), "{e}");
    }

    /// A layer past what ten minutes fetch at the slowest rate given gets longer, by its
    /// declared size; a smaller or unsized one the ten minutes.
    #[test]
    fn a_larger_layer_gets_longer_to_download() {
        let reference = OciRef::parse("registry.example/team/hello:1").unwrap();
        let registry = Registry::new(&reference, &[], None);
        assert_eq!(registry.layer_time(64 << 20), LAYER_TIMEOUT);
        assert_eq!(registry.layer_time(-1), LAYER_TIMEOUT);
        assert_eq!(
            registry.layer_time(1 << 30),
            Duration::from_secs((1 << 30) / LAYER_BYTES_PER_SECOND)
        );
        assert!(registry.layer_time(1 << 30) > Duration::from_secs(9_000));
    }

    /// A refusal says the registry's OCI error messages, never a body of another kind.
    #[tokio::test]
    async fn a_refusal_says_the_registrys_error_messages_and_no_other_body() {
        let addr = serve(
            Router::new()
                .route(
                    "/v2/team/page/manifests/{tag}",
                    get(|| async {
                        (
                            http::StatusCode::INTERNAL_SERVER_ERROR,
                            "<html>internal admin page: token=s3cret</html>",
                        )
                    }),
                )
                .route(
                    "/v2/team/oci/manifests/{tag}",
                    get(|| async {
                        (
                            http::StatusCode::TOO_MANY_REQUESTS,
                            r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"pull rate limit"}]}"#,
                        )
                    }),
                ),
        )
        .await;
        let said = |repository: &str| {
            let reference = OciRef::parse(&format!("{addr}/team/{repository}:1")).unwrap();
            async move {
                Registry::new(&reference, &[], None)
                    .resolve()
                    .await
                    .unwrap_err()
                    .to_string()
            }
        };
        let page = said("page").await;
        assert!(
            page.ends_with("the registry answered 500 Internal Server Error"),
            "{page}"
        );
        let oci = said("oci").await;
        assert!(
            oci.ends_with("the registry answered 429 Too Many Requests: pull rate limit"),
            "{oci}"
        );
    }

    /// A registry nothing listens for is unreachable, for a pull and a push alike: down or
    /// elsewhere, not a registry saying no.
    #[tokio::test]
    async fn a_registry_that_takes_no_connection_is_unreachable() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let reference = OciRef::parse(&format!("{addr}/team/hello:1")).unwrap();
        let insecure = [reference.registry.clone()];
        let registry = Registry::new(&reference, &insecure, None);
        let pulled = registry.resolve().await.unwrap_err();
        let pushed = registry.push(b"\0asm").await.unwrap_err();
        for e in [pulled, pushed] {
            assert!(
                matches!(
                    e,
                    OciError::Registry {
                        unreachable: true,
                        ..
                    }
                ),
                "{e}"
            );
        }
    }

    /// What answers after a redirect (a blob store, a CDN) is not the registry: its 403 is
    /// no refusal of credentials, nor its 404 an unknown tag.
    #[tokio::test]
    async fn an_answer_from_where_the_registry_sent_the_pull_is_said_to_be_from_there() {
        let store =
            serve(Router::new().route("/blob", get(|| async { http::StatusCode::FORBIDDEN })))
                .await;
        let port = store.rsplit(':').next().unwrap().to_string();
        let addr = serve(Router::new().route(
            "/v2/team/hello/manifests/{tag}",
            get(move || {
                let to = format!("http://localhost:{port}/blob");
                async move { Redirect::temporary(&to) }
            }),
        ))
        .await;
        let reference = OciRef::parse(&format!("{addr}/team/hello:1")).unwrap();
        let e = Registry::new(&reference, &[], None)
            .resolve()
            .await
            .unwrap_err();
        assert!(
            matches!(&e, OciError::Registry { why, .. }
                if why == "where the registry sent the pull, localhost, answered 403 Forbidden"),
            "{e}"
        );
    }

    fn index(platforms: serde_json::Value) -> Index {
        let manifests: Vec<_> = platforms
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, platform)| {
                serde_json::json!({
                    "mediaType": OCI_IMAGE_MEDIA_TYPE,
                    "digest": format!("sha256:{i:064}"),
                    "size": 1,
                    "platform": platform,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({"schemaVersion": 2, "manifests": manifests}))
            .unwrap()
    }

    #[test]
    fn the_wasm_entry_of_an_index_is_taken() {
        let picked = |platforms| wasm_entry(&index(platforms)).map(|e| e.digest.clone());
        let nth = |i: usize| Ok(format!("sha256:{i:064}"));
        let linux = serde_json::json!({"os": "linux", "architecture": "amd64"});
        let wasm = |os: &str| serde_json::json!({"os": os, "architecture": "wasm"});
        assert_eq!(
            picked(serde_json::json!([linux, wasm("wasip2"), linux])),
            nth(1)
        );
        assert_eq!(
            picked(serde_json::json!([wasm("wasip1"), wasm("wasip2")])),
            nth(1)
        );
        assert_eq!(picked(serde_json::json!([linux, wasm("wasi")])), nth(1));
        // An only entry is taken unless it names another architecture.
        assert_eq!(picked(serde_json::json!([null])), nth(0));
        assert_eq!(picked(serde_json::json!([wasm("wasip3")])), nth(0));

        let refused = |platforms| wasm_entry(&index(platforms)).err().unwrap();
        assert_eq!(
            refused(serde_json::json!([linux])),
            "it is a multi-platform index of linux/amd64; none is wasm"
        );
        let arm = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert_eq!(
            refused(serde_json::json!([linux, arm, null, wasm("wasip3")])),
            "it is a multi-platform index of linux/amd64, linux/arm64/v8, one with no platform, wasip3/wasm; none is wasm"
        );
        assert!(refused(serde_json::json!([])).contains("no entries"));
    }

    #[test]
    fn an_index_is_told_by_its_own_media_type_else_by_the_one_it_came_as() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        let manifest = serde_json::to_vec(&component_manifest(b"x", b"{}")).unwrap();
        let untyped = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(is_index(index, None));
        assert!(is_index(index, Some(OCI_IMAGE_MEDIA_TYPE)));
        assert!(!is_index(&manifest, Some(OCI_IMAGE_INDEX_MEDIA_TYPE)));
        assert!(is_index(
            untyped,
            Some("application/vnd.docker.distribution.manifest.list.v2+json; charset=utf-8")
        ));
        assert!(!is_index(untyped, None));
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
