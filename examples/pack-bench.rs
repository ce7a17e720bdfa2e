//! Times the archive writer alone on a db file: `cargo run --release --example pack-bench -- DB [LEVEL]`.
//! Used to profile the one streaming pass (run it under `time` or perf).

use etcd_actions::archive::pack;
use etcd_actions::manifest::{Manifest, SOURCE_SNAPSHOT};

fn main() {
    let mut args = std::env::args().skip(1);
    let db = args.next().expect("usage: pack-bench DB [LEVEL]");
    let level = args.next().map(|l| l.parse().expect("level")).unwrap_or(1);
    let manifest = Manifest::new("bench", SOURCE_SNAPSHOT);
    let out_path = std::env::temp_dir().join("pack-bench.tar.gz");
    let out = std::fs::File::create(&out_path).expect("create output");
    let start = std::time::Instant::now();
    let packed = pack(std::path::Path::new(&db), manifest, true, out, level, None).expect("pack");
    let secs = start.elapsed().as_secs_f64();
    let size = std::fs::metadata(&db).expect("db").len();
    println!(
        "level {level}: {:.2}s, {:.0} MB/s, archive {:.1}% of the db",
        secs,
        size as f64 / secs / 1e6,
        packed.bytes as f64 * 100.0 / size as f64
    );
    let _ = std::fs::remove_file(out_path);
}
