//! The snapshot action, standalone and in Juju mode.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use crate::util::*;

fn manifest_of(archive: &std::path::Path) -> serde_yaml::Value {
    let out = Command::new("tar")
        .arg("xzf")
        .arg(archive)
        .arg("-O")
        .arg("./manifest.yaml")
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_yaml::from_slice(&out.stdout).unwrap()
}

#[test]
fn standalone_snapshot_is_complete_and_restores_with_upstream_tools() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "s0", &v35());
    node.fill("k", 250);
    let target = tmp.path().join("snaps");
    let run = Agent::snapshot(&node, target.to_str().unwrap()).run();
    let r = run.success();
    let path = std::path::PathBuf::from(r["snapshot"]["path"].as_str().unwrap());

    // Name, results and sidecar.
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.starts_with("etcd-snapshot-") && name.ends_with(".tar.gz"),
        "{name}"
    );
    assert_eq!(path.parent().unwrap(), target);
    assert_eq!(
        r["snapshot"]["sha256"].as_str().unwrap(),
        sha256_file(&path)
    );
    let bytes = fs::metadata(&path).unwrap().len();
    assert_eq!(r["snapshot"]["bytes"].as_str().unwrap(), bytes.to_string());
    assert!(
        r["snapshot"]["size"].as_str().unwrap().ends_with('K'),
        "{:?}",
        r["snapshot"]["size"]
    );
    assert_eq!(r["snapshot"]["keys"].as_str(), Some("250"));
    assert_eq!(
        r["snapshot"]["revision"].as_str().unwrap(),
        node.revision().to_string()
    );
    assert_eq!(r["snapshot"]["etcd-version"].as_str(), Some("3.5.1"));
    assert_eq!(
        r["snapshot"]["cluster-id"].as_str().unwrap(),
        format!("{:x}", node.cluster_id())
    );
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_eq!(
        r["copy"]["cmd"].as_str().unwrap(),
        format!("scp {host}:{} .", path.display())
    );
    assert_sidecar_ok(&path);

    // Permissions: 0600 archive in a 0700 directory it created.
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // Content: ./db then ./manifest.yaml, nothing else.
    let list = Command::new("tar").arg("tzf").arg(&path).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&list.stdout),
        "./db\n./manifest.yaml\n"
    );
    let db = extract_db(&path, &tmp.path().join("x"));
    let raw = fs::read(&db).unwrap();
    assert_eq!(raw.len() % 512, 32, "etcd's sha256 trailer is kept");
    assert_eq!(
        meta_size(&raw),
        Some(raw.len() as u64),
        "the size streamed is the size etcd's first page announces"
    );
    use sha2::Digest;
    assert_eq!(
        &raw[raw.len() - 32..],
        &sha2::Sha256::digest(&raw[..raw.len() - 32])[..],
        "trailer verifies"
    );
    let m = manifest_of(&path);
    assert_eq!(m["format-version"].as_u64(), Some(1));
    assert_eq!(m["source"].as_str(), Some("snapshot-api"));
    assert_eq!(m["db-size"].as_u64(), Some(raw.len() as u64));
    assert_eq!(
        m["db-sha256"].as_str().unwrap(),
        hex::encode(sha2::Sha256::digest(&raw))
    );
    assert_eq!(m["keys"].as_u64(), Some(250));
    assert_eq!(m["member-name"].as_str(), Some("s0"));
    assert_eq!(m["etcd-version"].as_str(), Some("3.5.1"));
    for key in [
        "created",
        "tool-version",
        "unit",
        "cluster-id",
        "member-id",
        "revision",
    ] {
        assert!(!m[key].is_null(), "manifest lacks {key}: {m:?}");
    }

    // Round trip with upstream etcdutl: every key comes back.
    let before = node.dump();
    let restored = tmp.path().join("up");
    fs::create_dir_all(&restored).unwrap();
    let fresh = Node::single(&restored, "s0", &v35());
    fresh.stop();
    fs::remove_dir_all(fresh.data_dir()).unwrap();
    let st = Command::new(v35().etcdutl.unwrap())
        .args(["snapshot", "restore"])
        .arg(&db)
        .arg(format!("--data-dir={}", fresh.data_dir().display()))
        .arg("--name=s0")
        .arg(format!("--initial-cluster=s0={}", fresh.peer_url()))
        .arg(format!(
            "--initial-advertise-peer-urls={}",
            fresh.peer_url()
        ))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    fresh.start();
    fresh.wait_healthy();
    assert_eq!(fresh.dump(), before);
}

#[test]
fn juju_snapshot_via_the_charm_link_reports_through_hook_tools() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "j0", &v35());
    node.fill("a", 20);
    let juju = Juju::new(tmp.path(), "etcd/0");
    let target = tmp.path().join("backups");
    juju.params(
        "snapshot",
        serde_json::json!({"target": target.to_str().unwrap()}),
    );
    let run = Agent::juju(&node, &juju, "snapshot").run();
    let r = run.juju_ok(&juju);
    let path = r["snapshot"]["path"].as_str().unwrap();
    assert_eq!(
        r["snapshot"]["sha256"].as_str().unwrap(),
        sha256_file(std::path::Path::new(path))
    );
    assert_eq!(
        r["copy"]["cmd"].as_str().unwrap(),
        format!("juju scp etcd/0:{path} .")
    );
    for key in [
        "size",
        "bytes",
        "revision",
        "keys",
        "etcd-version",
        "cluster-id",
    ] {
        assert!(
            r["snapshot"][key].is_string(),
            "missing snapshot.{key}: {r}"
        );
    }
    assert!(
        juju.log().contains("snapshot of member"),
        "progress goes to action-log: {}",
        juju.log()
    );
    assert!(
        run.stdout().is_empty(),
        "Juju mode prints no YAML: {}",
        run.stdout()
    );
}

#[test]
fn juju_snapshot_uses_the_default_target_param() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "d0", &v35());
    let juju = Juju::new(tmp.path(), "etcd/3");
    juju.params("snapshot", serde_json::json!({}));
    let p = juju.state.join("params.json");
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    assert_eq!(
        v["target"].as_str(),
        Some("/home/ubuntu/etcd-snapshots"),
        "actions.yaml default"
    );
    // Point the default somewhere harmless: the fake applies defaults exactly as Juju would.
    juju.params(
        "snapshot",
        serde_json::json!({"target": tmp.path().join("t").to_str().unwrap()}),
    );
    let r = Agent::juju(&node, &juju, "snapshot").run().juju_ok(&juju);
    assert!(r["snapshot"]["path"]
        .as_str()
        .unwrap()
        .starts_with(tmp.path().join("t").to_str().unwrap()));
}

#[test]
fn snapshot_of_one_member_of_a_three_member_cluster() {
    let tmp = tempdir();
    let nodes = cluster(tmp.path(), "m", &v34());
    nodes[0].fill("c", 100);
    let target = tmp.path().join("snaps");
    let r = Agent::snapshot(&nodes[1], target.to_str().unwrap())
        .run()
        .success();
    assert_eq!(r["snapshot"]["keys"].as_str(), Some("100"));
    assert_eq!(
        r["snapshot"]["etcd-version"]
            .as_str()
            .unwrap()
            .split('.')
            .take(2)
            .collect::<Vec<_>>(),
        ["3", "4"]
    );
    let m = manifest_of(std::path::Path::new(
        r["snapshot"]["path"].as_str().unwrap(),
    ));
    assert_eq!(m["member-name"].as_str(), Some("m1"));
    let raw = fs::read(extract_db(
        std::path::Path::new(r["snapshot"]["path"].as_str().unwrap()),
        &tmp.path().join("x"),
    ))
    .unwrap();
    assert_eq!(meta_size(&raw), Some(raw.len() as u64), "etcd 3.4");
}

#[test]
fn concurrent_snapshots_get_distinct_names_and_stay_intact() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "c0", &v35());
    node.fill("p", 300);
    let target = tmp.path().join("snaps");
    let children: Vec<_> = (0..4)
        .map(|_| Agent::snapshot(&node, target.to_str().unwrap()).spawn())
        .collect();
    let mut paths = Vec::new();
    for c in children {
        let out = wait_ok(c);
        let y: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
        paths.push(
            y["results"]["snapshot"]["path"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut unique = paths.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "{paths:?}");
    for p in &paths {
        assert_sidecar_ok(std::path::Path::new(p));
        assert!(Command::new("tar")
            .arg("tzf")
            .arg(p)
            .output()
            .unwrap()
            .status
            .success());
    }
    let names = files_in(&target);
    assert_eq!(
        names.len(),
        12,
        "only archives and sidecars remain: {names:?}"
    );
}

#[test]
fn archive_belongs_to_the_target_owner() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "o0", &v35());
    let home = tmp.path().join("home-ubuntu");
    fs::create_dir(&home).unwrap();
    nix::unistd::chown(
        &home,
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .unwrap();
    let target = home.join("etcd-snapshots");
    let r = Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let md = fs::metadata(r["snapshot"]["path"].as_str().unwrap()).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.permissions().mode() & 0o777),
        (1000, 1000, 0o600)
    );
    let dir = fs::metadata(&target).unwrap();
    assert_eq!(
        (dir.uid(), dir.permissions().mode() & 0o777),
        (1000, 0o700),
        "created target belongs to the parent's owner"
    );
    let sidecar = fs::metadata(format!(
        "{}.sha256",
        r["snapshot"]["path"].as_str().unwrap()
    ))
    .unwrap();
    assert_eq!(sidecar.uid(), 1000);
}

#[test]
fn tls_with_client_certificates_and_no_secrets_in_output() {
    let tmp = tempdir();
    let node = single_tls(tmp.path(), "tls0", &v35());
    node.fill("secret/", 30);
    node.put("password", "hunter2-do-not-print");
    let target = tmp.path().join("snaps");
    let run = Agent::snapshot(&node, target.to_str().unwrap()).run();
    let r = run.success();
    assert_eq!(r["snapshot"]["keys"].as_str(), Some("31"));
    let archive = r["snapshot"]["path"].as_str().unwrap().to_string();
    let wanted = node.dump();
    node.put("extra", "x");
    let restore = Agent::restore(
        &node,
        &archive,
        &["--target", tmp.path().join("b").to_str().unwrap()],
    )
    .run();
    restore.success();
    assert_eq!(node.dump(), wanted);
    let key = fs::read_to_string(node.tls.as_ref().unwrap().join("client.key")).unwrap();
    let key_line = key.lines().nth(1).unwrap();
    for output in [
        run.stdout(),
        run.stderr(),
        restore.stdout(),
        restore.stderr(),
    ] {
        assert!(
            !output.contains("PRIVATE KEY") && !output.contains(key_line),
            "key material printed: {output}"
        );
        assert!(
            !output.contains("hunter2"),
            "an etcd value was printed: {output}"
        );
    }
}

/// The size bbolt's first meta page announces, with etcd's 32-byte trailer.
fn meta_size(raw: &[u8]) -> Option<u64> {
    let mut walk = etcd_actions::revision::RevisionFinder::new(0);
    walk.update(&raw[..4096]);
    walk.db_size().map(|s| s + 32)
}
