//! Codec micro-benchmark: frame encode/decode throughput and ratio on generated FlyteWorkflow
//! objects, by size class (< 20 KB, 20–200 KB, > 200 KB), at the default zstd level.
//!
//! `cargo bench --bench codec` (criterion; MB/s = throughput of the JSON bytes).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etcd_squeeze::codec::{PrefixRule, ValueCodec};

const KEY: &[u8] = b"/registry/flyte.lyft.com/flyteworkflows/ns/wf";

fn codec(level: i32) -> ValueCodec {
    ValueCodec::new(
        vec![PrefixRule { prefix: Bytes::from_static(b"/registry/flyte.lyft.com/flyteworkflows/"), compress: true, level, min_size: 256, delta: None }],
        64 << 20,
    )
}

fn class(len: usize) -> &'static str {
    match len {
        0..20_000 => "under-20KB",
        20_000..200_000 => "20-200KB",
        _ => "over-200KB",
    }
}

fn bench(c: &mut Criterion) {
    let objects = etcd_squeeze::corpus::standard_set(1);
    for level in [1, 3] {
        let codec = codec(level);
        let mut group = c.benchmark_group(format!("zstd-{level}"));
        group.sample_size(10);
        for obj in &objects {
            let value = Bytes::from(obj.json.clone());
            let (stored, _) = codec.encode(KEY, &value).unwrap();
            let id = format!("{}/{}", class(value.len()), obj.name);
            eprintln!("zstd-{level} {id}: {} -> {} bytes ({:.1}x)", value.len(), stored.len(), value.len() as f64 / stored.len() as f64);
            group.throughput(Throughput::Bytes(value.len() as u64));
            group.bench_with_input(BenchmarkId::new("encode", &id), &value, |b, v| b.iter(|| codec.encode(KEY, v).unwrap()));
            group.bench_with_input(BenchmarkId::new("decode", &id), &stored, |b, s| b.iter(|| codec.decode(KEY, s).unwrap()));
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
