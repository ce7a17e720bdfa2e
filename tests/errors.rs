//! Each failure names the problem and the way forward, and leaves nothing behind.

use std::fs;
use std::process::Command;

use crate::util::*;

fn snapshot_fails_cleanly(node: &Node, target: &std::path::Path, agent: Agent) -> String {
    let before = files_in(target);
    let msg = agent.run().failure();
    assert_eq!(
        files_in(target),
        before,
        "nothing left in the target after: {msg}"
    );
    let _ = node;
    msg
}

#[test]
fn unreachable_etcd_missing_tools_and_bad_config() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "e0", &v35());
    let target = tmp.path().join("snaps");
    fs::create_dir(&target).unwrap();
    let t = target.to_str().unwrap();

    // etcd unreachable: the service is stopped.
    node.stop();
    let msg = snapshot_fails_cleanly(&node, &target, Agent::snapshot(&node, t));
    assert!(
        msg.contains("not reachable") && msg.contains(&node.endpoint()),
        "{msg}"
    );
    node.start();
    node.wait_healthy();

    // No etcdctl anywhere, not even on PATH: a snapshot does not need one.
    let mut run = Agent::snapshot(&node, t).env("PATH", "/nonexistent");
    run.command().env_remove("ETCD_ACTIONS_ETCDCTL");
    let out = run.run().success();
    assert!(out["snapshot"]["path"].as_str().is_some(), "{out:?}");

    // Config missing or unreadable.
    let msg = snapshot_fails_cleanly(
        &node,
        &target,
        Agent::snapshot(&node, t).env("ETCD_ACTIONS_ETCD_CONFIG", "/nonexistent/etcd.conf.yml"),
    );
    assert!(
        msg.contains("/nonexistent/etcd.conf.yml") && msg.contains("ETCD_ACTIONS_ETCD_CONFIG"),
        "{msg}"
    );
    let garbage = tmp.path().join("garbage.yml");
    fs::write(&garbage, "name: [unclosed\n").unwrap();
    let msg = snapshot_fails_cleanly(
        &node,
        &target,
        Agent::snapshot(&node, t).env("ETCD_ACTIONS_ETCD_CONFIG", &garbage),
    );
    assert!(msg.contains("not valid YAML"), "{msg}");
}

#[test]
fn bad_targets_are_refused() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "t0", &v35());
    let run = Agent::snapshot(&node, "relative/dir").run();
    let msg = run.failure();
    assert!(
        msg.contains("relative") && msg.contains("absolute"),
        "{msg}"
    );
    assert_eq!(run.code(), 2);
    assert!(!std::path::Path::new("relative").exists());

    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let msg = Agent::snapshot(&node, file.to_str().unwrap())
        .run()
        .failure();
    assert!(msg.contains("not a directory"), "{msg}");
    assert_eq!(fs::read(&file).unwrap(), b"x");

    // Read-only filesystem: unwritable even for root.
    let _g = heavy_lock();
    let ro = tmp.path().join("ro");
    fs::create_dir(&ro).unwrap();
    mount_tmpfs(&ro, "1m", true);
    let msg = Agent::snapshot(&node, ro.to_str().unwrap()).run().failure();
    umount(&ro);
    assert!(
        msg.contains("not writable") || msg.contains("Read-only"),
        "{msg}"
    );
}

pub fn mount_tmpfs(dir: &std::path::Path, size: &str, read_only: bool) {
    let opts = format!("size={size}{}", if read_only { ",ro" } else { "" });
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mounting a tmpfs needs root (the test suite runs as root on CI)"
    );
}

pub fn umount(dir: &std::path::Path) {
    let _ = std::process::Command::new("umount").arg(dir).status();
}

#[test]
fn full_target_fails_cleanly() {
    let _g = heavy_lock();
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "f0", &v35());
    node.fill("k", 500);
    let before = node.dump();

    // Too small from the start: the free-space check refuses before writing anything.
    let small = tmp.path().join("small");
    fs::create_dir(&small).unwrap();
    mount_tmpfs(&small, "3m", false);
    let msg = Agent::snapshot(&node, small.to_str().unwrap())
        .run()
        .failure();
    let left = files_in(&small);
    umount(&small);
    assert!(msg.contains("not enough free space"), "{msg}");
    assert!(left.is_empty(), "no files: {left:?}");

    // Filled up mid-action: another writer takes the rest of the space once etcd has
    // started streaming (the agent pauses there for the test).
    let full = tmp.path().join("full");
    fs::create_dir(&full).unwrap();
    mount_tmpfs(&full, "80m", false);
    let ctl = tmp.path().join("ctl");
    fs::create_dir(&ctl).unwrap();
    let mut child = Agent::snapshot(&node, full.to_str().unwrap())
        .env(
            "ETCD_ACTIONS_PAUSE",
            format!("snapshot-streaming:{}", ctl.display()),
        )
        .spawn();
    wait_reached(&ctl, "snapshot-streaming", &mut child);
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}/filler", full.display()))
        .arg("bs=64k")
        .stderr(std::process::Stdio::null())
        .status();
    go(&ctl, "snapshot-streaming");
    let run = Run {
        display: "snapshot into a filling target".into(),
        out: child.wait_with_output().unwrap(),
    };
    let msg = run.failure();
    let left = files_in(&full);
    umount(&full);
    // The write fails, or the agent's own check (every 16 MiB) stops it first.
    assert!(
        msg.contains("No space left") || msg.contains("writing stopped"),
        "{msg}"
    );
    assert_eq!(
        left,
        vec!["filler".to_string()],
        "no partial archive or temp file"
    );
    assert_eq!(node.dump(), before, "live data intact");
}

#[test]
fn juju_params_are_checked() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "p0", &v35());
    let juju = Juju::new(tmp.path(), "etcd/0");
    juju.params("snapshot", serde_json::json!({"target": 5}));
    let msg = Agent::juju(&node, &juju, "snapshot")
        .run()
        .juju_failed(&juju);
    assert!(msg.contains("`target`") && msg.contains("string"), "{msg}");
    juju.reset();
    juju.params("snapshot", serde_json::json!({"bogus": "x"}));
    let msg = Agent::juju(&node, &juju, "snapshot")
        .run()
        .juju_failed(&juju);
    assert!(msg.contains("unknown param `bogus`"), "{msg}");
    juju.reset();
    juju.params("snapshot", serde_json::json!({"target": "rel"}));
    let msg = Agent::juju(&node, &juju, "snapshot")
        .run()
        .juju_failed(&juju);
    assert!(msg.contains("relative"), "{msg}");
}

#[test]
fn help_and_version() {
    let out = std::process::Command::new(AGENT)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("snapshot") && text.contains("restore"),
        "{text}"
    );
    let out = std::process::Command::new(AGENT)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("etcd-actions "));
    let out = std::process::Command::new(AGENT)
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn data_filesystem_filling_up_during_restore_changes_nothing() {
    let _g = heavy_lock();
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("new/", 50);
    let (archive, _) = crate::restore::snapshot(&src, &tmp.path().join("snaps"));

    // The unit's data dir is a small filesystem of its own.
    let unit = Node::prepare(tmp.path(), "unit", &v35());
    fs::create_dir_all(unit.data_dir()).unwrap();
    mount_tmpfs(&unit.data_dir(), "300m", false);
    unit.start_alone();
    unit.fill("old/", 50);
    let before = (unit.dump(), unit.cluster_id());

    // Another writer takes all the space just as the restore tool starts writing.
    let wrapper = tmp.path().join("fill-then-etcdutl");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$*\" in *\"snapshot restore\"*--help*) ;; *\"snapshot restore\"*) dd if=/dev/zero of={data}/filler bs=64k 2>/dev/null;; esac\nexec \"{real}\" \"$@\"\n",
            data = unit.data_dir().display(),
            real = unit.flavor.etcdutl.as_ref().unwrap().display()
        ),
    )
    .unwrap();
    set_mode(&wrapper, 0o755);
    let msg = Agent::restore(&unit, archive.to_str().unwrap(), &["--skip-backup"])
        .env("ETCD_ACTIONS_ETCDUTL", &wrapper)
        .run()
        .failure();
    let state = files_in(&unit.data_dir().join(".etcd-actions"));
    let data = files_in(&unit.data_dir());
    let after = (unit.dump(), unit.cluster_id());
    unit.stop();
    umount(&unit.data_dir());
    assert!(
        msg.contains("no space left") || msg.contains("No space left"),
        "{msg}"
    );
    assert_eq!(after, before, "live data intact");
    assert_eq!(state, vec!["lock".to_string()], "no staging left behind");
    assert_eq!(
        data,
        vec![
            ".etcd-actions".to_string(),
            "filler".to_string(),
            "member".to_string()
        ]
    );
}
