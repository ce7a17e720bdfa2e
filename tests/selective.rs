//! Selective restore: `export` writes the keys under a prefix at one revision (from the live
//! cluster, an archive read offline, or a point of the history), and `import` applies them to
//! the running cluster, guarded by the mod revisions it planned with. Real etcd 3.5.30 (and
//! 3.4 for the offline reader); exports decoded here independently (gzip, JSON, base64).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base64::Engine;

use crate::pitr::{follow, range, sigterm, wait_recorded};
use crate::util::*;

type Keys = BTreeMap<String, (String, i64, i64, i64, i64)>;

fn b64(s: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

/// An export's head and keys (key → value, create, mod, version, lease), decoded here.
fn read_export(path: &Path) -> (serde_json::Value, Keys) {
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let mut lines = text.lines();
    let head: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let keys: Keys = lines
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                b64(v["key"].as_str().unwrap()),
                (
                    b64(v["value"].as_str().unwrap()),
                    v["create_revision"].as_i64().unwrap(),
                    v["mod_revision"].as_i64().unwrap(),
                    v["version"].as_i64().unwrap(),
                    v["lease"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(head["count"].as_u64(), Some(keys.len() as u64), "{head}");
    (head, keys)
}

fn under(keys: &Keys, prefix: &str) -> Keys {
    keys.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn values(keys: &Keys) -> BTreeMap<String, String> {
    keys.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()
}

/// `etcd-actions <command> --target <target> <args>` standalone, for `node`.
fn agent(node: &Node, command: &str, target: &Path, args: &[&str]) -> Agent {
    let mut all = vec![command, "--target", target.to_str().unwrap()];
    all.extend_from_slice(args);
    Agent::standalone(node, &all)
}

fn export(node: &Node, target: &Path, args: &[&str]) -> (PathBuf, serde_yaml::Value) {
    let r = agent(node, "export", target, args).run().success();
    let path = PathBuf::from(r["export"]["path"].as_str().unwrap());
    (path, r)
}

fn import(node: &Node, target: &Path, args: &[&str]) -> Run {
    agent(node, "import", target, args).run()
}

/// Starts `agent` stopped at the pause point `point` (files in `dir`); returns once it is
/// there. Creating `<dir>/<point>.go` lets it go on.
fn paused_at(agent: Agent, point: &str, dir: &Path) -> std::process::Child {
    std::fs::create_dir_all(dir).unwrap();
    let child = agent
        .env("ETCD_ACTIONS_PAUSE", format!("{point}:{}", dir.display()))
        .spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !dir.join(format!("{point}.reached")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "never reached {point}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

fn count(r: &serde_yaml::Value, what: &str) -> u64 {
    r["import"][what]
        .as_str()
        .unwrap_or_else(|| panic!("import.{what} in {r:?}"))
        .parse()
        .unwrap()
}

fn counts(r: &serde_yaml::Value) -> [u64; 5] {
    ["added", "changed", "deleted", "unchanged", "conflicts"].map(|w| count(r, w))
}

#[test]
fn a_deleted_prefix_comes_back_from_the_newest_backup_while_others_write() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "s0", &v3530());
    let target = tmp.path().join("backups");
    let ns = "/registry/ns/shop/";
    node.fill(ns, 2000);
    node.fill("/registry/other/", 50);
    let lease_out = node.ctl_ok(&["lease", "grant", "600"]);
    let lease = lease_out.split_whitespace().nth(1).unwrap().to_string();
    node.ctl_ok(&["put", &format!("{ns}leased"), "lv", "--lease", &lease]);
    let snap = Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let archive = snap["snapshot"]["path"].as_str().unwrap().to_string();
    let backup = under(&range(&node, 0), ns);
    assert_eq!(backup.len(), 2001);

    // The mistake, and a key made under the prefix afterwards.
    node.ctl_ok(&["del", ns, "--prefix"]);
    node.put(&format!("{ns}extra"), "made later");
    let outside_before: BTreeMap<String, String> = values(&range(&node, 0))
        .into_iter()
        .filter(|(k, _)| !k.starts_with(ns))
        .collect();

    // Other writers keep writing elsewhere the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let endpoint = node.endpoint();
        let ctl = node.flavor.etcdctl.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let out = std::process::Command::new(&ctl)
                    .env("ETCDCTL_API", "3")
                    .args([
                        "--endpoints",
                        &endpoint,
                        "put",
                        &format!("/writer/{n:05}"),
                        &format!("w{n}"),
                    ])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                n += 1;
            }
            n
        })
    };

    // A dry run changes nothing, and says what the real run does.
    let rev = node.revision();
    let dry = import(
        &node,
        &target,
        &["--snapshot", &archive, "--prefix", ns, "--mode", "add"],
    )
    .success();
    assert_eq!(counts(&dry), [2001, 0, 0, 0, 0]);
    assert_eq!(dry["import"]["dry-run"].as_str(), Some("true"));
    assert_eq!(
        under(&range(&node, 0), ns).len(),
        1,
        "the dry run wrote nothing under the prefix"
    );
    assert!(node.revision() >= rev);

    // The real run, paused after planning: a key changed then is a conflict.
    let pause = tmp.path().join("pause");
    let child = paused_at(
        agent(
            &node,
            "import",
            &target,
            &[
                "--snapshot",
                &archive,
                "--prefix",
                ns,
                "--mode",
                "add",
                "--dry-run=false",
            ],
        ),
        "import-planned",
        &pause,
    );
    node.put(&format!("{ns}0005"), "changed by someone");
    std::fs::write(pause.join("import-planned.go"), b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let done: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let done = done["results"].clone();
    assert_eq!(counts(&done), [2000, 0, 0, 0, 1], "{done:?}");
    assert!(done["import"]["conflicts-keys"]
        .as_str()
        .unwrap()
        .contains(&format!("{ns}0005")));
    assert_eq!(count(&done, "leases-dropped"), 1);
    assert!(
        Path::new(done["backup"]["path"].as_str().unwrap()).is_file(),
        "a snapshot first"
    );
    let now = range(&node, 0);
    assert_eq!(
        now[&format!("{ns}0005")].0,
        "changed by someone",
        "never clobbered"
    );
    assert_eq!(
        now[&format!("{ns}leased")].4,
        0,
        "the key comes back without its lease"
    );

    // sync: the changed key back to the backup's value, the later key deleted.
    let dry = import(
        &node,
        &target,
        &[
            "--snapshot",
            &archive,
            "--prefix",
            ns,
            "--mode",
            "sync",
            "--skip-backup",
        ],
    )
    .success();
    assert_eq!(counts(&dry), [0, 1, 1, 2000, 0]);
    let real = import(
        &node,
        &target,
        &[
            "--snapshot",
            &archive,
            "--prefix",
            ns,
            "--mode",
            "sync",
            "--skip-backup",
            "--dry-run=false",
        ],
    )
    .success();
    assert_eq!(
        counts(&real),
        counts(&dry),
        "the dry run's counts are the real run's"
    );
    assert!(real["backup"]["path"].is_null(), "skip-backup");

    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    assert!(written > 0);
    let after = range(&node, 0);
    assert_eq!(
        values(&under(&after, ns)),
        values(&backup),
        "the prefix is the backup's"
    );
    for n in 0..written {
        assert_eq!(after[&format!("/writer/{n:05}")].0, format!("w{n}"));
    }
    let outside_after: BTreeMap<String, String> = values(&after)
        .into_iter()
        .filter(|(k, _)| !k.starts_with(ns) && !k.starts_with("/writer/"))
        .collect();
    assert_eq!(
        outside_after, outside_before,
        "nothing outside the prefix moved"
    );

    // max-keys: the same import into an emptied prefix needs it raised.
    node.ctl_ok(&["del", ns, "--prefix"]);
    let refused = import(
        &node,
        &target,
        &[
            "--snapshot",
            &archive,
            "--prefix",
            ns,
            "--dry-run=false",
            "--max-keys",
            "100",
        ],
    )
    .failure();
    assert!(refused.contains("max-keys"), "{refused}");
    assert!(under(&range(&node, 0), ns).is_empty(), "nothing written");
}

/// Writes an export by hand: `head` then `lines`, gzipped.
fn handmade(path: &Path, head: &serde_json::Value, lines: &[serde_json::Value]) {
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    writeln!(gz, "{head}").unwrap();
    for l in lines {
        writeln!(gz, "{l}").unwrap();
    }
    gz.finish().unwrap();
}

fn line(key: &str, value: &[u8]) -> serde_json::Value {
    let e = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    serde_json::json!({"key": e(key.as_bytes()), "create_revision": 2, "mod_revision": 2,
        "version": 1, "value": e(value), "lease": 0})
}

#[test]
fn exports_equal_across_sources_and_hostile_files_are_refused_before_any_write() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "e0", &v3530());
    let target = tmp.path().join("backups");
    node.fill("/app/", 300);
    node.fill("/other/", 20);
    node.put("/app/0001", "overwritten");
    node.ctl_ok(&["del", "/app/0002"]);
    let lease_out = node.ctl_ok(&["lease", "grant", "600"]);
    let lease = lease_out.split_whitespace().nth(1).unwrap().to_string();
    node.ctl_ok(&["put", "/app/leased", "lv", "--lease", &lease]);
    let snap = Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let archive = snap["snapshot"]["path"].as_str().unwrap().to_string();
    let at = node.revision();
    let expected = under(&range(&node, at), "/app/");
    node.put("/app/0003", "after the snapshot");

    // Live at the snapshot's revision, then the archive offline (etcd stopped).
    let (live, r) = export(
        &node,
        &target,
        &["--prefix", "/app/", "--revision", &at.to_string()],
    );
    assert_eq!(r["export"]["keys"].as_str(), Some("300"));
    assert_eq!(r["export"]["revision"].as_str(), Some(&*at.to_string()));
    let sidecar = std::fs::read_to_string(format!("{}.sha256", live.display())).unwrap();
    assert!(sidecar.starts_with(r["export"]["sha256"].as_str().unwrap()));
    let (live_head, live_keys) = read_export(&live);
    assert_eq!(live_keys, expected, "etcd's own range at that revision");
    assert_eq!(live_head["prefix"].as_str(), Some("/app/"));
    node.stop();
    let (offline, _) = export(
        &node,
        &target,
        &["--prefix", "/app/", "--snapshot", &archive],
    );
    let (offline_head, offline_keys) = read_export(&offline);
    assert_eq!(
        offline_keys, live_keys,
        "the archive read offline equals the live export"
    );
    assert_eq!(offline_head["revision"], live_head["revision"]);
    assert_eq!(offline_head["cluster_id"], live_head["cluster_id"]);
    node.start();
    node.wait_healthy();

    // Hostile files, each refused before any write.
    let before = range(&node, 0);
    let rev = node.revision();
    let head = |count: u64, prefix: &str| {
        serde_json::json!({"format": "etcd-actions-export/1", "cluster_id": "1", "revision": 5,
            "prefix": prefix, "count": count, "source": "live", "created": "2026-12-04T00:00:00Z"})
    };
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let good_lines: Vec<serde_json::Value> = (0..50)
        .map(|i| line(&format!("/app/{i:04}"), b"restored"))
        .collect();
    type Make<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Make, &str)> = vec![
        (
            "cut",
            Box::new(|p: &Path| {
                handmade(p, &head(50, "/app/"), &good_lines);
                let b = std::fs::read(p).unwrap();
                std::fs::write(p, &b[..b.len() * 2 / 3]).unwrap();
            }),
            "cut",
        ),
        (
            "lying-count",
            Box::new(|p: &Path| handmade(p, &head(60, "/app/"), &good_lines)),
            "holds 50",
        ),
        (
            "too-big",
            Box::new(|p: &Path| {
                let mut lines = good_lines.clone();
                lines.push(line("/app/zz-big", &vec![b'x'; 2 << 20]));
                handmade(p, &head(51, "/app/"), &lines);
            }),
            "request limit",
        ),
        (
            "outside",
            Box::new(|p: &Path| {
                let mut lines = good_lines.clone();
                lines.push(line("/zzz/escape", b"x"));
                handmade(p, &head(51, "/app/"), &lines);
            }),
            "outside its prefix",
        ),
        (
            "not-export",
            Box::new(|p: &Path| std::fs::write(p, b"hello, not an export\n").unwrap()),
            "not an export",
        ),
        (
            "tampered",
            Box::new(|p: &Path| {
                handmade(p, &head(50, "/app/"), &good_lines);
                std::fs::write(
                    format!("{}.sha256", p.display()),
                    format!("{}  x\n", "0".repeat(64)),
                )
                .unwrap();
            }),
            "sidecar",
        ),
    ];
    for (name, make, says) in &cases {
        let p = bad.join(format!("{name}.jsonl.gz"));
        make(&p);
        let msg = import(
            &node,
            &target,
            &[
                "--file",
                p.to_str().unwrap(),
                "--mode",
                "overwrite",
                "--dry-run=false",
                "--skip-backup",
            ],
        )
        .failure();
        assert!(msg.contains(says), "{name}: {msg}");
    }
    // A prefix outside the export's.
    let msg = import(
        &node,
        &target,
        &[
            "--file",
            live.to_str().unwrap(),
            "--prefix",
            "/other/",
            "--dry-run=false",
        ],
    )
    .failure();
    assert!(msg.contains("outside the export's prefix"), "{msg}");
    assert_eq!(node.revision(), rev, "no write at all");
    assert_eq!(range(&node, 0), before);

    // The export itself imports back (overwrite: the key changed after it goes back).
    let r = import(
        &node,
        &target,
        &[
            "--file",
            live.to_str().unwrap(),
            "--mode",
            "overwrite",
            "--dry-run=false",
            "--skip-backup",
        ],
    )
    .success();
    assert_eq!(counts(&r), [0, 1, 0, 299, 0]);
    assert_eq!(range(&node, 0)["/app/0003"].0, "value-/app/-3");
}

#[test]
fn the_offline_reader_reads_etcd_3_4_archives() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "o34", &v34());
    let target = tmp.path().join("backups");
    node.fill("/k/", 200);
    node.put("/k/0007", "again");
    node.ctl_ok(&["del", "/k/0009"]);
    node.ctl_ok(&["compaction", &node.revision().to_string()]);
    node.put("/k/late", "x");
    let snap = Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let archive = snap["snapshot"]["path"].as_str().unwrap().to_string();
    let expected = under(&range(&node, 0), "/k/");
    node.stop();
    let (path, r) = export(&node, &target, &["--prefix", "/k/", "--snapshot", &archive]);
    assert_eq!(r["export"]["keys"].as_str(), Some("200"));
    assert_eq!(read_export(&path).1, expected);
}

#[test]
fn export_at_a_point_of_the_history_equals_etcds_range_there() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h0", &v3530());
    let target = tmp.path().join("backups");
    node.fill("/p/", 100);
    let f = follow(&node, &target);
    wait_recorded(&target, &node, node.revision());
    node.put("/p/0001", "one");
    node.ctl_ok(&["del", "/p/0002"]);
    node.fill("/p/new-", 20);
    node.put("/q/outside", "x");
    let mid = node.revision();
    let at_mid = under(&range(&node, mid), "/p/");
    node.ctl_ok(&["del", "/p/", "--prefix"]);
    let end = node.revision();
    wait_recorded(&target, &node, end);
    let _ = sigterm(f);
    let (path, r) = export(
        &node,
        &target,
        &["--prefix", "/p/", "--to-revision", &mid.to_string()],
    );
    assert_eq!(r["export"]["revision"].as_str(), Some(&*mid.to_string()));
    assert_eq!(
        read_export(&path).1,
        at_mid,
        "etcd's Range at revision {mid}"
    );

    // And imported back from the history itself.
    let r = import(
        &node,
        &target,
        &[
            "--to-revision",
            &mid.to_string(),
            "--prefix",
            "/p/",
            "--dry-run=false",
            "--skip-backup",
        ],
    )
    .success();
    assert_eq!(count(&r, "added"), at_mid.len() as u64);
    assert_eq!(values(&under(&range(&node, 0), "/p/")), values(&at_mid));
}

#[test]
fn an_encrypted_archive_in_the_store_exports_by_id() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "x0", &v3530());
    let s3 = S3::start(tmp.path(), &["etcd-bk"]);
    let (key, recipient) = crate::encryption::keygen(tmp.path(), "k.txt");
    node.fill("/enc/", 150);
    let at = node.revision();
    let target = tmp.path().join("backups");
    let r = s3
        .env(
            Agent::snapshot(&node, target.to_str().unwrap()),
            "etcd-bk",
            "etcd",
        )
        .env("ETCD_ACTIONS_ENCRYPT_TO", &recipient)
        .run()
        .success();
    let id = r["snapshot"]["path"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    std::fs::remove_dir_all(&target).unwrap();
    let live = under(&range(&node, at), "/enc/");

    // An encrypted export opens with the stock age, and imports with the identity.
    let r = agent(&node, "export", &target, &["--prefix", "/enc/"])
        .env("ETCD_ACTIONS_ENCRYPT_TO", &recipient)
        .run()
        .success();
    let sealed = PathBuf::from(r["export"]["path"].as_str().unwrap());
    assert!(
        sealed.to_str().unwrap().ends_with(".jsonl.gz.age"),
        "{sealed:?}"
    );
    assert_eq!(r["export"]["encryption"].as_str(), Some("age"));
    let opened = tmp.path().join("opened.jsonl.gz");
    std::fs::write(
        &opened,
        crate::encryption::age_decrypt(&key, &sealed).unwrap(),
    )
    .unwrap();
    assert_eq!(read_export(&opened).1, live, "the stock age opens it");
    node.ctl_ok(&["del", "/enc/", "--prefix"]);
    let msg = import(
        &node,
        &target,
        &["--file", sealed.to_str().unwrap(), "--dry-run=false"],
    )
    .failure();
    assert!(msg.contains("identity"), "no identity, no import: {msg}");
    let r = agent(
        &node,
        "import",
        &target,
        &[
            "--file",
            sealed.to_str().unwrap(),
            "--dry-run=false",
            "--skip-backup",
        ],
    )
    .env("ETCD_ACTIONS_IDENTITY_FILE", &key)
    .run()
    .success();
    assert_eq!(count(&r, "added"), 150);
    assert_eq!(values(&under(&range(&node, 0), "/enc/")), values(&live));
    node.stop();
    let out = tmp.path().join("out");
    let by_id = agent(
        &node,
        "export",
        &out,
        &["--prefix", "/enc/", "--backup-id", &id],
    );
    let r = s3
        .env(by_id, "etcd-bk", "etcd")
        .env("ETCD_ACTIONS_IDENTITY_FILE", &key)
        .run()
        .success();
    let path = PathBuf::from(r["export"]["path"].as_str().unwrap());
    assert_eq!(
        read_export(&path).1,
        live,
        "from the store alone, decrypted"
    );
    assert!(r["export"]["source"].as_str().unwrap().contains(&id));
}

#[test]
fn under_juju_export_then_import_is_a_dry_run_until_asked_and_works_on_three_units() {
    let tmp = tempdir();
    let nodes = cluster(tmp.path(), "j", &v3530());
    let backups = tmp.path().join("backups");
    let juju = Juju::new(tmp.path(), "etcd/1");
    juju.peers(&["etcd/0", "etcd/2"]);
    nodes[0].fill("/cfg/app/", 40);
    let before = range(&nodes[0], 0);
    juju.params(
        "export",
        serde_json::json!({"target": backups.to_str().unwrap(), "prefix": "/cfg/app/"}),
    );
    let r = Agent::juju(&nodes[1], &juju, "export").run().juju_ok(&juju);
    let file = r["export"]["path"].as_str().unwrap().to_string();
    assert_eq!(r["export"]["keys"].as_str(), Some("40"));
    assert!(r["copy"]["cmd"].as_str().unwrap().contains("juju scp"));
    nodes[0].ctl_ok(&["del", "/cfg/app/", "--prefix"]);

    // The action's defaults: a dry run.
    juju.reset();
    juju.params(
        "import",
        serde_json::json!({"target": backups.to_str().unwrap(), "file": file}),
    );
    let r = Agent::juju(&nodes[1], &juju, "import").run().juju_ok(&juju);
    assert_eq!(r["import"]["added"].as_str(), Some("40"));
    assert_eq!(r["import"]["dry-run"].as_str(), Some("true"));
    assert!(under(&range(&nodes[0], 0), "/cfg/app/").is_empty());

    juju.reset();
    juju.params(
        "import",
        serde_json::json!({"target": backups.to_str().unwrap(), "file": file, "dry-run": false}),
    );
    let r = Agent::juju(&nodes[1], &juju, "import").run().juju_ok(&juju);
    assert_eq!(r["import"]["added"].as_str(), Some("40"));
    assert!(r["backup"]["path"].as_str().is_some(), "a snapshot first");
    assert_eq!(
        values(&under(&range(&nodes[2], 0), "/cfg/app/")),
        values(&under(&before, "/cfg/app/")),
        "every member serves them"
    );

    // A misspelled mode is refused, naming the three.
    juju.reset();
    juju.params("import", serde_json::json!({"file": file, "mode": "merge"}));
    let msg = Agent::juju(&nodes[1], &juju, "import")
        .run()
        .juju_failed(&juju);
    assert!(msg.contains("add, overwrite, sync"), "{msg}");

    // A cluster that lost its quorum is refused before anything is written.
    nodes[0].stop();
    nodes[2].stop();
    std::thread::sleep(std::time::Duration::from_secs(3));
    juju.reset();
    juju.params(
        "import",
        serde_json::json!({"target": backups.to_str().unwrap(), "file": file,
            "mode": "sync", "dry-run": false}),
    );
    let msg = Agent::juju(&nodes[1], &juju, "import")
        .run()
        .juju_failed(&juju);
    assert!(
        msg.contains("no leader") || msg.contains("not healthy"),
        "{msg}"
    );
}

#[test]
fn an_import_killed_halfway_leaves_written_keys_whole_and_a_rerun_finishes_it() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "k0", &v3530());
    let target = tmp.path().join("backups");
    node.fill("/ns/", 3000);
    let snap = Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let archive = snap["snapshot"]["path"].as_str().unwrap().to_string();
    let backup = under(&range(&node, 0), "/ns/");
    node.ctl_ok(&["del", "/ns/", "--prefix"]);

    let args = [
        "--snapshot",
        &archive,
        "--prefix",
        "/ns/",
        "--dry-run=false",
        "--skip-backup",
    ];
    let mut child = paused_at(
        agent(&node, "import", &target, &args),
        "import-window-sent",
        &tmp.path().join("pause"),
    );
    child.kill().unwrap();
    let _ = child.wait();
    let halfway = under(&range(&node, 0), "/ns/");
    assert!(
        !halfway.is_empty() && halfway.len() < 3000,
        "{} written",
        halfway.len()
    );
    for (k, v) in &halfway {
        assert_eq!(v.0, backup[k].0, "a written key holds the backup's value");
    }

    let r = import(&node, &target, &args).success();
    assert_eq!(count(&r, "added"), (3000 - halfway.len()) as u64);
    assert_eq!(count(&r, "unchanged"), halfway.len() as u64);
    assert_eq!(values(&under(&range(&node, 0), "/ns/")), values(&backup));
}
