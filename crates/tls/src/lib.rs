//! The cluster's certificate authority, the TLS settings made from it, and the files secrets
//! are kept in (`write_private`).
//!
//! `shoal up` and `shoal server` keep one CA in their data dir (`ca.pem`, and `ca-key.pem`
//! readable by its owner only) and issue the API's certificate from it at every start, for the
//! names and addresses the API is reached at. Clients trust the CA, not a public root: the CLI
//! from its config (as kubeconfig carries its CA), a node from what it fetched when it joined,
//! checked against the CA's hash that the join token carries (as k3s does).
//!
//! The cluster's members also prove who they are to each other with it. A node makes its own
//! key ([`NodeKey`]), which never leaves it, and the control plane signs a certificate for it
//! ([`Authority::issue_node`]); the control plane gives itself one ([`Authority::issue_client`]).
//! A hop between gateways, or the control plane reading a node's logs, goes over TLS where
//! both ends present such a certificate and trust nothing but the cluster CA ([`mutual`]).
//!
//! What the CA issues is valid for a bounded time ([`Authority::valid_for`], 30 days unless
//! told otherwise), as kubelet's certificates are: the API's certificate, each node's and the
//! control plane's own are renewed two thirds into it and swapped in place ([`LiveCert`]),
//! so a certificate taken from a node lasts no longer than that, and a node the cluster has
//! deleted, which can no longer renew, is refused by expiry as well as by membership.
//!
//! The gateway's public side may serve TLS too, with certificates the operator gives it
//! ([`ingress_config`]) and those apps name for their route hosts ([`HostCertificate`],
//! from secrets), chosen by the host name the client asks for (SNI).

mod files;

pub use files::write_private;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// How long what the CA issues is valid, unless told otherwise.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Pem(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The cluster's certificate authority.
pub struct Authority {
    /// As stored: what clients trust and what its hash is taken of.
    pem: String,
    /// The same CA made again from `pem` and its key, to sign with: its subject and key are
    /// the stored one's, so what it signs chains to the stored certificate.
    issuer: Certificate,
    key: KeyPair,
    /// How long what it issues is valid.
    validity: Duration,
}

/// Shows which CA, never its key.
impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("hash", &self.hash().unwrap_or_default())
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// The CA in `dir` (`ca.pem`, `ca-key.pem`), made there first if it is not.
    pub fn load_or_create(dir: &Path) -> Result<Authority, TlsError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        if cert_path.exists() {
            let pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            let issuer = CertificateParams::from_ca_cert_pem(&pem)?.self_signed(&key)?;
            return Ok(Authority {
                pem,
                issuer,
                key,
                validity: DEFAULT_VALIDITY,
            });
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, CLUSTER_CA);
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_after = rcgen::date_time_ymd(2100, 1, 1);
        let issuer = params.self_signed(&key)?;
        let pem = issuer.pem();
        // The key first: a CA certificate without its key would be loaded and fail to sign.
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        write_private(&cert_path, pem.as_bytes()).map_err(io(&cert_path))?;
        Ok(Authority {
            pem,
            issuer,
            key,
            validity: DEFAULT_VALIDITY,
        })
    }

    /// The same CA, issuing certificates valid for `validity` from now on.
    pub fn valid_for(self, validity: Duration) -> Authority {
        Authority { validity, ..self }
    }

    /// Sets how long `params` is valid: from a little before now, for clocks behind this
    /// one (a tenth of the validity at most, so two thirds into it is still before its end),
    /// to the CA's validity from now.
    fn stamp(&self, params: &mut CertificateParams) {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - (self.validity / 10).min(Duration::from_secs(300));
        params.not_after = now + self.validity;
    }

    /// The CA certificate, PEM: what clients trust.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The CA's hash, as a join token carries it.
    pub fn hash(&self) -> Result<String, TlsError> {
        ca_hash(&self.pem)
    }

    /// A certificate for a server reached at `names` (host names or IP addresses), with a key
    /// of its own.
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, TlsError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            names.first().map_or("shoal", String::as_str),
        );
        params.distinguished_name = name;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign_with_new_key(params)
    }

    /// The control plane's API certificate for `names`: a server certificate named
    /// [`CONTROL_PLANE`], which no node's can be, so that [`api_client`] tells it from the
    /// certificates this CA signs for nodes.
    pub fn issue_api(&self, names: &[String]) -> Result<Issued, TlsError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = member_name(CONTROL_PLANE);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign_with_new_key(params)
    }

    /// Signs `params` for a key made here; the certificate and that key.
    fn sign_with_new_key(&self, mut params: CertificateParams) -> Result<Issued, TlsError> {
        let key = KeyPair::generate()?;
        self.stamp(&mut params);
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(Issued {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }

    /// Signs node `node`'s request (`csr`, PEM) for the names and addresses it is reached at,
    /// as both server and client: a gateway is the one and the other on hops. Only the
    /// request's key is taken; what the certificate says is decided here. Returns PEM.
    pub fn issue_node(&self, csr: &str, node: &str, hosts: &[String]) -> Result<String, TlsError> {
        let request = CertificateSigningRequestParams::from_pem(csr)?;
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name = member_name(node);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.stamp(&mut params);
        Ok(params
            .signed_by(&request.public_key, &self.issuer, &self.key)?
            .pem())
    }

    /// A client certificate for `name`, with a key of its own: the control plane's, for
    /// reading nodes' logs.
    pub fn issue_client(&self, name: &str) -> Result<Issued, TlsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = member_name(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_with_new_key(params)
    }
}

/// The name in the control plane's certificates (its API's, and the client one it reads
/// nodes' logs with): not a valid node name, so no node can be it.
pub const CONTROL_PLANE: &str = "shoal:control-plane";

/// The common name of the CA [`Authority::load_or_create`] makes.
const CLUSTER_CA: &str = "Shoal cluster CA";

/// The TLS client side for a control plane's API whose CA is `ca` (PEM). When `ca` is a
/// Shoal cluster CA the server must present the control plane's own certificate
/// ([`Authority::issue_api`]), not merely one of the CA's: the CA also signs every node's,
/// for whatever addresses the node says it has, so a node's key would otherwise let it pose
/// as the API to whoever's traffic it can intercept, and take their tokens. Any other CA (a
/// proxy's in front of the API) is trusted as usual.
pub fn api_client(ca: &str) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut cluster = false;
    for der in certificates_der(ca)? {
        cluster |= member_of(&der).as_deref() == Some(CLUSTER_CA);
        roots.add(CertificateDer::from(der))?;
    }
    let roots = Arc::new(roots);
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    if !cluster {
        return Ok(config.with_root_certificates(roots).with_no_client_auth());
    }
    let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Pem(format!("the cluster CA cannot check servers: {e}")))?;
    Ok(config
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MemberVerifier {
            chain,
            member: CONTROL_PLANE.to_string(),
        }))
        .with_no_client_auth())
}

/// Whose certificate `der` is: the node (or [`CONTROL_PLANE`]) it was issued to, as its
/// common name says. Only meaningful for a certificate the handshake checked against the
/// cluster CA.
pub fn member_of(der: &[u8]) -> Option<String> {
    let params = CertificateParams::from_ca_cert_der(&CertificateDer::from(der)).ok()?;
    match params.distinguished_name.get(&DnType::CommonName)? {
        rcgen::DnValue::Utf8String(name) => Some(name.clone()),
        rcgen::DnValue::PrintableString(name) => Some(name.as_str().to_string()),
        _ => None,
    }
}

fn member_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "shoal cluster members");
    dn
}

/// A node's own key, made on the node and kept there: the control plane gets only a request
/// to sign ([`NodeKey::request`]).
pub struct NodeKey {
    key: KeyPair,
}

impl NodeKey {
    pub fn generate() -> Result<NodeKey, TlsError> {
        Ok(NodeKey {
            key: KeyPair::generate()?,
        })
    }

    /// A certificate signing request for node `node`, PEM.
    pub fn request(&self, node: &str) -> Result<String, TlsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = member_name(node);
        Ok(params.serialize_request(&self.key)?.pem()?)
    }

    /// The key with the certificate (PEM) the control plane signed for it.
    pub fn with_certificate(&self, pem: &str) -> Result<Issued, TlsError> {
        Ok(Issued {
            cert: CertificateDer::from(ca_der(pem)?),
            key: PrivatePkcs8KeyDer::from(self.key.serialize_der()),
        })
    }
}

/// A certificate and its key.
pub struct Issued {
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Issued {
    /// The certificate and key as PEM, as files given to a server would hold them.
    pub fn keyed_chain(&self) -> KeyedChain {
        KeyedChain {
            chain: pem::encode(&pem::Pem::new("CERTIFICATE", self.cert.to_vec())),
            key: pem::encode(&pem::Pem::new(
                "PRIVATE KEY",
                self.key.secret_pkcs8_der().to_vec(),
            )),
        }
    }
}

/// When the certificate `der` is valid: from, until.
pub fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), TlsError> {
    let params = CertificateParams::from_ca_cert_der(&CertificateDer::from(der))?;
    Ok((
        SystemTime::from(params.not_before),
        SystemTime::from(params.not_after),
    ))
}

/// When the certificate `der` is to be renewed, two thirds into its validity (kubelet
/// renews 70 to 90 % into it), and when it expires.
fn renewal(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (from, until) = validity(der)?;
    let span = until.duration_since(from).unwrap_or_default();
    Ok((from + span * 2 / 3, until))
}

/// A certificate with its key that handshakes present, replaced in place by a renewal: the
/// connections made after [`LiveCert::replace`] present the new one, those open keep theirs.
#[derive(Clone, Debug)]
pub struct LiveCert(Arc<RwLock<Presented>>);

#[derive(Debug)]
struct Presented {
    key: Arc<rustls::sign::CertifiedKey>,
    renew_at: SystemTime,
    expires: SystemTime,
}

impl Presented {
    fn of(issued: &Issued) -> Result<Presented, TlsError> {
        let key = rustls::sign::CertifiedKey::from_der(
            vec![issued.cert.clone()],
            PrivateKeyDer::Pkcs8(issued.key.clone_key()),
            &provider(),
        )
        .map_err(|e| TlsError::Pem(format!("the certificate and its key: {e}")))?;
        let (renew_at, expires) = renewal(&issued.cert)?;
        Ok(Presented {
            key: Arc::new(key),
            renew_at,
            expires,
        })
    }
}

impl LiveCert {
    pub fn new(issued: &Issued) -> Result<LiveCert, TlsError> {
        Ok(LiveCert(Arc::new(RwLock::new(Presented::of(issued)?))))
    }

    /// Presents `issued` from the next handshake on, if its key is its certificate's;
    /// otherwise keeps the one in use.
    pub fn replace(&self, issued: &Issued) -> Result<(), TlsError> {
        let presented = Presented::of(issued)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = presented;
        Ok(())
    }

    /// When the certificate presented now is due for renewal.
    pub fn renew_at(&self) -> SystemTime {
        self.0.read().unwrap_or_else(|p| p.into_inner()).renew_at
    }

    /// When the certificate presented now expires.
    pub fn expires(&self) -> SystemTime {
        self.0.read().unwrap_or_else(|p| p.into_inner()).expires
    }

    fn presented(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).key.clone()
    }
}

impl rustls::server::ResolvesServerCert for LiveCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.presented())
    }
}

impl rustls::client::ResolvesClientCert for LiveCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.presented())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The crypto every Shoal TLS setting uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS settings for a server presenting `cert`, speaking HTTP/2 and HTTP/1.1.
pub fn server_config(cert: &LiveCert) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(cert.clone()));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Both ends of a connection between cluster members: each presents `issued` and trusts no
/// certificate but those of the cluster CA `ca` (PEM), on either side.
#[derive(Debug, Clone)]
pub struct Mutual {
    /// Requires a client certificate of the cluster; speaks HTTP/2 and HTTP/1.1.
    pub server: Arc<rustls::ServerConfig>,
    /// Presents `issued`; sets no ALPN (the HTTP client says what it speaks).
    client: rustls::ClientConfig,
    /// Checks a server's chain against the cluster CA and its name against the address.
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    /// What both sides present, renewed in place.
    cert: LiveCert,
}

impl Mutual {
    /// The client side for reaching node `node`: the server must also present that node's
    /// own certificate. A node may be issued a certificate for any address it says it has,
    /// so the address alone would let one node pose as another to a peer whose traffic
    /// it can intercept; the name in the certificate is the one the CA gave the node it
    /// authenticated.
    pub fn client_for(&self, node: &str) -> rustls::ClientConfig {
        let mut config = self.client.clone();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(MemberVerifier {
                chain: self.chain.clone(),
                member: node.to_string(),
            }));
        config
    }

    /// The certificate both sides present, to renew.
    pub fn cert(&self) -> &LiveCert {
        &self.cert
    }
}

/// A server verifier that takes only the certificate the cluster CA issued to `member` (a
/// node, as [`Mutual::client_for`] makes it, or the control plane, as [`api_client`] does).
#[derive(Debug)]
struct MemberVerifier {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    member: String,
}

impl rustls::client::danger::ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match member_of(end_entity.as_ref()) {
            Some(name) if name == self.member => Ok(verified),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// Both ends of connections between cluster members presenting `issued`, trusting only the
/// cluster CA `ca`.
pub fn mutual(issued: &Issued, ca: &str) -> Result<Mutual, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der(ca)?))?;
    let roots = Arc::new(roots);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Pem(format!("the cluster CA cannot check clients: {e}")))?;
    let cert = LiveCert::new(issued)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(cert.clone()));
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let checks_chain =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Pem(format!("the cluster CA cannot check servers: {e}")))?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(cert.clone()));
    Ok(Mutual {
        server: Arc::new(server),
        client,
        chain: checks_chain,
        cert,
    })
}

/// A certificate chain and its private key, PEM, for the gateway's public side.
pub struct KeyedChain {
    pub chain: String,
    pub key: String,
}

/// TLS settings for the gateway's public side. Each client gets the first certificate that
/// names the host it asks for (SNI, wildcards included): an app's ([`IngressCerts::set_hosts`])
/// before one of `certs`; else the first of `certs`; HTTP/2 and HTTP/1.1. Every chain must
/// have its own key. With no `certs`, only hosts that apps have certificates for get TLS.
/// The [`IngressCerts`] swaps the certificates in place, for the connections that follow.
pub fn ingress_config(
    certs: &[KeyedChain],
) -> Result<(Arc<rustls::ServerConfig>, IngressCerts), TlsError> {
    let files = if certs.is_empty() {
        Vec::new()
    } else {
        keyed(certs)?
    };
    let resolver = Arc::new(BySni {
        files: std::sync::RwLock::new(files),
        hosts: std::sync::RwLock::new(Vec::new()),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), IngressCerts(resolver)))
}

/// The certificates of an [`ingress_config`], to replace without a restart (a renewal).
#[derive(Clone, Debug)]
pub struct IngressCerts(Arc<BySni>);

impl IngressCerts {
    /// Serves `certs` from the next handshake on, if every one of them is good; otherwise
    /// keeps the ones in use and says why.
    pub fn replace(&self, certs: &[KeyedChain]) -> Result<(), TlsError> {
        let keyed = keyed(certs)?;
        *self.0.files.write().unwrap_or_else(|p| p.into_inner()) = keyed;
        Ok(())
    }

    /// Serves `certs`, the apps' certificates for their route hosts, from the next handshake
    /// on, in place of the ones set before.
    pub fn set_hosts(&self, certs: Vec<HostCertificate>) {
        *self.0.hosts.write().unwrap_or_else(|p| p.into_inner()) = certs;
    }
}

/// A certificate chain with its key, checked to belong together and to name given hosts:
/// what an app's `[http] tls` secret holds, for its route hosts. It is served for those
/// hosts alone, whatever else it names: an app's certificate naming another namespace's
/// host (or `*.example.com`) must not be what that host's clients get.
#[derive(Debug)]
pub struct HostCertificate {
    key: Arc<rustls::sign::CertifiedKey>,
    hosts: Vec<String>,
}

impl HostCertificate {
    /// `chain` checked: its key is its certificate's, and the certificate names every one of
    /// `hosts` (directly or by a wildcard).
    pub fn new(chain: &KeyedChain, hosts: &[String]) -> Result<HostCertificate, TlsError> {
        let key = keyed_one(chain, "")?;
        for host in hosts {
            let name = rustls::pki_types::ServerName::try_from(host.as_str())
                .map_err(|e| TlsError::Pem(format!("{host:?} is no host name: {e}")))?;
            if !BySni::names(&key, &name) {
                return Err(TlsError::Pem(format!(
                    "the certificate does not name {host} (or it is no server certificate that can be checked)"
                )));
            }
        }
        Ok(HostCertificate {
            key,
            hosts: hosts.to_vec(),
        })
    }

    /// Whether this certificate is served to a client asking for `name` (SNI): one of its
    /// hosts, as DNS names compare, case aside.
    fn serves(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }
}

/// Each chain with its key, checked to belong together.
fn keyed(certs: &[KeyedChain]) -> Result<Vec<Arc<rustls::sign::CertifiedKey>>, TlsError> {
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate given".into()));
    }
    certs
        .iter()
        .enumerate()
        .map(|(i, c)| keyed_one(c, &format!(" {}", i + 1)))
        .collect()
}

/// A chain and its key, checked to belong together; `n` numbers them in a refusal
/// ("certificate 2 and its key: …").
fn keyed_one(c: &KeyedChain, n: &str) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let chain =
        certificates_der(&c.chain).map_err(|e| TlsError::Pem(format!("certificate{n}: {e}")))?;
    let key: PrivateKeyDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(c.key.as_bytes())
            .map_err(|e| TlsError::Pem(format!("key{n}: not a PEM private key: {e}")))?;
    let chain = chain.into_iter().map(CertificateDer::from).collect();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| TlsError::Pem(format!("certificate{n} and its key: {e}")))
}

/// Picks the certificate that names the host a client asks for; see [`ingress_config`].
#[derive(Debug)]
struct BySni {
    /// The operator's (`--gateway-cert`); the first is for clients no other one suits.
    files: std::sync::RwLock<Vec<Arc<rustls::sign::CertifiedKey>>>,
    /// The apps', each for its route hosts only.
    hosts: std::sync::RwLock<Vec<HostCertificate>>,
}

impl BySni {
    fn names(key: &rustls::sign::CertifiedKey, host: &rustls::pki_types::ServerName<'_>) -> bool {
        key.end_entity_cert()
            .ok()
            .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
            .is_some_and(|cert| cert.verify_is_valid_for_subject_name(host).is_ok())
    }
}

impl rustls::server::ResolvesServerCert for BySni {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = hello.server_name();
        let hosts = self.hosts.read().unwrap_or_else(|p| p.into_inner());
        if let Some(app) = name.and_then(|name| hosts.iter().find(|c| c.serves(name))) {
            return Some(app.key.clone());
        }
        let asked = name.and_then(|name| rustls::pki_types::ServerName::try_from(name).ok());
        let files = self.files.read().unwrap_or_else(|p| p.into_inner());
        asked
            .and_then(|host| files.iter().find(|key| Self::names(key, &host)))
            .or_else(|| files.first())
            .cloned()
    }
}

/// The DER bytes of the certificate in `pem`.
pub fn ca_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    let der: CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map_err(|e| TlsError::Pem(format!("not a PEM certificate: {e}")))?;
    Ok(der.to_vec())
}

/// Every certificate in `pem`, DER: a bundle of CAs, say.
pub fn certificates_der(pem: &str) -> Result<Vec<Vec<u8>>, TlsError> {
    let certs = rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
        .map(|c: Result<CertificateDer<'static>, _>| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate in it".into()));
    }
    Ok(certs)
}

/// The hash of the CA certificate in `pem`: the hex SHA-256 of its DER bytes. `pem` must hold
/// that one certificate: a hash pins one, and a bundle's others would be trusted beside it.
pub fn ca_hash(pem: &str) -> Result<String, TlsError> {
    Ok(hex::encode(Sha256::digest(only_certificate_der(pem)?)))
}

/// `pem`'s one certificate, as a PEM file of it alone (whatever else the text held, such as
/// other kinds of PEM block, left out): what a joining node keeps of the CA it checked by its
/// [`ca_hash`].
pub fn only_certificate(pem: &str) -> Result<String, TlsError> {
    let certificate = pem::Pem::new("CERTIFICATE", only_certificate_der(pem)?);
    let lf = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    Ok(pem::encode_config(&certificate, lf))
}

fn only_certificate_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    let mut certs = certificates_der(pem)?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        n => Err(TlsError::Pem(format!(
            "{n} certificates where one CA's is expected"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn the_ca_is_made_once_and_what_it_issues_chains_to_the_stored_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let first = Authority::load_or_create(dir.path()).unwrap();
        let again = Authority::load_or_create(dir.path()).unwrap();
        assert_eq!(first.pem(), again.pem());
        assert_eq!(first.hash().unwrap(), again.hash().unwrap());
        assert_eq!(first.hash().unwrap().len(), 64);
        let mode = |f: &str| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca-key.pem"), 0o600);

        // A certificate issued after a reload verifies against the stored CA.
        let issued = again
            .issue_server(&["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let ca: CertificateDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(first.pem().as_bytes()).unwrap();
        roots.add(ca).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for name in ["127.0.0.1", "localhost"] {
            let name = rustls::pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&issued.cert, &[], &name, &[], now)
                .unwrap();
        }
        let other = rustls::pki_types::ServerName::try_from("example.com").unwrap();
        assert!(
            verifier
                .verify_server_cert(&issued.cert, &[], &other, &[], now)
                .is_err()
        );
        assert!(server_config(&LiveCert::new(&issued).unwrap()).is_ok());
    }

    /// Runs a handshake between `client` (reaching `name`) and `server` in memory: if both
    /// ends accepted it, the certificates each presented (the server's, the client's).
    fn handshake(
        client: rustls::ClientConfig,
        server: Arc<rustls::ServerConfig>,
        name: &str,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut server = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                let first = |certs: Option<&[CertificateDer<'_>]>| {
                    certs.and_then(|c| c.first()).map(|c| c.to_vec())
                };
                let presented = first(client.peer_certificates()).expect("a server certificate");
                return Ok((presented, first(server.peer_certificates())));
            }
        }
        panic!("the handshake did not finish");
    }

    fn member(ca: &Authority, node: &str, host: &str) -> Mutual {
        let key = NodeKey::generate().unwrap();
        let pem = ca
            .issue_node(&key.request(node).unwrap(), node, &[host.to_string()])
            .unwrap();
        mutual(&key.with_certificate(&pem).unwrap(), ca.pem()).unwrap()
    }

    #[test]
    fn members_of_one_cluster_accept_each_other_and_nobody_else() {
        let (dir, other_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ca = Authority::load_or_create(dir.path()).unwrap();
        let n1 = member(&ca, "n1", "127.0.0.1");
        let n2 = member(&ca, "n2", "127.0.0.2");
        handshake(n1.client.clone(), n2.server.clone(), "127.0.0.2").unwrap();
        handshake(n2.client.clone(), n1.server.clone(), "127.0.0.1").unwrap();
        // The control plane, as a client only.
        let control = mutual(&ca.issue_client(CONTROL_PLANE).unwrap(), ca.pem()).unwrap();
        handshake(control.client.clone(), n1.server.clone(), "127.0.0.1").unwrap();
        // Each says whose it is.
        let key = NodeKey::generate().unwrap();
        let pem = ca
            .issue_node(&key.request("n9").unwrap(), "n9", &["127.0.0.9".into()])
            .unwrap();
        let der = key.with_certificate(&pem).unwrap().cert;
        assert_eq!(member_of(&der).as_deref(), Some("n9"));
        let der = ca.issue_client(CONTROL_PLANE).unwrap().cert;
        assert_eq!(member_of(&der).as_deref(), Some(CONTROL_PLANE));
        assert_eq!(member_of(b"not a certificate"), None);
        // A node's certificate names only where it is reached.
        assert!(handshake(n1.client.clone(), n2.server.clone(), "127.0.0.1").is_err());

        // Another cluster's member is refused on either side.
        let stranger_ca = Authority::load_or_create(other_dir.path()).unwrap();
        let stranger = member(&stranger_ca, "n1", "127.0.0.1");
        assert!(handshake(stranger.client.clone(), n1.server.clone(), "127.0.0.1").is_err());
        assert!(handshake(n2.client.clone(), stranger.server.clone(), "127.0.0.1").is_err());
        // A client with no certificate, trusting the CA, is refused.
        let roots = || {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from(ca_der(ca.pem()).unwrap()))
                .unwrap();
            roots
        };
        let anonymous = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots())
            .with_no_client_auth();
        assert!(handshake(anonymous, n1.server.clone(), "127.0.0.1").is_err());
        // Nor does the API's certificate, a server's only, pass as a client.
        let api = ca.issue_server(&["127.0.0.1".into()]).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots())
            .with_client_auth_cert(vec![api.cert.clone()], PrivateKeyDer::Pkcs8(api.key))
            .unwrap();
        assert!(handshake(client, n1.server.clone(), "127.0.0.1").is_err());
    }

    #[test]
    fn api_clients_take_the_control_planes_certificate_and_no_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path()).unwrap();
        let serving = |issued: &Issued| server_config(&LiveCert::new(issued).unwrap()).unwrap();
        let api = ca.issue_api(&["127.0.0.1".into()]).unwrap();
        let client = || api_client(ca.pem()).unwrap();
        assert!(handshake(client(), serving(&api), "127.0.0.1").is_ok());
        assert!(handshake(client(), serving(&api), "127.0.0.2").is_err());
        // A node's certificate, which the CA signs for any address the node names, does not
        // pass for the API's, even for the API's own address.
        let key = NodeKey::generate().unwrap();
        let pem = ca
            .issue_node(&key.request("n1").unwrap(), "n1", &["127.0.0.1".into()])
            .unwrap();
        let node = key.with_certificate(&pem).unwrap();
        assert!(handshake(client(), serving(&node), "127.0.0.1").is_err());
        // Nor does another cluster's API.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Authority::load_or_create(other_dir.path()).unwrap();
        let stranger = other.issue_api(&["127.0.0.1".into()]).unwrap();
        assert!(handshake(client(), serving(&stranger), "127.0.0.1").is_err());

        // A CA that is not a cluster's (a proxy's in front of the API) is trusted as usual.
        let proxy_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Example proxy CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let proxy_ca = params.self_signed(&proxy_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &proxy_ca, &proxy_key)
            .unwrap();
        let proxy = Issued {
            cert: leaf.der().clone(),
            key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        };
        let behind_proxy = api_client(&proxy_ca.pem()).unwrap();
        assert!(handshake(behind_proxy, serving(&proxy), "127.0.0.1").is_ok());
    }

    #[test]
    fn members_renew_their_certificates_in_place_before_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path())
            .unwrap()
            .valid_for(Duration::from_secs(60));
        let issue = |node: &str, host: &str| {
            let key = NodeKey::generate().unwrap();
            let pem = ca
                .issue_node(&key.request(node).unwrap(), node, &[host.to_string()])
                .unwrap();
            key.with_certificate(&pem).unwrap()
        };
        let before = SystemTime::now();
        let n1 = mutual(&issue("n1", "127.0.0.1"), ca.pem()).unwrap();
        let n2 = mutual(&issue("n2", "127.0.0.2"), ca.pem()).unwrap();
        // Valid for the CA's 60 s, renewed two thirds into them (from 6 s back: 38 s on).
        let (renew_at, expires) = (n1.cert().renew_at(), n1.cert().expires());
        let secs = |t: SystemTime| t.duration_since(before).unwrap().as_secs_f64();
        assert!((59.0..=61.0).contains(&secs(expires)), "{}", secs(expires));
        assert!(
            (37.0..=39.0).contains(&secs(renew_at)),
            "{}",
            secs(renew_at)
        );

        // Once expired, a member's certificate is refused.
        let first = n1.cert().presented().cert[0].clone();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let at = |t: SystemTime| {
            rustls::pki_types::UnixTime::since_unix_epoch(
                t.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            )
        };
        let check = |t| n2.chain.verify_server_cert(&first, &[], &name, &[], at(t));
        assert!(check(before).is_ok());
        assert!(matches!(
            check(expires + Duration::from_secs(1)),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. }
            ))
        ));

        // Renewed in place: the next handshakes, as server and as client, present the new one.
        let (served, _) = handshake(n2.client_for("n1"), n1.server.clone(), "127.0.0.1").unwrap();
        assert_eq!(served, first.to_vec());
        let renewed = issue("n1", "127.0.0.1");
        n1.cert().replace(&renewed).unwrap();
        let (served, _) = handshake(n2.client_for("n1"), n1.server.clone(), "127.0.0.1").unwrap();
        assert_eq!(served, renewed.cert.to_vec());
        let (_, as_client) =
            handshake(n1.client_for("n2"), n2.server.clone(), "127.0.0.2").unwrap();
        assert_eq!(as_client, Some(renewed.cert.to_vec()));

        // A certificate with another's key is refused, and the one in use stays.
        let mismatched = Issued {
            cert: issue("n1", "127.0.0.1").cert,
            key: renewed.key.clone_key(),
        };
        let err = n1.cert().replace(&mismatched).unwrap_err().to_string();
        assert!(err.contains("the certificate and its key"), "{err}");
        let (served, _) = handshake(n2.client_for("n1"), n1.server.clone(), "127.0.0.1").unwrap();
        assert_eq!(served, renewed.cert.to_vec());
    }

    /// A client of the gateway's public side trusting `ca` only. Every handshake is a full
    /// one: a resumed session shows no certificate.
    fn public_client(ca: &Authority) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der(ca.pem()).unwrap()))
            .unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::disabled();
        client
    }

    #[test]
    fn the_public_side_presents_the_certificate_naming_the_host_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path()).unwrap();
        let first = ca.issue_server(&["app.example.com".into()]).unwrap();
        let wild = ca.issue_server(&["*.wild.test".into()]).unwrap();
        let (config, certs) = ingress_config(&[first.keyed_chain(), wild.keyed_chain()]).unwrap();
        let client = public_client(&ca);
        for host in ["app.example.com", "a.wild.test", "b.wild.test"] {
            handshake(client.clone(), config.clone(), host).unwrap();
        }
        // A host no certificate names gets the first one, which the client refuses.
        assert!(handshake(client.clone(), config.clone(), "other.example.com").is_err());
        assert!(handshake(client.clone(), config.clone(), "deep.a.wild.test").is_err());
        // Replaced in place: the next handshakes get the new ones; a bad set changes nothing.
        let other = ca.issue_server(&["other.example.com".into()]).unwrap();
        certs.replace(&[other.keyed_chain()]).unwrap();
        handshake(client.clone(), config.clone(), "other.example.com").unwrap();
        assert!(handshake(client.clone(), config.clone(), "app.example.com").is_err());
        assert!(certs.replace(&[]).is_err());
        handshake(client, config, "other.example.com").unwrap();
    }

    #[test]
    fn bad_public_certificates_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path()).unwrap();
        let a = ca.issue_server(&["a.test".into()]).unwrap().keyed_chain();
        let b = ca.issue_server(&["b.test".into()]).unwrap().keyed_chain();
        let swapped = KeyedChain {
            chain: a.chain.clone(),
            key: b.key.clone(),
        };
        let no_key = KeyedChain {
            chain: a.chain.clone(),
            key: "no key".into(),
        };
        let no_cert = KeyedChain {
            chain: "no certificate".into(),
            key: a.key.clone(),
        };
        for (bad, says) in [
            (swapped, "certificate 1 and its key"),
            (no_key, "key 1"),
            (no_cert, "certificate 1"),
        ] {
            let err = ingress_config(&[bad]).err().unwrap().to_string();
            assert!(err.contains(says), "{err}");
        }
        // None at all is a gateway with TLS only for the hosts apps bring certificates for.
        assert!(ingress_config(&[]).is_ok());
    }

    #[test]
    fn an_apps_certificate_must_name_its_hosts_and_is_served_for_them_first() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path()).unwrap();
        let shop = ca
            .issue_server(&["shop.example.com".into(), "*.shop.test".into()])
            .unwrap()
            .keyed_chain();
        let hosts = |h: &[&str]| h.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        assert!(HostCertificate::new(&shop, &hosts(&["shop.example.com", "a.shop.test"])).is_ok());
        let err = HostCertificate::new(&shop, &hosts(&["shop.example.com", "api.example.com"]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not name api.example.com"), "{err}");
        let other = ca
            .issue_server(&["other.test".into()])
            .unwrap()
            .keyed_chain();
        let swapped = KeyedChain {
            chain: shop.chain.clone(),
            key: other.key.clone(),
        };
        let err = HostCertificate::new(&swapped, &hosts(&["shop.example.com"]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("certificate and its key"), "{err}");

        // No operator certificate: only the apps' hosts get TLS, and as they change.
        let (config, certs) = ingress_config(&[]).unwrap();
        let client = public_client(&ca);
        assert!(handshake(client.clone(), config.clone(), "shop.example.com").is_err());
        let cert = HostCertificate::new(&shop, &hosts(&["shop.example.com"])).unwrap();
        certs.set_hosts(vec![cert]);
        handshake(client.clone(), config.clone(), "shop.example.com").unwrap();
        assert!(handshake(client.clone(), config.clone(), "other.test").is_err());
        certs.set_hosts(Vec::new());
        assert!(handshake(client.clone(), config.clone(), "shop.example.com").is_err());

        // Served for its app's route hosts alone: an app of one namespace whose certificate
        // also names another's host (here by a wildcard) is not what that host's clients get.
        let cert = HostCertificate::new(&shop, &hosts(&["shop.example.com"])).unwrap();
        certs.set_hosts(vec![cert]);
        handshake(client.clone(), config.clone(), "SHOP.example.com").unwrap();
        let absolute = HostCertificate::new(&shop, &hosts(&["shop.example.com"])).unwrap();
        assert!(absolute.serves("shop.example.com."));
        assert!(handshake(client.clone(), config.clone(), "victim.shop.test").is_err());
        let victim = ca
            .issue_server(&["victim.shop.test".into()])
            .unwrap()
            .keyed_chain();
        let (config, certs) = ingress_config(std::slice::from_ref(&victim)).unwrap();
        let cert = HostCertificate::new(&shop, &hosts(&["shop.example.com"])).unwrap();
        certs.set_hosts(vec![cert]);
        let (presented, _) = handshake(client, config, "victim.shop.test").unwrap();
        assert_eq!(
            presented,
            certificates_der(&victim.chain).unwrap()[0],
            "the operator's certificate for the host, not the app's"
        );
    }

    #[test]
    fn a_hash_is_of_a_certificate_only() {
        assert!(ca_hash("not pem").is_err());
    }

    /// The join token pins the CA by its hash. A bundle of the cluster's CA and an attacker's
    /// hashed as the first alone, so a joining node trusted the attacker's CA beside it, and
    /// with it a certificate naming the control plane that the attacker signed.
    #[test]
    fn a_bundle_has_no_ca_hash_and_only_the_checked_certificate_is_kept() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let cluster = Authority::load_or_create(one.path()).unwrap();
        let evil = Authority::load_or_create(two.path()).unwrap();
        let bundle = format!("{}{}", cluster.pem(), evil.pem());
        assert!(ca_hash(&bundle).is_err());
        assert!(only_certificate(&bundle).is_err());
        assert_eq!(ca_hash(cluster.pem()).unwrap(), cluster.hash().unwrap());
        let key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let kept = only_certificate(&format!("{key}{}", cluster.pem())).unwrap();
        assert_eq!(
            certificates_der(&kept).unwrap(),
            certificates_der(cluster.pem()).unwrap()
        );
        assert!(!kept.contains("PRIVATE KEY"), "{kept}");
    }

    #[test]
    fn a_bundle_gives_each_of_its_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let pem = Authority::load_or_create(dir.path())
            .unwrap()
            .pem()
            .to_string();
        let bundle = certificates_der(&format!("{pem}{pem}")).unwrap();
        assert_eq!(bundle.len(), 2);
        assert_eq!(bundle[0], ca_der(&pem).unwrap());
        assert!(certificates_der("no certificate here").is_err());
    }
}
