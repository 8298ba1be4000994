//! Property tests for the spec parser, with shrinking: arbitrary text, and arbitrary TOML
//! documents made of the spec's real sections and keys with arbitrary values, go through
//! `parse_app` and `resolve` as the CLI does. Whatever the input, the parser never panics; an
//! error says something, and one about TOML syntax says where; and a spec that resolves goes
//! through the JSON the API takes unchanged and still valid.

use std::panic::{AssertUnwindSafe, catch_unwind};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use shoal_core::spec::{AppSpec, SpecError, parse_app};

/// Fixed case counts, whatever `PROPTEST_CASES` says, and no regression files in the tree: a
/// failure prints its minimal input, which is what goes into a fixed test.
fn config(cases: u32) -> Config {
    Config {
        failure_persistence: None,
        ..Config::with_cases(cases)
    }
}

const VALID_DIGEST: &str =
    "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// What a key's value usually looks like; any key also gets any value now and then.
#[derive(Clone, Copy, Debug)]
enum Hint {
    Name,
    Path,
    Digest,
    Kind,
    Strings,
    Int,
    Float,
    Memory,
    Cpu,
    Quantities,
    Duration,
    Routes,
    Route,
    Outbound,
    Cron,
    Zone,
    Labels,
    /// Words it takes, and words it does not.
    Word(&'static [&'static str], &'static [&'static str]),
}

use Hint::*;

/// A section of the spec: its header (`""` for the top level), whether it is an array of
/// tables, and its keys.
type Section = (&'static str, bool, &'static [(&'static str, Hint)]);

const TOP: Section = ("", false, &[("name", Name), ("namespace", Name)]);

const SECTIONS: &[Section] = &[
    (
        "component",
        false,
        &[
            ("path", Path),
            ("digest", Digest),
            ("kind", Kind),
            ("args", Strings),
        ],
    ),
    (
        "resources",
        false,
        &[
            ("max_concurrency", Int),
            ("requests", Quantities),
            ("limits", Quantities),
        ],
    ),
    (
        "resources.requests",
        false,
        &[("cpu", Cpu), ("memory", Memory)],
    ),
    (
        "resources.limits",
        false,
        &[("cpu", Cpu), ("memory", Memory)],
    ),
    (
        "scale",
        false,
        &[
            ("replicas", Int),
            ("min", Int),
            ("max", Int),
            ("target_concurrency", Int),
            ("target_rps", Int),
            ("window", Duration),
            ("idle", Duration),
        ],
    ),
    (
        "scale.schedule",
        true,
        &[
            ("name", Name),
            ("cron", Cron),
            ("timezone", Zone),
            ("duration", Duration),
            ("end", Cron),
            ("min", Int),
            ("max", Int),
            ("replicas", Int),
        ],
    ),
    (
        "http",
        false,
        &[
            ("routes", Routes),
            ("timeout", Duration),
            ("reuse", Int),
            ("reuse_idle", Duration),
            ("reuse_concurrent", Int),
        ],
    ),
    (
        "placement",
        false,
        &[
            ("node_selector", Labels),
            ("spread", Word(&["preferred", "required"], &["always"])),
        ],
    ),
    ("network", false, &[("outbound", Outbound)]),
    (
        "job",
        false,
        &[
            ("restart", Word(&["never", "on-failure"], &["always"])),
            ("retries", Int),
            ("deadline", Duration),
            ("schedule", Cron),
            ("timezone", Zone),
            (
                "concurrency",
                Word(&["allow", "forbid", "replace"], &["queue"]),
            ),
            ("starting_deadline", Duration),
        ],
    ),
    ("job.history", false, &[("succeeded", Int), ("failed", Int)]),
    (
        "health.readiness",
        false,
        &[
            ("path", Route),
            ("period", Duration),
            ("timeout", Duration),
            ("failure_threshold", Int),
            ("success_threshold", Int),
        ],
    ),
    (
        "health.liveness",
        false,
        &[
            ("path", Route),
            ("period", Duration),
            ("timeout", Duration),
            ("failure_threshold", Int),
            ("success_threshold", Int),
        ],
    ),
    (
        "rollout",
        false,
        &[
            ("strategy", Word(&["rolling", "canary"], &["blue-green"])),
            ("max_surge", Int),
            ("max_unavailable", Int),
            ("progress_deadline", Duration),
        ],
    ),
    (
        "rollout.steps",
        true,
        &[("weight", Int), ("pause", Duration)],
    ),
    (
        "rollout.analysis",
        false,
        &[
            ("min_requests", Int),
            ("max_error_rate_increase", Float),
            ("max_p99_ratio", Float),
        ],
    ),
];

/// `s` as a TOML basic string, every character TOML refuses raw escaped.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A string: mostly one the spec takes, else one it should refuse, else anything; usually
/// quoted properly, sometimes dropped in raw (a syntax error, mostly).
fn string_from(
    good: &'static [&'static str],
    bad: &'static [&'static str],
) -> BoxedStrategy<String> {
    let text = prop_oneof![
        16 => prop::sample::select(good).prop_map(str::to_string),
        2 => prop::sample::select(bad).prop_map(str::to_string),
        1 => any::<String>(),
    ];
    prop_oneof![
        30 => text.clone().prop_map(|s| quoted(&s)),
        1 => text.clone().prop_map(|s| format!("'{s}'")),
        1 => text.prop_map(|s| format!("\"{s}\"")),
    ]
    .boxed()
}

const NAMES: &[&str] = &["hello", "a", "my-app", "default", "kube-system", "web-2"];
const BAD_NAMES: &[&str] = &[
    "",
    "-x",
    "x-",
    "UPPER",
    "a_b",
    "a.b",
    "é",
    "🦀",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];
const PATHS: &[&str] = &["app.wasm", "../x/y.wasm"];
const BAD_PATHS: &[&str] = &["", "/", "\0", "C:\\x.wasm"];
const DIGESTS: &[&str] = &[VALID_DIGEST];
const BAD_DIGESTS: &[&str] = &[
    "sha256:",
    "sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "sha256:zzzz",
    "md5:aaaa",
    "",
];
const KINDS: &[&str] = &["http", "job", "daemon"];
const BAD_KINDS: &[&str] = &["HTTP", "cron", ""];
const MEMORY: &[&str] = &["32Mi", "1Mi", "512Mi", "64Mi", "1Gi", "2048Ki"];
const BAD_MEMORY: &[&str] = &[
    "513Mi",
    "64Ki",
    "0",
    "-1Mi",
    "1.5Gi",
    "99999999999999999999Gi",
    "18446744073709551615",
    "1e9",
    "Mi",
    "12Xi",
];
const CPU: &[&str] = &["50m", "1", "0.5", "250m", "2"];
const BAD_CPU: &[&str] = &["0", "0m", "-1", "1000000", "1e3", "m", "4294967296m", "1."];
const DURATIONS: &[&str] = &["5s", "100ms", "1m", "1h", "30s", "10m"];
const BAD_DURATIONS: &[&str] = &[
    "0s",
    "0",
    "-5s",
    "1m30s",
    "18446744073709551615ms",
    "99999999999999h",
    "s",
    "5",
    "1.5s",
    "1d",
];
const ROUTES: &[&str] = &["/hello", "/", "api.example.com/v1", "/a/b"];
const BAD_ROUTES: &[&str] = &[
    "",
    "//",
    "/a?b",
    "/a#b",
    "hello",
    "host:8080/x",
    "/../x",
    "*/x",
];
const OUTBOUND: &[&str] = &[
    "api.example.com",
    "api.example.com:443",
    "*.example.com",
    "backend",
];
const BAD_OUTBOUND: &[&str] = &[
    "10.0.0.0/8",
    "::1",
    "[::1]:80",
    "",
    "*",
    "host:99999",
    "http://x",
];
const CRONS: &[&str] = &["*/5 * * * *", "0 9 * * 1-5", "0 0 0 * * *", "0 0 31 2 *"];
const BAD_CRONS: &[&str] = &["61 * * * *", "* * * * * * *", "", "@daily", "*/0 * * * *"];
const ZONES: &[&str] = &["UTC", "Europe/Paris", "America/New_York"];
const BAD_ZONES: &[&str] = &["Mars/Olympus", ""];
const KEYS: &[&str] = &["GREETING", "A", "a-b", "", "1X", "team", "é"];

fn integer() -> BoxedStrategy<String> {
    prop_oneof![
        12 => (0i64..5).prop_map(|n| n.to_string()),
        4 => (0i64..200).prop_map(|n| n.to_string()),
        1 => prop::sample::select(&[
            "-1",
            "4294967295",
            "4294967296",
            "9223372036854775807",
            "-9223372036854775808",
            "18446744073709551616",
            "0x10",
            "1_000",
            "+1",
            "01",
        ][..])
        .prop_map(str::to_string),
        1 => any::<i64>().prop_map(|n| n.to_string()),
    ]
    .boxed()
}

fn float() -> BoxedStrategy<String> {
    prop_oneof![
        4 => (0.0f64..4.0).prop_map(|f| format!("{f:?}")),
        1 => prop::sample::select(&["nan", "inf", "-inf", "-0.0", "1e309", "1e-400", "0.02", "1.5"][..])
            .prop_map(str::to_string),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
        1 => integer(),
    ]
    .boxed()
}

/// Any TOML value (and a few things that are not), nested a little.
fn any_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        4 => integer(),
        4 => float(),
        4 => any::<bool>().prop_map(|b| b.to_string()),
        4 => any::<String>().prop_map(|s| quoted(&s)),
        1 => Just("1979-05-27T07:32:00Z".to_string()),
        1 => Just("\"\"\"multi\nline\"\"\"".to_string()),
        // Nothing at all: a syntax error.
        1 => Just(String::new()),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..4).prop_map(|kv| {
                let kv: Vec<String> = kv
                    .iter()
                    .map(|(k, v)| format!("{} = {v}", quoted(k)))
                    .collect();
                format!("{{ {} }}", kv.join(", "))
            }),
        ]
    })
    .boxed()
}

fn array_of(item: BoxedStrategy<String>) -> BoxedStrategy<String> {
    prop::collection::vec(item, 0..4)
        .prop_map(|v| format!("[{}]", v.join(", ")))
        .boxed()
}

/// A value for a key: most often of the kind the key takes, sometimes anything.
fn value(hint: Hint) -> BoxedStrategy<String> {
    let hinted = match hint {
        Name => string_from(NAMES, BAD_NAMES),
        Path => string_from(PATHS, BAD_PATHS),
        Digest => string_from(DIGESTS, BAD_DIGESTS),
        Kind => string_from(KINDS, BAD_KINDS),
        Strings => array_of(string_from(NAMES, BAD_NAMES)),
        Int => integer(),
        Float => float(),
        Memory => string_from(MEMORY, BAD_MEMORY),
        Cpu => string_from(CPU, BAD_CPU),
        Quantities => (
            prop::option::of(string_from(CPU, BAD_CPU)),
            prop::option::of(string_from(MEMORY, BAD_MEMORY)),
        )
            .prop_map(|(cpu, memory)| {
                let parts: Vec<String> = [("cpu", cpu), ("memory", memory)]
                    .into_iter()
                    .filter_map(|(k, v)| Some(format!("{k} = {}", v?)))
                    .collect();
                format!("{{ {} }}", parts.join(", "))
            })
            .boxed(),
        Duration => string_from(DURATIONS, BAD_DURATIONS),
        Routes => prop_oneof![
            3 => array_of(string_from(ROUTES, BAD_ROUTES)),
            1 => string_from(ROUTES, BAD_ROUTES),
        ]
        .boxed(),
        Route => string_from(ROUTES, BAD_ROUTES),
        Outbound => array_of(string_from(OUTBOUND, BAD_OUTBOUND)),
        Cron => string_from(CRONS, BAD_CRONS),
        Zone => string_from(ZONES, BAD_ZONES),
        Labels => prop::collection::vec(
            (prop::sample::select(KEYS), string_from(NAMES, BAD_NAMES)),
            0..3,
        )
        .prop_map(|kv| {
            let kv: Vec<String> = kv
                .iter()
                .map(|(k, v)| format!("{} = {v}", quoted(k)))
                .collect();
            format!("{{ {} }}", kv.join(", "))
        })
        .boxed(),
        Word(good, bad) => string_from(good, bad),
    };
    prop_oneof![40 => hinted, 1 => any_value()].boxed()
}

/// The lines of one table: each key of `keys` or not, now and then one the spec does not know.
fn entries(keys: &'static [(&'static str, Hint)], p: f64) -> BoxedStrategy<Vec<String>> {
    let known: Vec<BoxedStrategy<Option<String>>> = keys
        .iter()
        .map(|&(key, hint)| {
            // What a table needs is there most of the time; `component.path` rarely, since
            // it excludes `digest`.
            let p = match (key, hint) {
                (
                    "name" | "kind" | "cron" | "weight" | "outbound" | "path",
                    Name | Kind | Cron | Int | Outbound | Route,
                ) => 0.95,
                ("digest", _) => 0.9,
                (_, Path) => 0.05,
                _ => p,
            };
            prop::option::weighted(p, value(hint).prop_map(move |v| format!("{key} = {v}"))).boxed()
        })
        .collect();
    let unknown = prop::option::weighted(
        0.05,
        ("[a-z_]{1,12}", any_value()).prop_map(|(k, v)| format!("{k} = {v}")),
    );
    (known, unknown)
        .prop_map(|(known, unknown)| known.into_iter().flatten().chain(unknown).collect())
        .boxed()
}

/// A section, or nothing: `[header]` (or `[[header]]`, up to three times) and its lines.
fn section(&(header, array, keys): &Section, present: f64) -> BoxedStrategy<Option<String>> {
    let one = entries(keys, 0.5).prop_map(move |lines| {
        let open = if array {
            format!("[[{header}]]")
        } else {
            format!("[{header}]")
        };
        format!("{open}\n{}\n", lines.join("\n"))
    });
    let tables = if array {
        prop::collection::vec(one, 1..4)
            .prop_map(|t| t.concat())
            .boxed()
    } else {
        one.boxed()
    };
    prop::option::weighted(present, tables).boxed()
}

/// `[env]`: arbitrary names (bare when they can be) and arbitrary values.
fn env() -> BoxedStrategy<Option<String>> {
    let key = prop_oneof![
        3 => "[A-Z_][A-Z0-9_]{0,10}",
        1 => any::<String>().prop_map(|k| quoted(&k)),
    ];
    let val = prop_oneof![10 => any::<String>().prop_map(|v| quoted(&v)), 1 => any_value()];
    prop::option::weighted(
        0.3,
        prop::collection::vec((key, val), 0..5).prop_map(|kv| {
            let lines: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            format!("[env]\n{}\n", lines.join("\n"))
        }),
    )
    .boxed()
}

/// A whole spec: the top-level keys, then the sections in any order. `[component]` is there
/// most of the time, so most documents get past it into the rest of validation.
fn document() -> impl Strategy<Value = String> {
    let top = entries(TOP.2, 0.9).prop_map(|lines| format!("{}\n", lines.join("\n")));
    let mut sections: Vec<BoxedStrategy<Option<String>>> = SECTIONS
        .iter()
        .map(|s| {
            let present = match s.0 {
                "component" => 0.95,
                // Beside `[resources]`, these often say a key twice.
                "resources.requests" | "resources.limits" => 0.1,
                _ => 0.2,
            };
            section(s, present)
        })
        .collect();
    sections.push(env());
    (top, sections.prop_shuffle())
        .prop_map(|(top, sections)| top + &sections.into_iter().flatten().collect::<String>())
}

/// Text made of what TOML and the spec care about, in any order.
fn token_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        prop::sample::select(
            &[
                "[",
                "]",
                "[[",
                "]]",
                "{",
                "}",
                "=",
                "\"",
                "'",
                "\"\"\"",
                ",",
                ".",
                "\n",
                " ",
                "#",
                "\\",
                "\\u",
                "name",
                "component",
                "kind",
                "http",
                "digest",
                "[component]",
                "[http]",
                "[scale]",
                "routes",
                "replicas",
                "32Mi",
                "5s",
                "-",
                "0",
                "1e309",
                "nan",
                "\r\n",
                "\t",
                "\0",
                "é",
                "🦀",
            ][..]
        )
        .prop_map(str::to_string),
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(token, 0..64).prop_map(|t| t.concat())
}

/// Parses and resolves `text` as the CLI does, and checks what came out.
fn check(text: &str, digest: &str) -> Result<Outcome, TestCaseError> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        parse_app(text).and_then(|m| m.resolve(digest.to_string()))
    }));
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(_) => return Err(TestCaseError::fail("the parser panicked")),
    };
    match outcome {
        Ok(spec) => {
            round_trips(&spec)?;
            Ok(Outcome::Resolved)
        }
        Err(e) => {
            said_something(text, &e)?;
            Ok(if e.field.is_some() {
                Outcome::FieldError
            } else {
                Outcome::OtherError
            })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Resolved,
    FieldError,
    OtherError,
}

fn said_something(text: &str, e: &SpecError) -> Result<(), TestCaseError> {
    prop_assert!(
        !e.message.trim().is_empty(),
        "an error with no message: {e:?}"
    );
    prop_assert!(!e.to_string().trim().is_empty());
    // Not TOML at all: the error says where.
    if toml::from_str::<toml::Table>(text).is_err() {
        prop_assert!(
            e.line.is_some() && e.column.is_some(),
            "a syntax error without a place: {e:?}"
        );
    }
    if let Some(line) = e.line {
        let lines = text.split('\n').count();
        prop_assert!(line >= 1 && line <= lines, "line {line} of {lines}: {e:?}");
        prop_assert!(e.column.is_some_and(|c| c >= 1), "{e:?}");
    }
    Ok(())
}

/// What resolves is what the CLI posts: its JSON must come back the same and still valid.
fn round_trips(spec: &AppSpec) -> Result<(), TestCaseError> {
    let json = serde_json::to_string(spec).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: AppSpec =
        serde_json::from_str(&json).map_err(|e| TestCaseError::fail(format!("{e} in {json}")))?;
    prop_assert_eq!(&back, spec);
    prop_assert!(back.validate().is_ok(), "{:?}", back.validate());
    Ok(())
}

fn digest() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just(VALID_DIGEST.to_string()),
        1 => prop::sample::select(DIGESTS).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_text_never_panics_the_parser(text in any::<String>(), digest in digest()) {
        check(&text, &digest)?;
    }

    #[test]
    fn toml_tokens_in_any_order_never_panic_the_parser(text in token_soup(), digest in digest()) {
        check(&text, &digest)?;
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn specs_of_real_keys_with_arbitrary_values_are_resolved_or_refused_with_a_reason(
        text in document(),
        digest in digest(),
    ) {
        check(&text, &digest)?;
    }
}

/// The generator is worth its cases: its documents reach every outcome, deep validation
/// (field errors) most of all, rather than all stopping at the first missing key.
#[test]
fn generated_specs_reach_every_outcome() {
    let mut runner = TestRunner::deterministic();
    let strategy = (document(), digest());
    let mut seen = std::collections::HashMap::<Outcome, usize>::new();
    for _ in 0..2000 {
        let (text, digest) = strategy.new_tree(&mut runner).unwrap().current();
        let outcome = check(&text, &digest).unwrap_or_else(|e| panic!("{e}\n{text}"));
        *seen.entry(outcome).or_default() += 1;
    }
    eprintln!("outcomes of 2000 generated specs: {seen:?}");
    for outcome in [Outcome::Resolved, Outcome::FieldError, Outcome::OtherError] {
        assert!(
            seen.get(&outcome).copied().unwrap_or(0) >= 20,
            "{outcome:?} in {seen:?}"
        );
    }
}
