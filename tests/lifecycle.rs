//! The backup lifecycle: verify (with restore drills).

use std::fs;
use std::path::{Path, PathBuf};

use crate::restore::snapshot;
use crate::util::*;

fn verify(node: &Node, args: &[&str]) -> Run {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    Agent::standalone(node, &all).run()
}

#[test]
fn verify_passes_good_archives_and_fails_bad_ones() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("k/", 25);
    let snaps = tmp.path().join("snaps");
    let (good, r) = snapshot(&node, &snaps);
    let t = snaps.to_str().unwrap();

    // The newest archive in target, by default.
    let v = verify(&node, &["--target", t]).success();
    assert_eq!(
        v["verify"]["id"].as_str(),
        good.file_name().unwrap().to_str()
    );
    assert_eq!(v["verify"]["revision"], r["snapshot"]["revision"]);
    assert_eq!(v["verify"]["keys"].as_str(), Some("25"));
    assert_eq!(v["verify"]["drill"].as_str(), Some("not run"));
    assert!(v["verify"]["integrity"]
        .as_str()
        .unwrap()
        .contains("trailer"));

    let bad_dir = tmp.path().join("bad");
    fs::create_dir(&bad_dir).unwrap();
    let bytes = fs::read(&good).unwrap();
    let write = |name: &str, data: &[u8]| -> PathBuf {
        let p = bad_dir.join(name);
        fs::write(&p, data).unwrap();
        p
    };
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let cases: Vec<(PathBuf, &str)> = vec![
        (write("flipped.tar.gz", &flipped), "refused"),
        (
            write("truncated.tar.gz", &bytes[..bytes.len() - 100]),
            "refused",
        ),
        (write("noise.tar.gz", &[7u8; 4096]), "not a gzip file"),
        (write("empty.tar.gz", b""), "empty"),
    ];
    for (path, want) in &cases {
        let run = verify(&node, &["--snapshot", path.to_str().unwrap()]);
        let msg = run.failure();
        assert_eq!(run.code(), 3, "{msg}");
        assert!(msg.contains(want), "{}: {msg}", path.display());
    }
    // A sidecar that does not match its archive.
    let copy = bad_dir.join("copy.tar.gz");
    fs::copy(&good, &copy).unwrap();
    fs::write(
        bad_dir.join("copy.tar.gz.sha256"),
        format!("{}  copy.tar.gz\n", "ab".repeat(32)),
    )
    .unwrap();
    let msg = verify(&node, &["--snapshot", copy.to_str().unwrap()]).failure();
    assert!(msg.contains("sha256"), "{msg}");
    // A forged manifest revision.
    let dir = tmp.path().join("forge");
    extract_db(&good, &dir);
    let m = fs::read_to_string(dir.join("manifest.yaml")).unwrap();
    let rev = r["snapshot"]["revision"].as_str().unwrap();
    fs::write(
        dir.join("manifest.yaml"),
        m.replace(&format!("revision: {rev}"), "revision: 424242"),
    )
    .unwrap();
    let forged = tmp.path().join("forged.tar.gz");
    assert!(std::process::Command::new("tar")
        .arg("czf")
        .arg(&forged)
        .arg("-C")
        .arg(&dir)
        .args(["./db", "./manifest.yaml"])
        .status()
        .unwrap()
        .success());
    let msg = verify(&node, &["--snapshot", forged.to_str().unwrap()]).failure();
    assert!(msg.contains("424242"), "{msg}");
    // Nothing left in the state dir.
    assert_eq!(
        files_in(&node.data_dir().join(".etcd-actions")),
        vec!["lock".to_string()]
    );
}

fn deep_drill(flavor: &Flavor) {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", flavor);
    node.fill("d/", 40);
    let snaps = tmp.path().join("snaps");
    let (good, r) = snapshot(&node, &snaps);
    node.put("after", "the-snapshot");
    let before = (node.pid(), node.dump(), node.cluster_id());
    let v = verify(&node, &["--snapshot", good.to_str().unwrap(), "--deep"]).success();
    assert_eq!(v["verify"]["drill"].as_str(), Some("passed"));
    assert_eq!(v["verify"]["keys"].as_str(), Some("40"));
    assert_eq!(v["verify"]["revision"], r["snapshot"]["revision"]);
    assert!(
        v["verify"]["seconds"]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
    assert_eq!(
        (node.pid(), node.dump(), node.cluster_id()),
        before,
        "the live etcd kept its pid, data and cluster"
    );
    assert_eq!(node.member_names(), vec!["unit".to_string()]);
    assert_eq!(
        files_in(&node.data_dir().join(".etcd-actions")),
        vec!["lock".to_string()],
        "the drill removed everything"
    );
    assert!(!running_drill(tmp.path()), "the throwaway etcd was stopped");
}

/// Whether any process still runs from a drill dir of this test.
fn running_drill(base: &Path) -> bool {
    fs::read_dir("/proc").unwrap().flatten().any(|e| {
        fs::read(e.path().join("cmdline"))
            .map(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains(&*base.to_string_lossy()) && c.contains("drill-")
            })
            .unwrap_or(false)
    })
}

#[test]
fn deep_drill_on_etcd_35() {
    deep_drill(&v35());
}

#[test]
fn deep_drill_on_etcd_34() {
    deep_drill(&v34());
}
