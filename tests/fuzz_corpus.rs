//! Replays the fuzz corpus (`fuzz/corpus/<target>/`, docs/FUZZING.md) as an ordinary test:
//! every saved input, and every seed, goes through the same function the fuzz target runs
//! (`oc_testkit::fuzzing`), and none may panic. CI runs this; the fuzzer itself needs
//! `cargo fuzz` and is run by hand.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use oc_testkit::fuzzing::{seeds, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Runs `input` through `run`; the panic's message when it panics.
fn replay(run: oc_testkit::fuzzing::Target, input: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| run(input))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

#[test]
fn every_corpus_input_and_seed_runs_through_its_target_without_a_panic() {
    let mut failures = Vec::new();
    for (name, run) in TARGETS {
        let dir = corpus_dir(name);
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {} unreadable: {e}", dir.display()))
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        assert!(
            !files.is_empty(),
            "corpus {} is empty: every target keeps its minimized corpus",
            dir.display()
        );
        for file in &files {
            let input = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if let Err(message) = replay(*run, &input) {
                failures.push(format!("{name}: {}: {message}", file.display()));
            }
        }
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "target {name} has no seeds");
        for (i, input) in seeds.iter().enumerate() {
            if let Err(message) = replay(*run, input) {
                failures.push(format!("{name}: seed {i}: {message}"));
            }
        }
        println!("{name}: {} corpus inputs, {} seeds", files.len(), seeds.len());
    }
    assert!(failures.is_empty(), "inputs that panic:\n{}", failures.join("\n"));
}

/// Writes the seeds under `fuzz/corpus/<target>/seed-<n>`: run by hand before fuzzing a new
/// target (`cargo test --test fuzz_corpus -- --ignored`).
#[test]
#[ignore = "writes into the source tree; run by hand to refresh the seeds"]
fn write_seeds() {
    for (name, _) in TARGETS {
        let dir = corpus_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, input) in seeds(name).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), input).unwrap();
        }
    }
}
