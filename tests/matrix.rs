//! The etcd people run: 3.4.23, 3.5.1, 3.5.30, 3.6.15 and 3.7.2 (the 3.6 and 3.7 servers with
//! the 3.5.30 etcdctl and etcdutl: no 3.6/3.7 tools can be had here). On each: a snapshot
//! whose revision is what etcdutl reads from the same bytes, a restore drill, a restore with
//! etcd running and one with etcd stopped; the upgrade path; downgrades refused; the revision
//! bump seen by a Range and a watch.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::revision::upstream_revision;
use crate::util::*;

fn snapshot_into(node: &Node, dir: &Path) -> (PathBuf, serde_yaml::Value) {
    let r = Agent::snapshot(node, dir.to_str().unwrap()).run().success();
    (PathBuf::from(r["snapshot"]["path"].as_str().unwrap()), r)
}

fn restore(node: &Node, archive: &Path, backups: &Path) -> serde_yaml::Value {
    Agent::restore(
        node,
        archive.to_str().unwrap(),
        &["--target", backups.to_str().unwrap()],
    )
    .run()
    .success()
}

/// Checks that the unit's revision is past the snapshot's by the bump, and that reads and
/// watches at the snapshot's revision are told it is compacted (kube-apiserver relists).
fn assert_bumped(node: &Node, snapshot_rev: i64, r: &serde_yaml::Value) {
    // The margin, plus however far the unit had gone past the snapshot (issue 26).
    assert!(
        r["restore"]["revision-bump"]
            .as_str()
            .and_then(|b| b.parse::<i64>().ok())
            .is_some_and(|b| b >= 1_000_000_000),
        "{r:?}"
    );
    assert!(node.revision() >= snapshot_rev + 1_000_000_000);
    let old = snapshot_rev.to_string();
    let err = node
        .try_ctl(&["get", "m/", "--prefix", "--rev", &old])
        .unwrap_err();
    assert!(err.contains("compacted"), "{err}");
    let mut watch = node.ctl();
    watch.args(["watch", "m/", "--prefix", "--rev", &old]);
    let mut child = watch
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // etcdctl ends the watch when etcd cancels it; give it 10 s, then end it (by its pid).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("compacted"), "watch at {old}: {text}");
}

fn matrix(flavor: &Flavor) {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", flavor);
    node.fill("m/", 120);
    let snaps = tmp.path().join("snaps");
    let backups = tmp.path().join("backups");
    let at_snapshot = node.dump();

    // The snapshot's revision is what etcd's own tool reads from the same bytes.
    let (archive, r) = snapshot_into(&node, &snaps);
    let db = extract_db(&archive, &tmp.path().join("x"));
    let rev = upstream_revision(flavor, &db);
    assert_eq!(
        r["snapshot"]["revision"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap(),
        rev
    );
    assert!(r["snapshot"]["etcd-version"]
        .as_str()
        .unwrap()
        .starts_with(flavor.version));

    // A restore drill on a throwaway etcd of this version.
    let v = Agent::standalone(
        &node,
        &["verify", "--snapshot", archive.to_str().unwrap(), "--deep"],
    )
    .run()
    .success();
    assert_eq!(v["verify"]["drill"].as_str(), Some("passed"));
    assert_eq!(v["verify"]["keys"].as_str(), Some("120"));

    // Restore with etcd running: a new cluster holding the snapshot's data.
    node.put("after", "the snapshot");
    let before_id = node.cluster_id();
    let r = restore(&node, &archive, &backups);
    assert_eq!(node.dump(), at_snapshot);
    assert_ne!(node.cluster_id(), before_id);
    let bump = flavor.etcdutl.is_some() && flavor.version != "3.5";
    if bump {
        assert_bumped(&node, rev, &r);
    }

    // Restore with etcd stopped: the unit's version comes from its etcd binary, not the
    // (older, for 3.6 and 3.7) restore tool.
    node.put("after", "the first restore");
    node.stop();
    let r = restore(&node, &archive, &backups);
    assert!(node.running());
    assert_eq!(node.dump(), at_snapshot);
    if bump {
        assert_bumped(&node, rev, &r);
    }
}

#[test]
fn matrix_etcd_3_4_23() {
    matrix(&v34());
}

#[test]
fn matrix_etcd_3_5_1() {
    matrix(&v35());
}

#[test]
fn matrix_etcd_3_5_30() {
    matrix(&v3530());
}

#[test]
fn matrix_etcd_3_6_15() {
    matrix(&v3615());
}

#[test]
fn matrix_etcd_3_7_2() {
    matrix(&v372());
}

/// 3.4 → 3.5.30 → 3.6.15 → 3.7.2, each hop a new unit restored from the previous one's
/// snapshot; then a snapshot of a newer minor onto an older unit, running or stopped, is
/// refused before anything changes, naming both versions.
#[test]
fn the_upgrade_path_and_no_way_back() {
    let tmp = tempdir();
    let first = Node::single(&tmp.path().join("u34"), "u34", &v34());
    first.fill("m/", 50);
    first.put("from", "3.4");
    let want = first.dump();
    let (mut archive, _) = snapshot_into(&first, &tmp.path().join("s34"));
    let mut archives = vec![archive.clone()];
    let mut units = Vec::new();
    for (name, flavor) in [("u3530", v3530()), ("u3615", v3615()), ("u372", v372())] {
        let unit = Node::single(&tmp.path().join(name), name, &flavor);
        unit.put("before", "the restore");
        restore(&unit, &archive, &tmp.path().join(format!("b-{name}")));
        assert_eq!(unit.dump(), want, "{name}");
        archive = snapshot_into(&unit, &tmp.path().join(format!("s-{name}"))).0;
        archives.push(archive.clone());
        units.push(unit);
    }
    // Back down: the 3.7 snapshot onto the 3.6 unit, the 3.6 one onto the 3.5.30 unit.
    for (archive, unit, newer, older) in [
        (&archives[3], &units[1], "3.7.2", "3.6.15"),
        (&archives[2], &units[0], "3.6.15", "3.5.30"),
    ] {
        unit.put("kept", "yes");
        let before = (unit.dump(), unit.cluster_id(), unit.pid());
        let run = Agent::restore(
            unit,
            archive.to_str().unwrap(),
            &["--target", tmp.path().join("down").to_str().unwrap()],
        )
        .run();
        assert_eq!(run.code(), 3);
        let msg = run.failure();
        assert!(msg.contains(newer) && msg.contains(older), "{msg}");
        assert_eq!((unit.dump(), unit.cluster_id(), unit.pid()), before);
        // Stopped, the unit's version comes from its etcd binary: still refused.
        unit.stop();
        let run = Agent::restore(unit, archive.to_str().unwrap(), &["--skip-backup"]).run();
        let msg = run.failure();
        assert!(msg.contains(newer) && msg.contains(older), "{msg}");
        assert!(
            !unit.running(),
            "a refused restore starts nothing it did not stop"
        );
        unit.start();
        unit.wait_healthy();
        assert_eq!(unit.dump(), before.0);
    }
    assert_older_server_refuses(&units[2], &v3615());
}

/// Why a newer minor is refused: etcd 3.6 will not start on a data dir etcd 3.7 wrote.
fn assert_older_server_refuses(unit: &Node, older: &Flavor) {
    unit.stop();
    let mut child = std::process::Command::new(&older.etcd)
        .arg("--config-file")
        .arg(unit.config_path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_some_and(|s| !s.success()) && log.contains("not supported"),
        "etcd {} started on a newer data dir: {status:?}\n{log}",
        older.version
    );
}

/// etcd 3.6 reports the db's storage version, which the manifest records; a 3.5 config
/// carrying keys 3.6 removed (`enable-v2`, `experimental-*`) is read without complaint.
#[test]
fn storage_version_and_removed_config_keys() {
    let tmp = tempdir();
    let node = Node::single(&tmp.path().join("a"), "a", &v3615());
    node.put("k", "v");
    let (_, r) = snapshot_into(&node, &tmp.path().join("s"));
    assert_eq!(r["snapshot"]["storage-version"].as_str(), Some("3.6.0"));

    let old = Node::single(&tmp.path().join("b"), "b", &v3530());
    old.put("k", "v");
    let mut config = fs::read_to_string(old.config_path()).unwrap();
    config.push_str("enable-v2: true\nexperimental-initial-corrupt-check: true\nexperimental-compact-hash-check-enabled: true\n");
    fs::write(old.config_path(), config).unwrap();
    old.stop();
    old.start();
    old.wait_healthy();
    let (archive, r) = snapshot_into(&old, &tmp.path().join("s2"));
    assert!(r["snapshot"]["storage-version"].is_null());
    restore(&old, &archive, &tmp.path().join("b2"));
    assert_eq!(old.ctl_ok(&["get", "k", "--print-value-only"]).trim(), "v");
}
