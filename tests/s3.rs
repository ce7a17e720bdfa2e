//! Off-unit backups against a real S3 server (s3s-fs on loopback, SigV4 checked), with the
//! Juju `s3` relation faked as shared/s3-relation-contract.md describes.

use std::fs;
use std::path::{Path, PathBuf};

use crate::util::*;

const BUCKET: &str = "etcd-backups";

/// A snapshot in Juju mode with the relation set; returns the results.
fn juju_snapshot(node: &Node, juju: &Juju, target: &Path) -> serde_json::Value {
    juju.reset();
    juju.params(
        "snapshot",
        serde_json::json!({"target": target.to_str().unwrap()}),
    );
    Agent::juju(node, juju, "snapshot").run().juju_ok(juju)
}

fn juju_list(node: &Node, juju: &Juju, target: &Path) -> serde_json::Value {
    juju.reset();
    juju.params(
        "list-backups",
        serde_json::json!({"target": target.to_str().unwrap()}),
    );
    Agent::juju(node, juju, "list-backups").run().juju_ok(juju)
}

/// The entries of list-backups results, by id.
fn listed(results: &serde_json::Value) -> std::collections::BTreeMap<String, serde_json::Value> {
    let n: usize = results["count"].as_str().unwrap().parse().unwrap();
    (0..n)
        .map(|i| {
            let e = results["backups"][i.to_string()].clone();
            (e["id"].as_str().unwrap().to_string(), e)
        })
        .collect()
}

#[test]
fn round_trip_through_the_store_and_restore_by_backup_id() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("k/", 40);
    let juju = Juju::new(tmp.path(), "etcd/0");
    juju.s3_relation(s3.bag(BUCKET, "/clusters/prod/"), None);
    let local = tmp.path().join("local");
    let r = juju_snapshot(&src, &juju, &local);
    let path = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let key = format!("clusters/prod/etcd/{name}");
    assert_eq!(r["upload"]["url"], format!("s3://{BUCKET}/{key}").as_str());
    assert!(!r["upload"]["etag"].as_str().unwrap().is_empty());
    assert_eq!(r["upload"]["size"], r["snapshot"]["bytes"]);
    // The object is the archive, byte for byte, with its record beside it; no temp key.
    assert_eq!(
        s3.objects(BUCKET, ""),
        vec![key.clone(), format!("{key}.manifest.yaml")]
    );
    let record: serde_yaml::Value = serde_yaml::from_str(
        &fs::read_to_string(s3.dir.join(BUCKET).join(format!("{key}.manifest.yaml"))).unwrap(),
    )
    .unwrap();
    assert_eq!(record["sha256"], r["snapshot"]["sha256"].as_str().unwrap());
    assert_eq!(record["archive"], name.as_str());
    assert_eq!(
        record["revision"]
            .as_i64()
            .map(|r| r.to_string())
            .as_deref(),
        r["snapshot"]["revision"].as_str()
    );
    assert_eq!(
        sha256_file(&s3.dir.join(BUCKET).join(&key)),
        sha256_file(&path)
    );

    // list-backups: both places.
    let l = listed(&juju_list(&src, &juju, &local));
    let e = &l[&name];
    assert_eq!(e["where"], "both");
    assert_eq!(e["sha256"], r["snapshot"]["sha256"]);
    assert_eq!(e["revision"], r["snapshot"]["revision"]);

    // A fresh unit of another application restores it by id, from the store only.
    let fresh = Node::single(tmp.path(), "fresh", &v35());
    let juju2 = Juju::new(&tmp.path().join("j2"), "new-etcd/0");
    juju2.s3_relation(s3.bag(BUCKET, "/clusters/prod/"), None);
    juju2.params(
        "restore",
        serde_json::json!({"backup-id": format!("etcd/{name}"), "skip-backup": true}),
    );
    let rr = Agent::juju(&fresh, &juju2, "restore").run().juju_ok(&juju2);
    assert_eq!(rr["restore"]["origin"], "store");
    assert_eq!(rr["restore"]["sha256"], r["snapshot"]["sha256"]);
    assert_eq!(fresh.dump(), src.dump());

    // The credentials appear in no result, log, argv or child environment.
    let all = format!(
        "{r}{rr}{}{}{}{}",
        juju.calls(),
        juju.log(),
        juju2.calls(),
        juju2.log()
    );
    assert!(!all.contains(&s3.secret), "the secret key leaked");
}

#[test]
fn standalone_upload_keeps_credentials_out_of_children_and_lists_each_place() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("a/", 10);
    // etcdutl and the service commands record their environment and argv.
    let spy = tmp.path().join("spy");
    fs::create_dir(&spy).unwrap();
    let wrap = |name: &str, real: &Path| -> PathBuf {
        let w = spy.join(name);
        fs::write(
            &w,
            format!(
                "#!/bin/sh\nenv >> {d}/env.txt\necho \"$0 $*\" >> {d}/argv.txt\nexec \"{}\" \"$@\"\n",
                real.display(),
                d = spy.display()
            ),
        )
        .unwrap();
        set_mode(&w, 0o755);
        w
    };
    let utl = wrap("etcdutl", node.flavor.etcdutl.as_ref().unwrap());
    let local = tmp.path().join("local");
    let run = |agent: Agent| {
        s3.env(agent, BUCKET, "")
            .env("ETCD_ACTIONS_ETCDUTL", &utl)
            .run()
    };
    let r = run(Agent::snapshot(&node, local.to_str().unwrap())).success();
    let first = r["snapshot"]["path"].as_str().unwrap().to_string();
    assert!(r["upload"]["url"]
        .as_str()
        .unwrap()
        .starts_with("s3://etcd-backups/etcd/"));
    // One archive only in the store, one only local, one in both.
    let r2 = run(Agent::snapshot(&node, local.to_str().unwrap())).success();
    let second = PathBuf::from(r2["snapshot"]["path"].as_str().unwrap());
    fs::remove_file(&second).unwrap();
    fs::remove_file(format!("{}.sha256", second.display())).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r3 = Agent::snapshot(&node, local.to_str().unwrap())
        .run()
        .success();
    assert!(r3["upload"].is_null(), "no store configured, no upload");
    let l = run(Agent::standalone(
        &node,
        &["list-backups", "--target", local.to_str().unwrap()],
    ))
    .success();
    let n: usize = l["count"].as_str().unwrap().parse().unwrap();
    let mut places = std::collections::BTreeMap::new();
    for i in 0..n {
        let e = &l["backups"][i.to_string().as_str()];
        places.insert(
            e["id"].as_str().unwrap().to_string(),
            e["where"].as_str().unwrap().to_string(),
        );
        assert_ne!(e["revision"].as_str(), Some("unknown"), "{e:?}");
    }
    let name = |p: &str| {
        Path::new(p)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(places[&name(&first)], "both");
    assert_eq!(places[&name(second.to_str().unwrap())], "store");
    assert_eq!(
        places[&name(r3["snapshot"]["path"].as_str().unwrap())],
        "local"
    );
    assert!(!l["table"].as_str().unwrap().is_empty());

    // A restore by backup id runs etcdutl and the service commands: none of them (nor the
    // snapshots before, which run no child at all) sees the credentials.
    let spied = |cmd: String| format!("env >> {}/env.txt; {cmd}", spy.display());
    run(Agent::standalone(
        &node,
        &["restore", "--backup-id", &name(&first), "--skip-backup"],
    )
    .env("ETCD_ACTIONS_STOP_COMMAND", spied(node.stop_command()))
    .env("ETCD_ACTIONS_START_COMMAND", spied(node.start_command())))
    .success();
    let seen = fs::read_to_string(spy.join("env.txt")).unwrap()
        + &fs::read_to_string(spy.join("argv.txt")).unwrap();
    assert!(seen.contains("etcdutl snapshot restore"), "{seen}");
    assert!(!seen.contains(&s3.secret), "a child saw the secret");
    assert!(
        !seen.contains("AWS_ACCESS_KEY_ID"),
        "a child got the credentials"
    );
}

#[test]
fn a_v1_provider_with_the_keys_in_a_secret() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let node = Node::single(tmp.path(), "unit", &v35());
    let juju = Juju::new(tmp.path(), "etcd/0");
    let mut bag = s3.bag(BUCKET, "");
    let secret = serde_json::json!({"access-key": s3.access, "secret-key": s3.secret});
    bag.as_object_mut().unwrap().remove("access-key");
    bag.as_object_mut().unwrap().remove("secret-key");
    juju.s3_relation(bag, Some(secret));
    let r = juju_snapshot(&node, &juju, &tmp.path().join("local"));
    assert!(r["upload"]["url"].as_str().unwrap().starts_with("s3://"));
    assert!(juju.calls().contains("secret-get"));
    assert_eq!(s3.archives(BUCKET, "").len(), 1);
}

#[test]
fn store_failures_keep_the_local_archive_and_leave_no_object() {
    let tmp = tempdir();
    let mut s3 = S3::start(tmp.path(), &[BUCKET]);
    let node = Node::single(tmp.path(), "unit", &v35());
    let juju = Juju::new(tmp.path(), "etcd/0");
    let local = tmp.path().join("local");

    // A wrong secret.
    let mut bag = s3.bag(BUCKET, "");
    bag["secret-key"] = serde_json::json!("wrong-secret");
    juju.s3_relation(bag, None);
    juju.params(
        "snapshot",
        serde_json::json!({"target": local.to_str().unwrap()}),
    );
    let run = Agent::juju(&node, &juju, "snapshot").run();
    let msg = run.juju_failed(&juju);
    assert!(
        msg.contains(&s3.endpoint()) && msg.contains(BUCKET),
        "{msg}"
    );
    assert!(!msg.contains("wrong-secret"), "{msg}");
    let path = PathBuf::from(
        juju.results()["snapshot"]["path"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    assert!(path.is_file(), "the local archive stays");
    assert_sidecar_ok(&path);
    assert!(s3.objects(BUCKET, "").is_empty());

    // A missing bucket.
    juju.reset();
    juju.s3_relation(s3.bag("no-such-bucket", ""), None);
    let msg = Agent::juju(&node, &juju, "snapshot")
        .run()
        .juju_failed(&juju);
    assert!(msg.contains("no-such-bucket"), "{msg}");
    assert!(PathBuf::from(juju.results()["snapshot"]["path"].as_str().unwrap()).is_file());

    // The server dies before the upload completes: no object; after it is back, a rerun works.
    juju.reset();
    juju.s3_relation(s3.bag(BUCKET, ""), None);
    let ctl = tmp.path().join("ctl");
    fs::create_dir(&ctl).unwrap();
    let child = Agent::juju(&node, &juju, "snapshot")
        .env(
            "ETCD_ACTIONS_PAUSE",
            format!("archive-written:{}", ctl.display()),
        )
        .spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ctl.join("archive-written.reached").exists() {
        assert!(std::time::Instant::now() < deadline, "pause never reached");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    s3.kill();
    fs::write(ctl.join("archive-written.go"), b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let msg = juju.failure().expect("the upload failed");
    assert!(msg.contains("failed"), "{msg}");
    s3.restart();
    assert!(
        s3.objects(BUCKET, "").is_empty(),
        "{:?}",
        s3.objects(BUCKET, "")
    );
    let r = juju_snapshot(&node, &juju, &local);
    assert_eq!(s3.archives(BUCKET, "").len(), 1);
    assert!(r["upload"]["url"].as_str().is_some());

    // A relation whose credentials have not arrived.
    juju.reset();
    juju.s3_relation(serde_json::json!({}), None);
    let msg = Agent::juju(&node, &juju, "snapshot")
        .run()
        .juju_failed(&juju);
    assert!(msg.contains("waiting for the s3 provider"), "{msg}");
}

#[test]
fn bad_downloads_are_refused_and_plain_dbs_restore() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("s/", 30);
    let local = tmp.path().join("local");
    let r = s3
        .env(Agent::snapshot(&src, local.to_str().unwrap()), BUCKET, "")
        .run()
        .success();
    let key = r["upload"]["url"]
        .as_str()
        .unwrap()
        .trim_start_matches("s3://etcd-backups/")
        .to_string();
    let name = key.rsplit('/').next().unwrap().to_string();
    let object = s3.dir.join(BUCKET).join(&key);

    let unit = Node::single(tmp.path(), "unit", &v35());
    unit.fill("mine/", 10);
    let before = (unit.dump(), unit.cluster_id());
    let restore_id = |id: &str| {
        s3.env(
            Agent::standalone(
                &unit,
                &[
                    "restore",
                    "--backup-id",
                    id,
                    "--skip-backup",
                    "--target",
                    "/nonexistent-dir",
                ],
            ),
            BUCKET,
            "",
        )
        .run()
    };
    // Truncated.
    let good = fs::read(&object).unwrap();
    fs::write(&object, &good[..good.len() / 2]).unwrap();
    let run = restore_id(&name);
    let msg = run.failure();
    assert_eq!(run.code(), 3, "{msg}");
    assert_eq!((unit.dump(), unit.cluster_id()), before);
    // Same length, other bytes: the recorded sha256 does not match.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    fs::write(&object, &bad).unwrap();
    let msg = restore_id(&name).failure();
    assert!(msg.contains("sha256"), "{msg}");
    assert_eq!((unit.dump(), unit.cluster_id()), before);
    // Empty.
    fs::write(&object, b"").unwrap();
    let msg = restore_id(&name).failure();
    assert!(msg.contains("empty"), "{msg}");
    assert_eq!((unit.dump(), unit.cluster_id()), before);

    // A plain etcdctl db: by path, and uploaded by hand as a store object.
    let db = tmp.path().join("plain.db");
    src.ctl_ok(&["snapshot", "save", db.to_str().unwrap()]);
    let r = Agent::restore(&unit, db.to_str().unwrap(), &["--skip-backup"])
        .run()
        .success();
    assert!(r["restore"]["integrity"]
        .as_str()
        .unwrap()
        .contains("plain snapshot db"));
    assert_eq!(unit.dump(), src.dump());
    unit.put("changed", "after");
    fs::copy(&db, s3.dir.join(BUCKET).join("etcd/etcdctl-made.db")).unwrap();
    let r = restore_id("etcdctl-made.db").success();
    assert_eq!(r["restore"]["origin"], "store");
    assert_eq!(unit.dump(), src.dump());
}

#[test]
fn the_hook_asks_for_a_bucket_once_and_only_as_leader() {
    let tmp = tempdir();
    let juju = Juju::new(tmp.path(), "etcd/0");
    juju.s3_relation(serde_json::json!({}), None);
    let hooks = tmp.path().join("charm/hooks");
    fs::create_dir_all(&hooks).unwrap();
    let hook = hooks.join("s3-credentials-relation-joined");
    std::os::unix::fs::symlink(AGENT, &hook).unwrap();
    let run = |leader: &str| {
        fs::write(juju.state.join("leader"), leader).unwrap();
        let out = std::process::Command::new(&hook)
            .env(
                "PATH",
                format!("{}:{}", juju.bin.display(), std::env::var("PATH").unwrap()),
            )
            .env("JUJU_UNIT_NAME", "etcd/0")
            .env("JUJU_RELATION_ID", "s3-credentials:7")
            .env("FAKE_JUJU_STATE", &juju.state)
            .env_remove("JUJU_ACTION_NAME")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let apps: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(juju.state.join("relation-apps.json")).unwrap(),
        )
        .unwrap();
        apps["7"]["local"].clone()
    };
    assert_eq!(
        run("false"),
        serde_json::json!({}),
        "a non-leader writes nothing"
    );
    assert_eq!(
        run("true"),
        serde_json::json!({"bucket": "etcd-backups-etcd"})
    );
    let sets = juju.calls().matches("relation-set").count();
    assert_eq!(
        run("true"),
        serde_json::json!({"bucket": "etcd-backups-etcd"})
    );
    assert_eq!(
        juju.calls().matches("relation-set").count(),
        sets,
        "nothing changed, nothing set"
    );
}
