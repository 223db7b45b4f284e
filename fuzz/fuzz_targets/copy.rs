//! Fuzz target `copy`: the body is [`oc_testkit::fuzzing::copy`], shared with the corpus
//! replay test (`tests/fuzz_corpus.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| oc_testkit::fuzzing::copy(data));
