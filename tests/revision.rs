//! The snapshot's revision read from the streamed bbolt pages must be exactly what
//! `etcdutl snapshot status` (or etcdctl's on 3.4) reports for the same bytes: checked on real
//! dbs of every shape that changes the walk, not assumed.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use etcd_actions::revision::{Found, RevisionFinder};
use futures::StreamExt;

use crate::util::*;

/// What the upstream tool reports for a db file.
pub fn upstream_revision(flavor: &Flavor, db: &Path) -> i64 {
    let tool = flavor.etcdutl.as_ref().unwrap_or(&flavor.etcdctl);
    let out = Command::new(tool)
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "snapshot status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["revision"].as_i64().unwrap()
}

/// The finder over a db file, fed in pieces of `chunk` bytes.
fn walk(db: &Path, at_least: i64, chunk: usize) -> Result<Found, String> {
    let mut f = fs::File::open(db).unwrap();
    let mut finder = RevisionFinder::new(at_least);
    let mut buf = vec![0u8; chunk];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        finder.update(&buf[..n]);
    }
    finder.finish_detailed()
}

/// Saves a snapshot with etcdctl and checks the walk against the upstream tool: with no
/// bound, with the revision etcd reported before the save as the bound, in etcd's 32 KiB
/// messages and in odd pieces that split page headers. Returns what the walk found.
#[track_caller]
fn check(node: &Node, dir: &Path, name: &str) -> Found {
    let before = node.revision();
    let db = dir.join(format!("{name}.db"));
    node.ctl_ok(&["snapshot", "save", db.to_str().unwrap()]);
    let want = upstream_revision(&node.flavor, &db);
    // The walk a restore does on the unpacked db file (the bucket's last children) agrees.
    let on_file = etcd_actions::revision::of_db_file(&db)
        .unwrap_or_else(|e| panic!("{name}: no revision from the db file: {e}"));
    assert_eq!(
        on_file, want,
        "{name}: the file walk says {on_file}, snapshot status says {want}"
    );
    let mut found = None;
    for (bound, chunk) in [
        (0, 32 * 1024),
        (before, 32 * 1024),
        (before, 4093),
        (before, 7),
    ] {
        let f = walk(&db, bound, chunk)
            .unwrap_or_else(|e| panic!("{name}: no revision (bound {bound}, chunk {chunk}): {e}"));
        assert_eq!(
            f.revision, want,
            "{name}: bound {bound}, chunk {chunk}: walk says {}, snapshot status says {want}",
            f.revision
        );
        found = Some(f);
    }
    fs::remove_file(&db).unwrap();
    found.unwrap()
}

type Kv = etcd_actions::etcd::pb::kv_client::KvClient<tonic::transport::Channel>;

/// A client of etcd's KV service at `endpoint` (plain http).
async fn kv_client(endpoint: String) -> Kv {
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    Kv::new(channel)
}

fn put(key: String, value: Vec<u8>) -> etcd_actions::etcd::pb::PutRequest {
    etcd_actions::etcd::pb::PutRequest {
        key: key.into_bytes(),
        value,
        ..Default::default()
    }
}

/// Puts `count` values of `size` bytes under `prefix`, `parallel` at a time, over the v3
/// API: half random bytes, half repetitive text, as Kubernetes objects are.
fn load(node: &Node, prefix: &str, count: usize, size: usize, parallel: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = kv_client(node.endpoint()).await;
        futures::stream::iter(0..count)
            .map(|i| {
                let mut kv = client.clone();
                let value = value_bytes(i, size);
                async move {
                    kv.put(put(format!("{prefix}{i:08}"), value))
                        .await
                        .map(drop)
                }
            })
            .buffer_unordered(parallel)
            .for_each(|r| async move { r.unwrap() })
            .await;
    });
}

fn value_bytes(i: usize, size: usize) -> Vec<u8> {
    if i.is_multiple_of(2) {
        let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    } else {
        format!("{{\"kind\":\"ConfigMap\",\"name\":\"cm-{i}\",\"data\":\"replicas: 3\"}}\n")
            .repeat(size / 50 + 1)
            .into_bytes()[..size]
            .to_vec()
    }
}

fn shapes(flavor: &Flavor) {
    let base = tempdir();
    let node = Node::single(base.path(), "unit", flavor);
    let dir = base.path().join("dbs");
    fs::create_dir_all(&dir).unwrap();

    // A tiny db: the `key` bucket fits inline in the root bucket's leaf.
    node.put("a", "1");
    node.put("b", "2");
    let tiny = check(&node, &dir, "tiny");
    assert!(
        tiny.inline,
        "the tiny db's key bucket should be inline: {tiny:?}"
    );

    // Thousands of keys: the `key` bucket is a tree with branch pages.
    node.fill("k", 4000);
    let deep = check(&node, &dir, "deep");
    assert!(
        !deep.inline && deep.depth >= 1,
        "expected branch pages: {deep:?}"
    );

    // Values larger than a page: leaves with overflow pages.
    load(&node, "/big/", 40, 200 * 1024, 4);
    check(&node, &dir, "overflow");

    // Compacted after deleting the newest keys: the tombstones go, so the largest key is
    // below the revision etcd reports, and below the bound the walk is given.
    for round in 0..3 {
        node.fill(&format!("r{round}-"), 300);
    }
    node.ctl_ok(&["del", "r2-", "--prefix"]);
    let rev = node.revision().to_string();
    node.ctl_ok(&["compact", &rev, "--physical"]);
    let db = dir.join("probe.db");
    node.ctl_ok(&["snapshot", "save", db.to_str().unwrap()]);
    let upstream = upstream_revision(flavor, &db);
    assert!(
        upstream < node.revision(),
        "the compaction should have removed the newest revisions ({upstream} vs {})",
        node.revision()
    );
    fs::remove_file(&db).unwrap();
    check(&node, &dir, "compacted");
}

#[test]
fn revision_is_exact_across_db_shapes_on_etcd_35() {
    shapes(&v35());
}

#[test]
fn revision_is_exact_across_db_shapes_on_etcd_34() {
    shapes(&v34());
}

/// The agent's own snapshots taken while a writer puts keys as fast as it can: each
/// archive's manifest revision is what `etcdutl snapshot status` says of its db.
#[test]
fn revision_is_exact_while_a_writer_puts_as_fast_as_it_can() {
    let base = tempdir();
    let node = Node::single(base.path(), "unit", &v35());
    node.fill("seed", 2000);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let endpoint = node.endpoint();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut c = kv_client(endpoint).await;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    c.put(put(format!("hot/{:06}", n % 5000), vec![b'x'; 300]))
                        .await
                        .unwrap();
                    n += 1;
                }
                n
            })
        })
    };
    let target = base.path().join("backups");
    for i in 0..3 {
        let before = node.revision();
        let run = Agent::snapshot(&node, target.to_str().unwrap()).run();
        let out = run.success();
        let archive = Path::new(out["snapshot"]["path"].as_str().unwrap()).to_path_buf();
        let db = extract_db(&archive, &base.path().join(format!("x{i}")));
        let want = upstream_revision(&node.flavor, &db);
        let got: i64 = out["snapshot"]["revision"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            got, want,
            "snapshot {i}: manifest {got}, snapshot status {want}"
        );
        assert!(got >= before, "snapshot {i}: {got} is older than {before}");
    }
    stop.store(true, Ordering::Relaxed);
    let puts = writer.join().unwrap();
    assert!(puts > 100, "the writer made only {puts} puts");
}

/// A db of more than 2 GB (etcd's default quota raised), streamed by the agent: the
/// manifest's revision is exact, and so is the walk over the extracted db with no bound.
#[test]
fn revision_is_exact_on_a_multi_gb_db() {
    let _heavy = heavy_lock();
    let base = tempdir();
    let flavor = v35();
    let node = Node::prepare(base.path(), "unit", &flavor);
    node.write_config(&format!("unit={}", node.peer_url()), "new", "tok-big");
    let mut cfg = fs::read_to_string(node.config_path()).unwrap();
    cfg.push_str("quota-backend-bytes: 8589934592\nmax-request-bytes: 2097152\n");
    fs::write(node.config_path(), cfg).unwrap();
    node.start();
    node.wait_healthy();
    let mb: usize = std::env::var("ETCD_ACTIONS_TEST_BIG_DB_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2200);
    load(&node, "/registry/big/", mb, 1 << 20, 8);
    node.fill("small", 1000);
    let size = node.status()["dbSize"].as_u64().unwrap();
    assert!(size > 2 << 30, "the db is only {size} bytes");

    let target = base.path().join("backups");
    let out = Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let archive = Path::new(out["snapshot"]["path"].as_str().unwrap()).to_path_buf();
    node.stop();
    let db = extract_db(&archive, &base.path().join("x"));
    fs::remove_file(&archive).unwrap();
    fs::remove_dir_all(node.data_dir()).unwrap();
    let want = upstream_revision(&flavor, &db);
    let got: i64 = out["snapshot"]["revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(got, want, "manifest {got}, snapshot status {want}");
    let walked = walk(&db, 0, 32 * 1024).unwrap();
    assert_eq!(walked.revision, want);
    assert!(walked.depth >= 1);
}
