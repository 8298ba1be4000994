//! Tidy checks, after rust-analyzer's: facts about the repository that no
//! compiler enforces. Here: the crate graph in ARCHITECTURE.md is the crate
//! graph in the manifests. A crate that gains or loses an internal dependency
//! fails this test until the picture says so too, so the picture stays true
//! and the change gets a reader's attention.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

const HEADING: &str = "## Crate graph";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every package of the workspace (the root one and `crates/*`), by name,
/// with its manifest path relative to the root.
fn manifests() -> Vec<(String, PathBuf, toml::Table)> {
    let root = root();
    let mut paths = vec![PathBuf::from("Cargo.toml")];
    let mut members: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .expect("crates/ is readable")
        .map(|e| e.expect("crates/ entry").path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .map(|p| {
            p.strip_prefix(&root)
                .expect("under the root")
                .join("Cargo.toml")
        })
        .collect();
    members.sort();
    paths.extend(members);
    paths
        .into_iter()
        .map(|rel| {
            let text = std::fs::read_to_string(root.join(&rel))
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", rel.display()));
            let manifest: toml::Table = text
                .parse()
                .unwrap_or_else(|e| panic!("{} is not TOML: {e}", rel.display()));
            let name = manifest
                .get("package")
                .and_then(|p| p.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or_else(|| panic!("{} has no [package] name", rel.display()))
                .to_string();
            (name, rel, manifest)
        })
        .collect()
}

/// Names of the packages a manifest depends on to build and run: its
/// `[dependencies]`, including target-specific ones; not dev- or build-
/// dependencies. A renamed dependency counts by its package name.
fn normal_dependencies(manifest: &toml::Table) -> BTreeSet<String> {
    let mut tables = vec![manifest.get("dependencies")];
    if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
        tables.extend(targets.values().map(|t| t.get("dependencies")));
    }
    tables
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_table())
        .flat_map(|deps| deps.iter())
        .map(|(key, spec)| {
            spec.get("package")
                .and_then(|p| p.as_str())
                .unwrap_or(key)
                .to_string()
        })
        .collect()
}

/// The internal dependencies each workspace package declares.
fn actual() -> (Graph, BTreeMap<String, PathBuf>) {
    let manifests = manifests();
    let internal: BTreeSet<String> = manifests.iter().map(|(n, _, _)| n.clone()).collect();
    let mut graph = Graph::new();
    let mut paths = BTreeMap::new();
    for (name, path, manifest) in manifests {
        let deps = normal_dependencies(&manifest)
            .into_iter()
            .filter(|d| internal.contains(d))
            .collect();
        graph.insert(name.clone(), deps);
        paths.insert(name, path);
    }
    (graph, paths)
}

/// The fenced block under [`HEADING`]: one line per crate, `crate -> dep, dep`,
/// or the crate alone when it depends on no other.
fn parse_picture(markdown: &str) -> Result<Graph, String> {
    let section = markdown
        .split_once(&format!("\n{HEADING}\n"))
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("no `{HEADING}` section"))?;
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut lines = section.lines().skip_while(|l| !l.starts_with("```"));
    lines
        .next()
        .ok_or_else(|| format!("no fenced block under `{HEADING}`"))?;
    let mut graph = Graph::new();
    let mut closed = false;
    for line in lines {
        if line.starts_with("```") {
            closed = true;
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (from, to) = line.split_once("->").unwrap_or((line, ""));
        let from = from.trim().to_string();
        let to: BTreeSet<String> = to
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .collect();
        if graph.insert(from.clone(), to).is_some() {
            return Err(format!("`{from}` has two lines in the crate graph"));
        }
    }
    if !closed {
        return Err(format!("the fenced block under `{HEADING}` is not closed"));
    }
    Ok(graph)
}

/// What differs between the manifests and the picture, one line per edge or crate.
fn differences(actual: &Graph, picture: &Graph, paths: &BTreeMap<String, PathBuf>) -> Vec<String> {
    let mut out = Vec::new();
    for (krate, deps) in actual {
        let manifest = paths
            .get(krate)
            .map_or_else(|| krate.clone(), |p| p.display().to_string());
        let Some(drawn) = picture.get(krate) else {
            out.push(format!(
                "crate {krate} ({manifest}) is missing from the crate graph"
            ));
            continue;
        };
        for dep in deps.difference(drawn) {
            out.push(format!(
                "{krate} -> {dep}: {manifest} depends on {dep}, the crate graph does not show it"
            ));
        }
        for dep in drawn.difference(deps) {
            out.push(format!(
                "{krate} -> {dep}: the crate graph shows it, {manifest} has no such dependency"
            ));
        }
    }
    for krate in picture.keys().filter(|k| !actual.contains_key(*k)) {
        out.push(format!(
            "crate {krate} is in the crate graph but not in the workspace"
        ));
    }
    out
}

#[test]
fn crate_graph_in_architecture_md_matches_the_manifests() {
    let path = root().join("ARCHITECTURE.md");
    let markdown = std::fs::read_to_string(&path).expect("ARCHITECTURE.md is readable");
    let picture = parse_picture(&markdown).unwrap_or_else(|e| panic!("ARCHITECTURE.md: {e}"));
    let (actual, paths) = actual();
    let diff = differences(&actual, &picture, &paths);
    assert!(
        diff.is_empty(),
        "ARCHITECTURE.md's crate graph is out of date ({HEADING}); fix the manifest or the picture:\n  {}\n\nThe manifests say:\n{}",
        diff.join("\n  "),
        render(&actual)
    );
}

fn render(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(k, deps)| {
            if deps.is_empty() {
                format!("{k}\n")
            } else {
                let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
                format!("{k} -> {}\n", deps.join(", "))
            }
        })
        .collect()
}

#[test]
fn a_new_or_lost_edge_is_named() {
    let md = "# A\n\n## Crate graph\n\n```text\nshoal-a -> shoal-b\nshoal-b\n```\n\n## Next\n";
    let picture = parse_picture(md).unwrap();
    let paths = BTreeMap::from([(
        "shoal-a".to_string(),
        Path::new("crates/a/Cargo.toml").into(),
    )]);
    let graph = |edges: &[&str]| -> Graph {
        BTreeMap::from([
            (
                "shoal-a".to_string(),
                edges.iter().map(|e| e.to_string()).collect(),
            ),
            ("shoal-b".to_string(), BTreeSet::new()),
        ])
    };
    assert!(differences(&graph(&["shoal-b"]), &picture, &paths).is_empty());
    let gained = differences(&graph(&["shoal-b", "shoal-c"]), &picture, &paths);
    assert_eq!(gained.len(), 1);
    assert!(
        gained[0].starts_with("shoal-a -> shoal-c: crates/a/Cargo.toml depends on"),
        "{gained:?}"
    );
    let lost = differences(&graph(&[]), &picture, &paths);
    assert_eq!(lost.len(), 1);
    assert!(
        lost[0].starts_with("shoal-a -> shoal-b: the crate graph shows it"),
        "{lost:?}"
    );
    assert!(parse_picture("# A\n").is_err());
}
