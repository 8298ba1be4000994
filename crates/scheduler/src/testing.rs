//! Apps and replicas for the unit tests of the scheduler's decisions.

use shoal_core::spec::{AppKey, parse_app};
use shoal_core::{App, Kind, Phase, Replica};

/// App `default/a` of `kind` at `revision`, with `extra` TOML (e.g. a `[rollout]`) appended.
pub fn app_with(kind: &str, replicas: u32, revision: u64, extra: &str) -> App {
    build(
        kind,
        &format!("[scale]\nreplicas = {replicas}\n"),
        revision,
        extra,
    )
}

/// Http app `default/a` at revision 1 whose `[scale]` section (and any
/// `[[scale.schedule]]` after it) is `scale`: autoscaled, or with windows.
pub fn scaled_app(scale: &str) -> App {
    build("http", scale, 1, "")
}

fn build(kind: &str, scale: &str, revision: u64, extra: &str) -> App {
    let http = if kind == "http" {
        "[http]\nroutes = [\"/a\"]\n"
    } else {
        ""
    };
    let src = format!(
        "name = \"a\"\n[component]\ndigest = \"sha256:{}\"\nkind = \"{kind}\"\n{http}{extra}{scale}",
        "a".repeat(64)
    );
    let spec = parse_app(&src)
        .unwrap()
        .resolve(format!("sha256:{}", "a".repeat(64)))
        .unwrap();
    App {
        spec,
        revision,
        created_at: 0,
        updated_at: 0,
        scale: Default::default(),
        job: Default::default(),
    }
}

/// An http replica of `default/a` placed on node `n`.
pub fn replica_at(id: &str, revision: u64, phase: Phase, created_at: u64) -> Replica {
    Replica {
        id: id.into(),
        app: AppKey::new("default", "a"),
        revision,
        kind: Kind::Http,
        resources: app_with("http", 1, revision, "").spec.resources,
        node: Some("n".into()),
        phase,
        message: None,
        exit_code: None,
        restarts: 0,
        reason: None,
        avoid: vec![],
        scheduled_at: None,
        moving_since: None,
        note: None,
        ready_since: None,
        created_at,
        updated_at: created_at,
    }
}
