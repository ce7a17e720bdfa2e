//! The restore action: cloning, migration, refusals, and scale-out afterwards.

use std::fs;
use std::path::{Path, PathBuf};

use crate::util::*;

/// Takes a snapshot of `node` standalone; returns the archive path and results.
pub fn snapshot(node: &Node, target: &Path) -> (PathBuf, serde_yaml::Value) {
    let r = Agent::snapshot(node, target.to_str().unwrap())
        .run()
        .success();
    (PathBuf::from(r["snapshot"]["path"].as_str().unwrap()), r)
}

#[test]
fn cloning_a_member_of_three_onto_a_new_unit_with_backup() {
    let tmp = tempdir();
    let nodes = cluster(tmp.path(), "old", &v35());
    nodes[0].fill("cluster/", 300);
    let snap_dir = tmp.path().join("snaps");
    let juju_old = Juju::new(&tmp.path().join("old-juju"), "etcd/0");
    juju_old.params(
        "snapshot",
        serde_json::json!({"target": snap_dir.to_str().unwrap()}),
    );
    let sr = Agent::juju(&nodes[0], &juju_old, "snapshot")
        .run()
        .juju_ok(&juju_old);
    let archive = PathBuf::from(sr["snapshot"]["path"].as_str().unwrap());
    let wanted = nodes[0].dump();

    // The new unit already holds other keys.
    let new = Node::single(&tmp.path().join("new"), "new0", &v35());
    new.fill("stale/", 40);
    let previous = new.dump();
    let old_cluster = new.cluster_id();
    let juju = Juju::new(&tmp.path().join("new"), "new-etcd/0");
    juju.attach("snapshot", &archive);
    let backups = tmp.path().join("backups");
    juju.params("restore", serde_json::json!({"target": backups.to_str().unwrap(), "sha256": sr["snapshot"]["sha256"]}));
    let r = Agent::juju(&new, &juju, "restore").run().juju_ok(&juju);

    assert_eq!(new.dump(), wanted, "exactly the snapshot's keys");
    assert_ne!(new.cluster_id(), old_cluster, "a new cluster id");
    assert_eq!(
        new.member_names(),
        vec!["new0".to_string()],
        "itself as the only member"
    );
    assert_eq!(
        r["restore"]["cluster-id"].as_str().unwrap(),
        format!("{:x}", new.cluster_id())
    );
    assert_eq!(r["restore"]["keys"].as_str(), Some("300"));
    assert_eq!(
        r["restore"]["revision"].as_str().unwrap(),
        sr["snapshot"]["revision"].as_str().unwrap()
    );
    assert_eq!(r["restore"]["sha256"], sr["snapshot"]["sha256"]);
    assert_eq!(r["restore"]["member"].as_str(), Some("new0"));
    assert_eq!(r["restore"]["etcd-version"].as_str(), Some("3.5.1"));
    assert!(
        r["restore"]["revision-bump"]
            .as_str()
            .unwrap()
            .starts_with("not applied"),
        "3.5.1 has no --bump-revision"
    );
    assert!(r["restore"]["source"]
        .as_str()
        .unwrap()
        .ends_with("resources/snapshot"));
    assert!(
        juju.statuses()
            .lines()
            .any(|l| l.starts_with("maintenance")),
        "{}",
        juju.statuses()
    );
    assert!(
        juju.statuses()
            .lines()
            .last()
            .unwrap()
            .starts_with("active"),
        "{}",
        juju.statuses()
    );

    // The backup is an archive like a snapshot; restoring it brings the previous keys back.
    let backup = PathBuf::from(r["backup"]["path"].as_str().unwrap());
    assert_eq!(
        r["backup"]["sha256"].as_str().unwrap(),
        sha256_file(&backup)
    );
    let again = Agent::restore(&new, backup.to_str().unwrap(), &["--skip-backup"])
        .run()
        .success();
    assert_eq!(
        new.dump(),
        previous,
        "the backup reproduces the unit's previous keys"
    );
    assert_eq!(
        again["backup"]["path"].as_str().unwrap(),
        "skipped (skip-backup=true)"
    );
    // Nothing left in the state dir but the lock and the data the restore replaced.
    assert_eq!(
        files_in(&new.data_dir().join(".etcd-actions")),
        kept_previous()
    );
}

#[test]
fn scale_out_after_restore() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("x/", 200);
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let unit = Node::single(tmp.path(), "u0", &v35());
    Agent::restore(&unit, archive.to_str().unwrap(), &["--skip-backup"])
        .run()
        .success();

    // Add a second member the usual way.
    let base = tmp.path().join("joiner");
    fs::create_dir_all(&base).unwrap();
    let joiner = Node::prepare(&base, "u1", &v35());
    let initial = format!("u0={},u1={}", unit.peer_url(), joiner.peer_url());
    unit.ctl_ok(&[
        "member",
        "add",
        "u1",
        &format!("--peer-urls={}", joiner.peer_url()),
    ]);
    joiner.write_config(&initial, "existing", "unused");
    joiner.start();
    joiner.wait_healthy();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while joiner
        .try_ctl(&["get", "x/0199", "--consistency=s"])
        .map(|o| o.is_empty())
        .unwrap_or(true)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the new member did not replicate"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(joiner.dump(), src.dump());
    assert_eq!(unit.member_names().len(), 2);
}

#[test]
fn refuses_scaled_clusters_and_changes_nothing() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("s/", 10);
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));

    // Juju: two peers on the cluster relation.
    let unit = Node::single(tmp.path(), "p0", &v35());
    unit.fill("mine/", 10);
    let (before, cid) = (unit.dump(), unit.cluster_id());
    let juju = Juju::new(tmp.path(), "etcd/0");
    juju.peers(&["etcd/1", "etcd/2"]);
    juju.attach("snapshot", &archive);
    let backups = tmp.path().join("backups");
    juju.restore_into(&backups);
    let msg = Agent::juju(&unit, &juju, "restore")
        .run()
        .juju_failed(&juju);
    assert!(
        msg.contains("3 units") && msg.contains("etcd/0, etcd/1, etcd/2"),
        "{msg}"
    );
    assert!(
        msg.contains("juju deploy etcd new-etcd --resource snapshot="),
        "{msg}"
    );
    assert_eq!((unit.dump(), unit.cluster_id()), (before, cid));
    assert!(!backups.exists() || files_in(&backups).is_empty());

    // Standalone: a member of a 3-member etcd cluster.
    let nodes = cluster(&tmp.path().join("c"), "c", &v35());
    nodes[0].fill("c/", 5);
    let (before, cid) = (nodes[1].dump(), nodes[1].cluster_id());
    let run = Agent::restore(&nodes[1], archive.to_str().unwrap(), &["--skip-backup"]).run();
    let msg = run.failure();
    assert!(
        msg.contains("3 etcd members") && msg.contains("c0, c1, c2"),
        "{msg}"
    );
    assert_eq!(run.code(), 3);
    assert_eq!((nodes[1].dump(), nodes[1].cluster_id()), (before, cid));
    assert_eq!(nodes[0].member_names().len(), 3);
}

#[test]
fn skip_backup_writes_no_backup() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("s/", 10);
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let unit = Node::single(tmp.path(), "u", &v35());
    unit.fill("old/", 10);
    let juju = Juju::new(tmp.path(), "etcd/0");
    let backups = tmp.path().join("backups");
    juju.params("restore", serde_json::json!({"target": backups.to_str().unwrap(), "skip-backup": true, "snapshot": archive.to_str().unwrap()}));
    let r = Agent::juju(&unit, &juju, "restore").run().juju_ok(&juju);
    assert!(!backups.exists(), "no backup directory was made");
    assert!(r["backup"]["path"].as_str().unwrap().starts_with("skipped"));
    assert_eq!(unit.dump(), src.dump());
}

#[test]
fn migration_from_etcd_34_to_35() {
    let tmp = tempdir();
    let old = Node::single(tmp.path(), "v34", &v34());
    old.fill("k8s/", 150);
    let (archive, sr) = snapshot(&old, &tmp.path().join("snaps"));
    assert!(sr["snapshot"]["etcd-version"]
        .as_str()
        .unwrap()
        .starts_with("3.4."));
    let new = Node::single(tmp.path(), "v35", &v35());
    let r = Agent::restore(
        &new,
        archive.to_str().unwrap(),
        &["--target", tmp.path().join("b").to_str().unwrap()],
    )
    .run()
    .success();
    assert_eq!(new.dump(), old.dump());
    assert_eq!(r["restore"]["etcd-version"].as_str(), Some("3.5.1"));

    // The other way is refused: a 3.5 snapshot on a 3.4 unit.
    let (archive35, _) = snapshot(&new, &tmp.path().join("snaps35"));
    let (before, cid) = (old.dump(), old.cluster_id());
    let msg = Agent::restore(&old, archive35.to_str().unwrap(), &["--skip-backup"])
        .run()
        .failure();
    assert!(msg.contains("newer than this unit's etcd 3.4"), "{msg}");
    assert_eq!((old.dump(), old.cluster_id()), (before, cid));
}

#[test]
fn restore_on_etcd_34_with_etcdctl() {
    let tmp = tempdir();
    let unit = Node::single(tmp.path(), "u34", &v34());
    unit.fill("a/", 30);
    let (archive, _) = snapshot(&unit, &tmp.path().join("snaps"));
    let wanted = unit.dump();
    unit.fill("b/", 30);
    let r = Agent::restore(
        &unit,
        archive.to_str().unwrap(),
        &["--target", tmp.path().join("b").to_str().unwrap()],
    )
    .run()
    .success();
    assert_eq!(unit.dump(), wanted);
    assert!(r["restore"]["etcd-version"]
        .as_str()
        .unwrap()
        .starts_with("3.4."));
    assert_eq!(r["backup"]["keys"].as_str(), Some("60"));
}

#[test]
fn missing_or_empty_resource_changes_nothing() {
    let tmp = tempdir();
    let unit = Node::single(tmp.path(), "r0", &v35());
    unit.fill("keep/", 10);
    let (before, cid) = (unit.dump(), unit.cluster_id());
    let juju = Juju::new(tmp.path(), "etcd/0");
    let backups = tmp.path().join("backups");
    juju.restore_into(&backups);
    let msg = Agent::juju(&unit, &juju, "restore")
        .run()
        .juju_failed(&juju);
    assert!(
        msg.contains("not attached") && msg.contains("juju attach-resource etcd snapshot="),
        "{msg}"
    );
    juju.reset();
    juju.attach_bytes("snapshot", b"");
    let msg = Agent::juju(&unit, &juju, "restore")
        .run()
        .juju_failed(&juju);
    assert!(
        msg.contains("zero-byte") && msg.contains("attach-resource"),
        "{msg}"
    );
    assert_eq!((unit.dump(), unit.cluster_id()), (before, cid));
    assert!(!backups.exists());
}

#[test]
fn restore_when_etcd_is_down_takes_a_raw_backup() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("new/", 20);
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let unit = Node::single(tmp.path(), "down", &v35());
    unit.fill("old/", 20);
    let previous = unit.dump();
    unit.stop();
    let backups = tmp.path().join("backups");
    let r = Agent::restore(
        &unit,
        archive.to_str().unwrap(),
        &["--target", backups.to_str().unwrap()],
    )
    .run()
    .success();
    assert_eq!(unit.dump(), src.dump());
    assert_eq!(r["backup"]["source"].as_str(), Some("raw-copy"));
    // The raw backup restores too (skip-hash-check semantics, reported as such).
    let back = Agent::restore(
        &unit,
        r["backup"]["path"].as_str().unwrap(),
        &["--skip-backup"],
    )
    .run()
    .success();
    assert_eq!(unit.dump(), previous);
    assert!(
        back["restore"]["integrity"]
            .as_str()
            .unwrap()
            .contains("raw db copy"),
        "{:?}",
        back["restore"]["integrity"]
    );
}

/// A stop command that returns while etcd still runs (here `true`), or that leaves the db
/// held open: the restore waits for etcd to be really gone, and when it is not, swaps nothing,
/// runs the start command, removes the staging area and says which check failed.
#[test]
fn a_stop_command_that_leaves_etcd_running_changes_nothing() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("old/", 50);
    let (archive, _) = snapshot(&node, &tmp.path().join("snaps"));
    node.fill("new/", 50);
    let before = (node.dump(), node.cluster_id(), node.pid());
    let state = node.data_dir().join(".etcd-actions");
    let leftovers = || {
        files_in(&state)
            .into_iter()
            .filter(|n| n != "lock")
            .collect::<Vec<_>>()
    };

    let run = Agent::restore(&node, archive.to_str().unwrap(), &["--skip-backup"])
        .env("ETCD_ACTIONS_STOP_COMMAND", "true")
        .env("ETCD_ACTIONS_START_TIMEOUT", "3")
        .run();
    let msg = run.failure();
    assert!(
        msg.contains("etcd is still running") && msg.contains("still accepts connections"),
        "{msg}"
    );
    assert!(msg.contains("nothing was swapped"), "{msg}");
    assert_eq!((node.dump(), node.cluster_id(), node.pid()), before);
    assert_eq!(leftovers(), Vec::<String>::new(), "staging removed");

    // Stopped, but something still holds the db open (bbolt's flock): no swap either.
    let db = node.data_dir().join("member/snap/db");
    let marker = tmp.path().join("locked");
    let stop = format!(
        "{stop} && (flock -x {db} -c 'touch {m}; sleep 6' >/dev/null 2>&1 &) ; \
         while [ ! -e {m} ]; do sleep 0.05; done",
        stop = node.stop_command(),
        db = db.display(),
        m = marker.display()
    );
    let run = Agent::restore(&node, archive.to_str().unwrap(), &["--skip-backup"])
        .env("ETCD_ACTIONS_STOP_COMMAND", stop)
        .env("ETCD_ACTIONS_START_TIMEOUT", "2")
        .run();
    let msg = run.failure();
    assert!(
        msg.contains("etcd is still running") && msg.contains("still locked"),
        "{msg}"
    );
    // The start command ran (etcd may wait for the lock: give it the time the holder keeps it).
    node.wait_healthy();
    assert_eq!((node.dump(), node.cluster_id()), (before.0, before.1));
    assert_eq!(leftovers(), Vec::<String>::new(), "staging removed");

    // With an honest stop command the same archive restores.
    std::thread::sleep(std::time::Duration::from_secs(1));
    Agent::restore(&node, archive.to_str().unwrap(), &["--skip-backup"])
        .run()
        .success();
    assert!(node.dump().keys().all(|k| k.starts_with("old/")));
}
