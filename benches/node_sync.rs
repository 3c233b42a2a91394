//! Node sync's hot path for a 100,000-user node, against the baseline of only parsing
//! the same JSON (into `serde_json::Value`, and into `Vec<String>`) in the same run.
//!
//! `cargo bench --bench node_sync`

use std::hint::black_box;

use connector::jobs::node_sync::files::NodeFiles;
use connector::jobs::node_sync::userlist;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use uuid::Uuid;

const USERS: usize = 100_000;

fn uuids(n: usize, seed: u64) -> Vec<String> {
    (0..n as u64)
        .map(|i| {
            Uuid::from_u64_pair(
                seed ^ 0x9e37_79b9_7f4a_7c15,
                i.wrapping_mul(0x2545_f491_4f6c_dd1d),
            )
            .to_string()
        })
        .collect()
}

fn body(list: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "data": { "uuids": list } })).unwrap()
}

fn bench(c: &mut Criterion) {
    let previous = uuids(USERS, 1);
    // The new answer: 1% of the users replaced.
    let mut current = previous.clone();
    let fresh = uuids(USERS / 100, 2);
    current[..fresh.len()].clone_from_slice(&fresh);
    let body = body(&current);
    let old = userlist::parse(&self::body(&previous)).unwrap().users;
    let dir = tempfile::tempdir().unwrap();
    let files = NodeFiles::new(dir.path(), 1);

    let mut g = c.benchmark_group("node_sync_100k");
    g.throughput(Throughput::Elements(USERS as u64));
    g.sample_size(20);
    g.bench_function("baseline_parse_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap()))
    });
    g.bench_function("baseline_parse_vec_string", |b| {
        #[derive(serde::Deserialize)]
        struct Data {
            uuids: Vec<String>,
        }
        #[derive(serde::Deserialize)]
        struct Top {
            data: Data,
        }
        b.iter(|| {
            let top = serde_json::from_slice::<Top>(black_box(&body)).unwrap();
            black_box(top.data.uuids.len())
        })
    });
    g.bench_function("parse_validate", |b| {
        b.iter(|| black_box(userlist::parse(black_box(&body)).unwrap()))
    });
    g.bench_function("parse_validate_diff", |b| {
        b.iter(|| {
            let new = userlist::parse(black_box(&body)).unwrap().users;
            let removed = userlist::removed_count(&old, &new);
            black_box((new == old, removed))
        })
    });
    g.bench_function("parse_validate_diff_write_files", |b| {
        b.iter(|| {
            let new = userlist::parse(black_box(&body)).unwrap().users;
            let removed = userlist::removed_count(&old, &new);
            files.write(1, &new, 0).unwrap();
            black_box(removed)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
