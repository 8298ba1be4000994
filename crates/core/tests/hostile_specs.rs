//! Hostile input for the spec parser: every example spec, mangled thousands of ways (bytes cut,
//! lines repeated, characters swapped for the ones TOML and our quantities care about), must be
//! parsed and resolved or refused with an error that says something — never a panic.

use shoal_core::spec::parse_app;

/// xorshift64*: reproducible without a dependency; the seed is in the failure message.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&str] = &[
    "\"",
    "'",
    "=",
    "[",
    "]",
    "[[",
    "{",
    "}",
    ",",
    ".",
    "-",
    "0",
    "9",
    "\n",
    " ",
    "\\",
    "#",
    "\0",
    "é",
    "🦀",
    "18446744073709551616",
    "-1",
    "1e309",
    "nan",
    "Mi",
    "Gi",
    "ms",
    "m",
    "/",
    "*",
];

fn mangle(rng: &mut Rng, text: &str) -> String {
    let mut s: Vec<char> = text.chars().collect();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(s.len() + 1);
        match rng.below(4) {
            0 => {
                let end = (at + rng.below(12)).min(s.len());
                s.drain(at.min(end)..end);
            }
            1 => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                s.splice(at..at, piece.chars());
            }
            2 if at < s.len() => {
                let piece = INTERESTING[rng.below(INTERESTING.len())];
                s.splice(at..at + 1, piece.chars());
            }
            _ => {
                let lines: Vec<String> = s
                    .iter()
                    .collect::<String>()
                    .lines()
                    .map(String::from)
                    .collect();
                if !lines.is_empty() {
                    let line = &lines[rng.below(lines.len())];
                    s.splice(at..at, format!("\n{line}\n").chars());
                }
            }
        }
    }
    s.into_iter().collect()
}

#[test]
fn mangled_specs_are_refused_with_a_reason_never_a_panic() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut specs = Vec::new();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let spec = entry.unwrap().path().join("app.toml");
        if let Ok(text) = std::fs::read_to_string(&spec) {
            specs.push(text);
        }
    }
    assert!(specs.len() >= 5, "example specs found: {}", specs.len());
    let digest = format!("sha256:{}", "a".repeat(64));
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let (mut parsed, mut refused) = (0, 0);
    for round in 0..20_000 {
        let text = mangle(&mut rng, &specs[round % specs.len()]);
        let outcome =
            std::panic::catch_unwind(|| parse_app(&text).and_then(|m| m.resolve(digest.clone())));
        match outcome {
            Ok(Ok(_)) => parsed += 1,
            Ok(Err(e)) => {
                assert!(
                    !e.to_string().trim().is_empty(),
                    "round {round}: an empty error"
                );
                refused += 1;
            }
            Err(_) => panic!("round {round}: the parser panicked on:\n{text}"),
        }
    }
    // Both outcomes happen: the mangling neither always breaks nor never breaks a spec.
    assert!(
        parsed > 100 && refused > 100,
        "parsed {parsed}, refused {refused}"
    );
}
