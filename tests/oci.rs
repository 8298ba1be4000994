//! Components from OCI registries, end to end: a real registry on loopback (Debian's
//! `docker-registry`, the CNCF distribution registry), `shoal push`, apply by tag, serve,
//! a tag that moves, a tag naming a multi-platform index, a registry that wants
//! credentials, and references the control plane must refuse.

mod common;

use common::{Cluster, poll};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A distribution registry on a free loopback port, storing in a temp dir; killed when dropped.
struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`, as references name it.
    addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        Registry::start_with(None)
    }

    /// With `user`, the registry wants that user name and password (basic auth from an
    /// htpasswd file) for everything, pulls included.
    fn start_with(user: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = free_addr();
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        );
        if let Some((name, password)) = user {
            let hash = bcrypt::hash(password, 4).expect("bcrypt");
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{name}:{hash}\n")).expect("write htpasswd");
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, yaml).expect("write registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (Debian's docker-registry; `make test` installs it)");
        let registry = Registry {
            child,
            addr,
            _dir: dir,
        };
        let url = format!("http://{}/v2/", registry.addr);
        // Up once it answers: 200, or 401 when it wants credentials.
        let expected = if user.is_some() { 401 } else { 200 };
        assert!(
            poll(Duration::from_secs(30), || {
                common::client()
                    .get(&url)
                    .send()
                    .is_ok_and(|r| r.status().as_u16() == expected)
            }),
            "the registry never answered {url}"
        );
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Where the registry keeps the blob with `digest` (`sha256:…`).
    fn blob_file(&self, digest: &str) -> std::path::PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self._dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// A loopback address nothing listens on (once the probe socket is closed).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn spec(dir: &std::path::Path, reference: &str) -> String {
    spec_with(dir, reference, "")
}

/// The spec of `spec` with `extra` lines in its `[component]`.
fn spec_with(dir: &std::path::Path, reference: &str, extra: &str) -> String {
    let body = format!(
        "name = \"hello\"\n[component]\noci = \"{reference}\"\n{extra}kind = \"http\"\n\
         [resources]\nlimits = {{ memory = \"32Mi\" }}\n[http]\nroutes = [\"/hello\"]\n\
         [env]\nGREETING = \"Hello from a registry!\"\n"
    );
    common::write_spec(dir, "app.toml", &body)
        .to_string_lossy()
        .into_owned()
}

fn module_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// The digest the app's current revision runs.
fn running_digest(c: &Cluster) -> String {
    let app = c.api_json("/v1/apps/hello");
    app["app"]["spec"]["component"]["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no digest in {app}"))
        .to_string()
}

#[test]
fn a_component_pulled_by_tag_is_pinned_until_applied_again() {
    let registry = Registry::start();
    let c = Cluster::start();
    let reference = format!("{}/team/hello:1.0", registry.addr);
    let first = std::fs::read(shoal_fixtures::HELLO_WASM).expect("hello fixture");
    let pushed = c.cli_ok(&["push", shoal_fixtures::HELLO_WASM, &reference]);
    assert!(pushed.contains(&module_digest(&first)), "{pushed}");

    let file = spec(c.dir.path(), &reference);
    c.cli_ok(&["apply", "-f", &file]);
    c.wait_gw("/hello", 200, "Hello from a registry!");
    assert_eq!(running_digest(&c), module_digest(&first));
    let modules = c.api_json("/v1/modules");
    let pulled = &modules[0];
    assert_eq!(pulled["digest"], module_digest(&first).as_str());
    assert_eq!(pulled["oci"]["reference"], reference.as_str());
    assert!(
        pulled["oci"]["manifest"]
            .as_str()
            .is_some_and(|m| m.starts_with("sha256:")),
        "{pulled}"
    );
    let listed = c.cli_ok(&["get", "modules"]);
    assert!(listed.contains(&reference), "{listed}");

    // Another build under the same tag: the same component with a custom section appended.
    let mut second = first.clone();
    second.extend_from_slice(&[0, 6, 4, b't', b'e', b's', b't', b'x']);
    let second_file = c.dir.path().join("hello-2.wasm");
    std::fs::write(&second_file, &second).expect("write second build");
    c.cli_ok(&["push", &second_file.to_string_lossy(), &reference]);

    assert_eq!(running_digest(&c), module_digest(&first));
    c.wait_gw("/hello", 200, "Hello from a registry!");
    let diff = c.cli(&["diff", "-f", &file]);
    assert_eq!(diff.status.code(), Some(1), "{diff:?}");
    let said = String::from_utf8_lossy(&diff.stdout);
    assert!(
        said.contains("component.digest") && said.contains(&module_digest(&second)),
        "{said}"
    );
    assert_eq!(running_digest(&c), module_digest(&first));

    c.cli_ok(&["apply", "-f", &file]);
    assert_eq!(running_digest(&c), module_digest(&second));
    let revisions = c.api_json("/v1/apps/hello");
    assert_eq!(revisions["app"]["revision"], 2, "{revisions}");
    c.wait_gw("/hello", 200, "Hello from a registry!");

    // Pinned by the first build's manifest digest; then applied again as it is while the
    // registry is down, which what a digest names needs no registry for.
    let manifest = pulled["oci"]["manifest"].as_str().unwrap().to_string();
    let pinned = spec(
        c.dir.path(),
        &format!("{}/team/hello@{manifest}", registry.addr),
    );
    c.cli_ok(&["apply", "-f", &pinned]);
    assert_eq!(running_digest(&c), module_digest(&first));
    drop(registry);
    let again = c.cli_ok(&["apply", "-f", &pinned]);
    assert!(again.contains("app default/hello unchanged"), "{again}");
}

#[test]
fn bad_references_are_refused_at_apply_naming_them_and_nothing_is_stored() {
    let registry = Registry::start();
    let c = Cluster::start();
    let unknown_tag = format!("{}/team/hello:nope", registry.addr);
    let unreachable = format!("{}/team/hello:1.0", free_addr());
    for (reference, says) in [
        (&unknown_tag, "no such tag or digest"),
        (&unreachable, "onnect"),
    ] {
        let file = spec(c.dir.path(), reference);
        for verb in [&["apply", "-f", &file][..], &["diff", "-f", &file][..]] {
            let err = c.cli_err(verb);
            assert!(
                err.contains(reference.as_str()) && err.contains(says),
                "{verb:?}: {err}"
            );
        }
    }
    nothing_stored(&c);
}

#[test]
fn a_layer_that_does_not_hash_to_its_digest_is_refused_and_nothing_is_stored() {
    let registry = Registry::start();
    let c = Cluster::start();
    let reference = format!("{}/team/hello:1.0", registry.addr);
    c.cli_ok(&["push", shoal_fixtures::HELLO_WASM, &reference]);
    // The registry's copy is damaged in place, same length: it still serves it under the
    // digest it was pushed with.
    let hello = std::fs::read(shoal_fixtures::HELLO_WASM).expect("hello fixture");
    let digest = module_digest(&hello);
    let file = registry.blob_file(&digest);
    let mut damaged = std::fs::read(&file).expect("the registry's blob");
    assert_eq!(damaged, hello);
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(&file, &damaged).expect("damage the blob");

    let err = c.cli_err(&["apply", "-f", &spec(c.dir.path(), &reference)]);
    assert!(
        err.contains(&reference) && err.contains(&digest) && err.contains(&module_digest(&damaged)),
        "{err}"
    );
    nothing_stored(&c);
}

#[test]
fn a_private_registry_takes_the_credentials_of_a_pull_secret_and_refuses_wrong_ones() {
    let password = "s3cret-pull-password";
    let registry = Registry::start_with(Some(("alice", password)));
    let c = Cluster::start();
    let reference = format!("{}/team/hello:1.0", registry.addr);
    let push = ["push", shoal_fixtures::HELLO_WASM, &reference];
    let err = c.cli_err(&push);
    assert!(err.contains("anonymous access"), "{err}");
    let with_login = [
        &["push", "--username", "alice", "--password-stdin"][..],
        &push[1..],
    ]
    .concat();
    let wrong = c.cli_stdin(&with_login, "not-the-password\n");
    assert!(!wrong.status.success(), "{wrong:?}");
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains("refused the credentials"), "{said}");
    let pushed = c.cli_stdin(&with_login, &format!("{password}\n"));
    assert!(pushed.status.success(), "{pushed:?}");

    // No pull secret: refused, saying how to give one.
    let anonymous = spec(c.dir.path(), &reference);
    let err = c.cli_err(&["apply", "-f", &anonymous]);
    assert!(
        err.contains(&reference) && err.contains("pull_secret"),
        "{err}"
    );
    // A pull secret with the wrong password; one for another registry; none at all.
    let secret = |verb: &str, name: &str, host: &str, password: &str| {
        let out = c.cli_stdin(
            &[
                "secret",
                verb,
                name,
                "--registry",
                host,
                "--username",
                "alice",
                "--password-stdin",
            ],
            &format!("{password}\n"),
        );
        assert!(out.status.success(), "{out:?}");
    };
    secret("create", "regcred", &registry.addr, "wrong-password");
    secret("create", "elsewhere", "registry.example.com", password);
    let file = |name: &str| {
        spec_with(
            c.dir.path(),
            &reference,
            &format!("pull_secret = \"{name}\"\n"),
        )
    };
    // Refused credentials are the spec's to mend, not an outage (exit 1, not 5).
    let refused = c.cli(&["apply", "-f", &file("regcred")]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    for (name, says) in [
        ("regcred", "refused the credentials"),
        ("elsewhere", "for registry registry.example.com"),
        ("missing", "does not exist"),
    ] {
        let err = c.cli_err(&["apply", "-f", &file(name)]);
        assert!(err.contains(says), "{name}: {err}");
        assert!(!err.contains(password), "{name}: {err}");
    }
    nothing_stored(&c);

    secret("set", "regcred", &registry.addr, password);
    c.cli_ok(&["apply", "-f", &file("regcred")]);
    c.wait_gw("/hello", 200, "Hello from a registry!");
    let hello = std::fs::read(shoal_fixtures::HELLO_WASM).expect("hello fixture");
    assert_eq!(running_digest(&c), module_digest(&hello));

    let described = c.cli_ok(&["describe", "app", "hello"]);
    assert!(
        described.contains(&format!("Source:       {reference} (pull secret regcred)")),
        "{described}"
    );
    // The password is shown nowhere and stored sealed.
    for shown in [
        c.cli_ok(&["secret", "get", "regcred"]),
        c.cli_ok(&["get", "secrets", "-o", "json"]),
        c.cli_ok(&["describe", "app", "hello"]),
        c.api_json("/v1/apps/hello").to_string(),
    ] {
        assert!(!shown.contains(password), "{shown}");
    }
    let state = std::fs::read(c.dir.path().join("data/state.redb")).expect("state file");
    assert!(
        !state
            .windows(password.len())
            .any(|w| w == password.as_bytes()),
        "the password is in the state file in plain text"
    );
}

#[test]
fn artifacts_too_big_or_not_components_are_refused_naming_them_and_nothing_is_stored() {
    let registry = Registry::start();
    let c = Cluster::start_with(&["--max-module-size", "64Ki"]);
    let big = format!("{}/team/hello:1.0", registry.addr);
    c.cli_ok(&["push", shoal_fixtures::HELLO_WASM, &big]);
    let image = format!("{}/team/image:1.0", registry.addr);
    push_container_image(&registry.addr, "team/image", "1.0");
    for (reference, says) in [(&big, "limit"), (&image, "not a Wasm component")] {
        let file = spec(c.dir.path(), reference);
        let err = c.cli_err(&["apply", "-f", &file]);
        assert!(
            err.contains(reference.as_str()) && err.contains(says),
            "{reference}: {err}"
        );
    }
    nothing_stored(&c);
}

#[test]
fn a_tag_naming_a_multi_platform_index_runs_its_wasm_entry() {
    let registry = Registry::start();
    let c = Cluster::start();
    let repository = format!("{}/team/hello", registry.addr);
    c.cli_ok(&[
        "push",
        shoal_fixtures::HELLO_WASM,
        &format!("{repository}:wasm"),
    ]);
    push_container_image(&registry.addr, "team/hello", "linux");
    let on = |tag: &str, os: &str, architecture: &str| {
        let mut entry = manifest_descriptor(&registry.addr, "team/hello", tag);
        entry["platform"] = serde_json::json!({"os": os, "architecture": architecture});
        entry
    };
    let (linux, wasm) = (on("linux", "linux", "amd64"), on("wasm", "wasip2", "wasm"));
    put_index(
        &registry.addr,
        "team/hello",
        "linux-only",
        std::slice::from_ref(&linux),
    );
    put_index(
        &registry.addr,
        "team/hello",
        "multi",
        &[linux, wasm.clone()],
    );

    let linux_only = format!("{repository}:linux-only");
    let err = c.cli_err(&["apply", "-f", &spec(c.dir.path(), &linux_only)]);
    assert!(
        err.contains(&linux_only) && err.contains("index") && err.contains("linux/amd64"),
        "{err}"
    );
    nothing_stored(&c);

    let multi = format!("{repository}:multi");
    c.cli_ok(&["apply", "-f", &spec(c.dir.path(), &multi)]);
    c.wait_gw("/hello", 200, "Hello from a registry!");
    let hello = std::fs::read(shoal_fixtures::HELLO_WASM).expect("hello fixture");
    assert_eq!(running_digest(&c), module_digest(&hello));
    // The module came from the wasm entry's manifest, not from the index.
    let modules = c.api_json("/v1/modules");
    assert_eq!(modules[0]["oci"]["reference"], multi.as_str(), "{modules}");
    assert_eq!(modules[0]["oci"]["manifest"], wasm["digest"], "{modules}");
}

/// The descriptor (media type, digest, size) of the image manifest under `tag`, as an
/// index lists it.
fn manifest_descriptor(addr: &str, repository: &str, tag: &str) -> serde_json::Value {
    let media_type = "application/vnd.oci.image.manifest.v1+json";
    let resp = common::client()
        .get(format!("http://{addr}/v2/{repository}/manifests/{tag}"))
        .header("accept", media_type)
        .send()
        .expect("manifest");
    assert_eq!(resp.status().as_u16(), 200, "{tag}");
    let body = resp.bytes().expect("manifest body");
    serde_json::json!({"mediaType": media_type, "digest": module_digest(&body), "size": body.len()})
}

/// Puts an OCI image index of `manifests` (descriptors with their platforms) under `tag`.
fn put_index(addr: &str, repository: &str, tag: &str, manifests: &[serde_json::Value]) {
    let media_type = "application/vnd.oci.image.index.v1+json";
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests,
    });
    let resp = common::client()
        .put(format!("http://{addr}/v2/{repository}/manifests/{tag}"))
        .header("content-type", media_type)
        .body(index.to_string())
        .send()
        .expect("index upload");
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text());
}

/// No module, app or blob: what a refused apply must leave.
fn nothing_stored(c: &Cluster) {
    assert_eq!(c.api_json("/v1/modules"), serde_json::json!([]));
    assert_eq!(c.api_json("/v1/apps"), serde_json::json!([]));
    let blobs = std::fs::read_dir(c.dir.path().join("data/modules/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "a refused pull left a blob behind");
}

/// Pushes an ordinary container image (one gzip tar layer) with the registry's own API.
fn push_container_image(addr: &str, repository: &str, tag: &str) {
    let http = common::client();
    let blob = |data: &[u8]| {
        let digest = module_digest(data);
        let started = http
            .post(format!("http://{addr}/v2/{repository}/blobs/uploads/"))
            .send()
            .expect("blob upload start");
        assert_eq!(started.status().as_u16(), 202, "{:?}", started.text());
        let location = started.headers()["location"].to_str().expect("location");
        let location = match location.starts_with('/') {
            true => format!("http://{addr}{location}"),
            false => location.to_string(),
        };
        let join = if location.contains('?') { '&' } else { '?' };
        let resp = http
            .put(format!("{location}{join}digest={digest}"))
            .body(data.to_vec())
            .send()
            .expect("blob upload");
        assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text());
        serde_json::json!({"digest": digest, "size": data.len()})
    };
    let mut config = blob(b"{}");
    config["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let mut layer = blob(b"not a component");
    layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    });
    let resp = http
        .put(format!("http://{addr}/v2/{repository}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.to_string())
        .send()
        .expect("manifest upload");
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text());
}
