//! The storage floor under the node's latency: what one durable commit costs on this disk.
//!
//! `cargo bench --bench commit` (full) or `cargo bench --bench commit -- --smoke`;
//! `cargo test --all-targets` runs the smoke. Each figure is measured in the same run as its
//! baseline, an append to a plain file followed by `fdatasync`, the cheapest durable write
//! there is; speed is printed, never asserted.
//!
//! The node journals each intake batch (source) and stores each applied batch (partner) in
//! one redb write transaction with `Durability::Immediate`: redb writes every page the
//! transaction dirtied (B-tree leaves, branches, its table tree and allocator state) where
//! those pages live in the file, then syncs. A virtio disk serves such scattered writes one
//! IO at a time, so a commit's latency grows with the pages it touched, not with its bytes
//! (docs/PERFORMANCE.md, "The storage floor"). The node's journal packs the entries of a
//! commit in values of up to 32 KiB ("in groups"), which the last figure measures.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use redb::{Database, Durability, TableDefinition};

/// Journal-like table: (origin, seq) → entry bytes.
const JOURNAL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("journal");
/// The journal's groups: (origin, first seq) → the entries of consecutive seqs, up to
/// [`GROUP_BYTES`] (`store::embedded::groups`).
const GROUPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("groups");
/// The node's group size (with its trailer).
const GROUP_BYTES: usize = 32 * 1024 - 512;
/// Index-like table: (data type, id) → seq, as the own-resources index.
const INDEX: TableDefinition<(&str, &str), u64> = TableDefinition::new("index");
/// About the size of a journaled 1 KiB event with its envelope.
const ENTRY_BYTES: usize = 1_300;
/// redb's page size.
const PAGE: u64 = 4096;

struct Figure {
    name: &'static str,
    p50: Duration,
    p99: Duration,
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

fn measure(name: &'static str, rounds: usize, mut op: impl FnMut()) -> Figure {
    let samples = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            op();
            t.elapsed()
        })
        .collect();
    let (p50, p99) = percentiles(samples);
    Figure { name, p50, p99 }
}

/// A redb database holding `prefill` entries in both tables, and the next seq.
fn redb_store(path: &Path, prefill: u64) -> (Database, u64) {
    let db = Database::builder()
        .set_cache_size(32 << 20)
        .create(path)
        .expect("create the redb file");
    let value = vec![b'x'; ENTRY_BYTES];
    let mut seq = 0;
    while seq < prefill {
        let txn = db.begin_write().expect("begin");
        {
            let mut journal = txn.open_table(JOURNAL).expect("journal");
            let mut index = txn.open_table(INDEX).expect("index");
            for _ in 0..2_000.min(prefill - seq) {
                seq += 1;
                journal.insert(("origin", seq), value.as_slice()).expect("insert");
                index
                    .insert(("D", format!("r-{seq}").as_str()), seq)
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    (db, seq)
}

/// One transaction of `batch` entries, as a journal append of that many events.
fn redb_commit(db: &Database, seq: &mut u64, batch: usize, durability: Durability) {
    let value = vec![b'x'; ENTRY_BYTES];
    let mut txn = db.begin_write().expect("begin");
    txn.set_durability(durability).expect("durability");
    {
        let mut journal = txn.open_table(JOURNAL).expect("journal");
        let mut index = txn.open_table(INDEX).expect("index");
        for _ in 0..batch {
            *seq += 1;
            journal
                .insert(("origin", *seq), value.as_slice())
                .expect("insert");
            index
                .insert(("D", format!("r-{}", *seq).as_str()), *seq)
                .expect("insert");
        }
    }
    txn.commit().expect("commit");
}

/// The same transaction as [`redb_commit`] with the entries packed in groups, as the node
/// journals them.
fn redb_group_commit(db: &Database, seq: &mut u64, batch: usize) {
    let mut value = Vec::with_capacity(GROUP_BYTES + ENTRY_BYTES);
    let txn = db.begin_write().expect("begin");
    {
        let mut groups = txn.open_table(GROUPS).expect("groups");
        let mut index = txn.open_table(INDEX).expect("index");
        let mut first = *seq + 1;
        for i in 0..batch {
            *seq += 1;
            value.extend_from_slice(&[b'x'; ENTRY_BYTES]);
            if value.len() + ENTRY_BYTES > GROUP_BYTES || i + 1 == batch {
                groups
                    .insert(("origin", first), value.as_slice())
                    .expect("insert");
                value.clear();
                first = *seq + 1;
            }
            index
                .insert(("D", format!("r-{}", *seq).as_str()), *seq)
                .expect("insert");
        }
    }
    txn.commit().expect("commit");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke") || !args.iter().any(|a| a == "--bench");
    let (rounds, big_rounds, prefill) = if smoke { (20, 3, 4_000) } else { (400, 40, 100_000) };
    // On the disk the node's data dir would be on, not a tmpfs.
    std::fs::create_dir_all("target/bench").expect("target/bench");
    let dir = tempfile::tempdir_in("target/bench").expect("temporary directory");
    let (db, mut seq) = redb_store(&dir.path().join("store.redb"), prefill);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("append.log"))
        .expect("append log");
    let pages = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.path().join("pages"))
        .expect("page file");
    let page_count = 64 * 1024; // 256 MiB, written once so that no write below fills a hole
    for i in 0..page_count {
        pages
            .write_all_at(&[b'p'; PAGE as usize], i * PAGE)
            .expect("fill");
    }
    pages.sync_all().expect("sync");

    let entry = vec![b'x'; ENTRY_BYTES];
    let batch = vec![b'x'; ENTRY_BYTES * 1_600];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next_page = move || {
        // xorshift: scattered, repeatable page numbers
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % page_count
    };
    let figures = vec![
        measure("append 1 entry + fdatasync", rounds, || {
            log.write_all(&entry).expect("append");
            log.sync_data().expect("sync");
        }),
        measure("redb commit of 1 entry, Immediate", rounds, || {
            redb_commit(&db, &mut seq, 1, Durability::Immediate)
        }),
        measure("redb commit of 1 entry, None", rounds, || {
            redb_commit(&db, &mut seq, 1, Durability::None)
        }),
        measure("14 contiguous pages + fdatasync", rounds, || {
            let at = next_page().min(page_count - 14);
            for i in 0..14 {
                pages
                    .write_all_at(&[b'q'; PAGE as usize], (at + i) * PAGE)
                    .expect("write");
            }
            pages.sync_data().expect("sync");
        }),
        measure("14 scattered pages + fdatasync", rounds, || {
            for _ in 0..14 {
                pages
                    .write_all_at(&[b'q'; PAGE as usize], next_page() * PAGE)
                    .expect("write");
            }
            pages.sync_data().expect("sync");
        }),
        measure("append 1 600 entries + fdatasync", big_rounds, || {
            log.write_all(&batch).expect("append");
            log.sync_data().expect("sync");
        }),
        measure("redb commit of 1 600 entries, Immediate", big_rounds, || {
            redb_commit(&db, &mut seq, 1_600, Durability::Immediate)
        }),
        measure("redb commit of 1 600 entries in groups", big_rounds, || {
            redb_group_commit(&db, &mut seq, 1_600)
        }),
    ];
    // Whatever the last non-durable commits left unsynced goes with this one.
    redb_commit(&db, &mut seq, 0, Durability::Immediate);

    let base = |n: &str| {
        figures
            .iter()
            .find(|f| f.name.starts_with(n))
            .map(|f| f.p50.as_secs_f64())
            .unwrap_or(f64::NAN)
    };
    let (one, many) = (base("append 1 entry"), base("append 1 600"));
    println!(
        "\n{:<42} {:>10} {:>10} {:>9}",
        "operation", "p50 ms", "p99 ms", "p50 / append"
    );
    for f in &figures {
        let against = if f.name.contains("1 600") { many } else { one };
        println!(
            "{:<42} {:>10.3} {:>10.3} {:>9.1}",
            f.name,
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
            f.p50.as_secs_f64() / against
        );
    }
    println!("\n(store prefilled with {prefill} entries; {rounds} rounds, {big_rounds} for the batches)");
    println!("bench: 1 passed, 0 failed");
}
