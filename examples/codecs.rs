//! The deflate backends and sha256, side by side on the bench's data in the archive writer's
//! own block sizes: `cargo run --release --example codecs [MB]`. Prints a Markdown table
//! (scripts/bench runs it and keeps the table).
//!
//! The data is what `scripts/bench` loads: 256 KiB values, every other one random bytes
//! (stored, not deflated, by the writer: only its sha256 and CRC cost), the others repetitive
//! Kubernetes-like JSON. The writer deflates runs of compressible 16 KiB chunks as one gzip
//! member of at most 1 MiB, independently: exactly what is timed here, per backend, for
//! compression at level 1 and for inflating the members back.

use std::time::Instant;

use sha2::Digest;

const BLOCK: usize = 1 << 20;

fn bench_data(mb: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(mb << 20);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut i = 0u64;
    while out.len() < mb << 20 {
        if i.is_multiple_of(2) {
            for _ in 0..(256 * 1024 / 8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                out.extend_from_slice(&seed.to_le_bytes());
            }
        } else {
            let mut v = String::new();
            let mut j = 0;
            while v.len() < 256 * 1024 {
                v.push_str(&format!(
                    "{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{{\"name\":\"cm-{}\",\
                     \"namespace\":\"default\",\"labels\":{{\"app\":\"bench\",\"tier\":\"{}\"}}}},\
                     \"data\":{{\"config\":\"replicas: 3\\nimage: registry.example/app:{}\\n\"}}}}\n",
                    i * 1000 + j,
                    j % 7,
                    j % 13
                ));
                j += 1;
            }
            out.extend_from_slice(&v.as_bytes()[..256 * 1024]);
        }
        i += 1;
    }
    out.truncate(mb << 20);
    out
}

/// The compressible blocks: the JSON halves, in the writer's 1 MiB members.
fn compressible(data: &[u8]) -> Vec<&[u8]> {
    data.chunks(512 * 1024)
        .map(|pair| &pair[256 * 1024.min(pair.len())..])
        .filter(|b| !b.is_empty())
        .flat_map(|b| b.chunks(BLOCK))
        .collect()
}

struct Row {
    name: &'static str,
    compress_mbs: f64,
    inflate_mbs: f64,
    ratio: f64,
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64())
}

fn zlib_rs(blocks: &[&[u8]]) -> Row {
    use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
    let (packed, c) = time(|| {
        blocks
            .iter()
            .map(|b| {
                let mut z = Compress::new(Compression::new(1), false);
                let mut out = Vec::with_capacity(b.len() + 1024);
                z.compress_vec(b, &mut out, FlushCompress::Finish).unwrap();
                out
            })
            .collect::<Vec<_>>()
    });
    let (_, d) = time(|| {
        for (p, b) in packed.iter().zip(blocks) {
            let mut z = Decompress::new(false);
            let mut out = Vec::with_capacity(b.len());
            z.decompress_vec(p, &mut out, FlushDecompress::Finish)
                .unwrap();
            assert_eq!(&out[..], *b);
        }
    });
    row("zlib-rs (flate2, today's)", blocks, &packed, c, d)
}

fn miniz(blocks: &[&[u8]]) -> Row {
    let (packed, c) = time(|| {
        blocks
            .iter()
            .map(|b| miniz_oxide::deflate::compress_to_vec(b, 1))
            .collect::<Vec<_>>()
    });
    let (_, d) = time(|| {
        for (p, b) in packed.iter().zip(blocks) {
            let out = miniz_oxide::inflate::decompress_to_vec(p).unwrap();
            assert_eq!(&out[..], *b);
        }
    });
    row("miniz_oxide", blocks, &packed, c, d)
}

fn libdeflate(blocks: &[&[u8]], level: i32) -> Row {
    use libdeflater::{CompressionLvl, Compressor, Decompressor};
    let mut z = Compressor::new(CompressionLvl::new(level).unwrap());
    let (packed, c) = time(|| {
        blocks
            .iter()
            .map(|b| {
                let mut out = vec![0u8; z.deflate_compress_bound(b.len())];
                let n = z.deflate_compress(b, &mut out).unwrap();
                out.truncate(n);
                out
            })
            .collect::<Vec<_>>()
    });
    let mut d = Decompressor::new();
    let (_, dt) = time(|| {
        for (p, b) in packed.iter().zip(blocks) {
            let mut out = vec![0u8; b.len()];
            let n = d.deflate_decompress(p, &mut out).unwrap();
            assert_eq!(&out[..n], *b);
        }
    });
    row(
        if level == 1 {
            "libdeflate level 1"
        } else {
            "libdeflate level 2"
        },
        blocks,
        &packed,
        c,
        dt,
    )
}

fn row(name: &'static str, blocks: &[&[u8]], packed: &[Vec<u8>], c: f64, d: f64) -> Row {
    let input: usize = blocks.iter().map(|b| b.len()).sum();
    let output: usize = packed.iter().map(Vec::len).sum();
    Row {
        name,
        compress_mbs: input as f64 / c / 1e6,
        inflate_mbs: input as f64 / d / 1e6,
        ratio: output as f64 / input as f64,
    }
}

/// The runs of compressible 16 KiB chunks of a real db file, as the writer finds them in its
/// 1 MiB blocks (the same histogram test), each one gzip member.
fn runs_of(data: &[u8]) -> Vec<&[u8]> {
    use etcd_actions::pgzip::{incompressible, CHUNK};
    let mut runs = Vec::new();
    for block in data.chunks(BLOCK) {
        let mut start = None;
        for (i, chunk) in block.chunks(CHUNK).enumerate() {
            match (incompressible(chunk), start) {
                (false, None) => start = Some(i * CHUNK),
                (true, Some(s)) => {
                    runs.push(&block[s..i * CHUNK]);
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            runs.push(&block[s..]);
        }
    }
    runs
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "256".into());
    let (data, what) = match arg.parse::<usize>() {
        Ok(mb) => (
            bench_data(mb),
            "of the bench's JSON in 1 MiB members".to_string(),
        ),
        Err(_) => (
            std::fs::read(&arg).expect("a db file"),
            format!("of the compressible runs of `{arg}`"),
        ),
    };
    let blocks = if arg.parse::<usize>().is_ok() {
        compressible(&data)
    } else {
        runs_of(&data)
    };
    // Warm up the page cache and the allocator once.
    let _ = zlib_rs(&blocks[..blocks.len().min(4)]);
    let rows = [
        zlib_rs(&blocks),
        miniz(&blocks),
        libdeflate(&blocks, 1),
        libdeflate(&blocks, 2),
    ];
    let half = data.len() as f64;
    println!(
        "| deflate backend, one core, {} MB {what} | compress | inflate | size |",
        blocks.iter().map(|b| b.len()).sum::<usize>() >> 20
    );
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} MB/s | {:.0} MB/s | {:.1}% |",
            r.name,
            r.compress_mbs,
            r.inflate_mbs,
            r.ratio * 100.0
        );
    }
    let (_, s) = time(|| sha2::Sha256::digest(&data));
    let (_, c) = time(|| crc32fast::hash(&data));
    println!(
        "| sha256 (sha2 {}) | {:.0} MB/s | | |",
        if std::is_x86_feature_detected!("sha") {
            "with SHA-NI on this CPU"
        } else {
            "without SHA-NI"
        },
        half / s / 1e6
    );
    println!("| crc32 (crc32fast) | {:.0} MB/s | | |", half / c / 1e6);
    let (_, m) = time(|| md5::Md5::digest(&data));
    println!(
        "| md5 (md-5, the Content-MD5 of each part) | {:.0} MB/s | | |",
        half / m / 1e6
    );
    let (_, k) = time(|| {
        let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
        d.update(&data);
        d.finalize()
    });
    println!("| crc64nvme (crc-fast) | {:.0} MB/s | | |", half / k / 1e6);
    let path = std::env::temp_dir().join(format!("codecs-{}.bin", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    let (out, s) = time(|| {
        std::process::Command::new("sha256sum")
            .arg(&path)
            .output()
            .map(|o| o.status.success())
    });
    let _ = std::fs::remove_file(&path);
    if matches!(out, Ok(true)) {
        println!(
            "| sha256sum (coreutils, file in page cache) | {:.0} MB/s | | |",
            half / s / 1e6
        );
    }
}
