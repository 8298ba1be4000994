//! Components from OCI registries, end to end: a real registry on loopback (Debian's
//! `docker-registry`, the CNCF distribution registry), `shoal push`, apply by tag, serve,
//! a tag that moves, and references the control plane must refuse.

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
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = free_addr();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("storage").display()
            ),
        )
        .expect("write registry config");
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
        assert!(
            poll(Duration::from_secs(30), || {
                common::client()
                    .get(&url)
                    .send()
                    .is_ok_and(|r| r.status().is_success())
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

/// A loopback address nothing listens on (once the probe socket is closed).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

fn spec(dir: &std::path::Path, reference: &str) -> String {
    let body = format!(
        "name = \"hello\"\n[component]\noci = \"{reference}\"\nkind = \"http\"\n\
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
}

#[test]
fn bad_references_are_refused_at_apply_naming_them_and_nothing_is_stored() {
    let registry = Registry::start();
    let c = Cluster::start();
    let unknown_tag = format!("{}/team/hello:nope", registry.addr);
    let unreachable = format!("{}/team/hello:1.0", free_addr());
    for reference in [&unknown_tag, &unreachable] {
        let file = spec(c.dir.path(), reference);
        for verb in [&["apply", "-f", &file][..], &["diff", "-f", &file][..]] {
            let err = c.cli_err(verb);
            assert!(err.contains(reference.as_str()), "{verb:?}: {err}");
        }
    }
    nothing_stored(&c);
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
