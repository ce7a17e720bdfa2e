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
    // Each damaged copy comes with the original's sidecar, as a copy of both would.
    let sha = sha256_file(&good);
    let write = |name: &str, data: &[u8]| -> PathBuf {
        let p = bad_dir.join(name);
        fs::write(&p, data).unwrap();
        fs::write(
            bad_dir.join(format!("{name}.sha256")),
            format!("{sha}  {name}\n"),
        )
        .unwrap();
        p
    };
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let cases: Vec<(PathBuf, &str)> = vec![
        (write("flipped.tar.gz", &flipped), "sha256"),
        (
            write("truncated.tar.gz", &bytes[..bytes.len() - 100]),
            "sha256",
        ),
        (write("noise.tar.gz", &[7u8; 4096]), "sha256"),
        (write("empty.tar.gz", b""), "empty"),
    ];
    for (path, want) in &cases {
        let run = verify(&node, &["--snapshot", path.to_str().unwrap()]);
        let msg = run.failure();
        assert_eq!(run.code(), 3, "{msg}");
        assert!(msg.contains(want), "{}: {msg}", path.display());
    }
    // Without a sidecar, damage to the content is found by the archive's own checks.
    fs::remove_file(bad_dir.join("truncated.tar.gz.sha256")).unwrap();
    fs::remove_file(bad_dir.join("noise.tar.gz.sha256")).unwrap();
    let truncated = bad_dir.join("truncated.tar.gz");
    let msg = verify(&node, &["--snapshot", truncated.to_str().unwrap()]).failure();
    assert!(msg.contains("refused"), "{msg}");
    let noise = bad_dir.join("noise.tar.gz");
    let msg = verify(&node, &["--snapshot", noise.to_str().unwrap()]).failure();
    assert!(msg.contains("not a gzip file"), "{msg}");
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

/// Takes a real snapshot into `dir` with the clock set to `at` (unix seconds); with `kind`
/// `etcd-backup`, renames it (and its sidecar) as a pre-restore backup of that time would be
/// named. Returns its name.
pub fn snapshot_at(node: &Node, dir: &Path, at: i64, kind: &str) -> String {
    let r = Agent::snapshot(node, dir.to_str().unwrap())
        .env("ETCD_ACTIONS_TEST_NOW", at.to_string())
        .run()
        .success();
    let path = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    if kind == "etcd-snapshot" {
        return name;
    }
    let renamed = name.replacen("etcd-snapshot", kind, 1);
    fs::rename(&path, dir.join(&renamed)).unwrap();
    fs::remove_file(dir.join(format!("{name}.sha256"))).unwrap();
    // (An archive of an earlier version: no record beside it; its manifest is read.)
    fs::remove_file(dir.join(format!("{name}.manifest.yaml"))).unwrap();
    fs::write(
        dir.join(format!("{renamed}.sha256")),
        format!("{}  {renamed}\n", sha256_file(&dir.join(&renamed))),
    )
    .unwrap();
    renamed
}

/// 10:00 UTC on the 20 days up to 2026-03-31, newest first (unix seconds).
fn daily_times() -> Vec<i64> {
    (0..20).map(|i| 1_774_951_200 - i * 86_400).collect()
}

fn kept(results: &serde_yaml::Value) -> std::collections::BTreeMap<String, String> {
    results["archives"]
        .as_mapping()
        .map(|m| {
            m.values()
                .map(|e| {
                    (
                        e["id"].as_str().unwrap().to_string(),
                        e["kept-by"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn prune_keeps_what_restic_keeps_and_leaves_foreign_files() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    let dir = tmp.path().join("archives");
    // Real archives whose manifests say they were taken on those days (times come from the
    // manifest, not the name).
    let snaps: Vec<String> = daily_times()
        .into_iter()
        .map(|t| snapshot_at(&node, &dir, t, "etcd-snapshot"))
        .collect();
    let backups: Vec<String> = [1_774_861_200, 1_767_344_400]
        .into_iter()
        .map(|t| snapshot_at(&node, &dir, t, "etcd-backup"))
        .collect();
    fs::write(dir.join("notes.txt"), "mine").unwrap();
    fs::write(
        dir.join("etcd-snapshot-2026-03-31-23.00.00.tar.gz"),
        "not an archive",
    )
    .unwrap();
    fs::write(
        dir.join("etcd-snapshot-2019-01-01-00.00.00.tar.gz.sha256"),
        "orphan",
    )
    .unwrap();
    let t = dir.to_str().unwrap();

    let bad = Agent::standalone(&node, &["prune", "--target", t]).run();
    assert!(bad.failure().contains("no keep rule"));
    let bad = Agent::standalone(&node, &["prune", "--target", t, "--keep-daily", "-1"]).run();
    assert!(bad.failure().contains("0 or more"));
    let bad = Agent::standalone(&node, &["prune", "--target", t, "--keep-within", "3q"]).run();
    assert!(bad.failure().contains("unknown unit"));
    assert_eq!(
        files_in(&dir).len(),
        3 * 20 + 2 * 2 + 3,
        "nothing deleted by refusals"
    );

    let args = [
        "prune",
        "--target",
        t,
        "--keep-daily",
        "3",
        "--keep-weekly",
        "2",
    ];
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let r = Agent::standalone(&node, &dry).run().success();
    let k = kept(&r);
    assert_eq!(k[&snaps[0]], "daily, weekly");
    assert_eq!(k[&snaps[1]], "daily");
    assert_eq!(k[&snaps[2]], "daily, weekly");
    assert!(k[&snaps[3]].starts_with("removed"));
    // Backups count separately: the newest is kept by both rules, the old one by weekly.
    assert_eq!(k[&backups[0]], "daily, weekly");
    assert_eq!(k[&backups[1]], "daily, weekly");
    assert_eq!(
        files_in(&dir).len(),
        3 * 20 + 2 * 2 + 3,
        "a dry run deletes nothing"
    );

    // Killed between an archive and its sidecar: the archive is gone whole, the sidecar is an
    // orphan that the next run tidies.
    let crashed = Agent::standalone(&node, &args)
        .env("FAILPOINTS", "prune-between-archive-and-sidecar=return")
        .run();
    assert_ne!(crashed.code(), 0);
    let orphans: Vec<String> = files_in(&dir)
        .into_iter()
        .filter(|n| n.ends_with(".sha256") && !dir.join(n.trim_end_matches(".sha256")).exists())
        .collect();
    assert_eq!(orphans.len(), 2, "{orphans:?}");
    let r = Agent::standalone(&node, &args).run().success();
    assert_eq!(r["prune"]["removed"].as_str(), Some("16"));
    let mut want: Vec<String> = vec![snaps[0].clone(), snaps[1].clone(), snaps[2].clone()]
        .into_iter()
        .flat_map(|n| {
            [
                n.clone(),
                format!("{n}.sha256"),
                format!("{n}.manifest.yaml"),
            ]
        })
        .chain(
            [backups[0].clone(), backups[1].clone()]
                .into_iter()
                .flat_map(|n| [n.clone(), format!("{n}.sha256")]),
        )
        .collect();
    want.push("etcd-snapshot-2026-03-31-23.00.00.tar.gz".into());
    want.push("notes.txt".into());
    want.sort();
    assert_eq!(
        files_in(&dir),
        want,
        "kept archives, their sidecars, foreign files; orphan tidied"
    );
    let ignored: Vec<&str> = r["ignored"]
        .as_mapping()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        ignored.iter().any(|i| i.ends_with("notes.txt")),
        "{ignored:?}"
    );
    assert!(
        ignored.iter().any(|i| i.ends_with("23.00.00.tar.gz")),
        "{ignored:?}"
    );
}

#[test]
fn if_changed_skips_unchanged_data_and_reads_the_store() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &["etcd-backups"]);
    let node = Node::single(tmp.path(), "unit", &v35());
    // A new member's last raft entry of its own (the cluster version) is in before the first
    // snapshot, or "unchanged" would rightly be "changed".
    wait_cluster_version(&node);
    node.fill("k/", 10);
    let snaps = tmp.path().join("snaps");
    let t = snaps.to_str().unwrap();
    let first = Agent::snapshot(&node, t).run().success();
    let again = Agent::standalone(&node, &["snapshot", "--target", t, "--if-changed"])
        .run()
        .success();
    let id = Path::new(first["snapshot"]["path"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        again["snapshot"]["skipped"].as_str(),
        Some(format!("unchanged since {id}").as_str())
    );
    assert_eq!(again["snapshot"]["path"], first["snapshot"]["path"]);
    assert_eq!(files_in(&snaps).len(), 3, "no new archive");

    node.put("new", "write");
    let changed = Agent::standalone(&node, &["snapshot", "--target", t, "--if-changed"])
        .run()
        .success();
    assert!(changed["snapshot"]["skipped"].is_null());
    assert_eq!(files_in(&snaps).len(), 6);

    // Uploaded, then the local copy deleted: the store's metadata still says unchanged.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    node.put("newer", "write");
    let up = s3
        .env(Agent::snapshot(&node, t), "etcd-backups", "")
        .run()
        .success();
    let local = PathBuf::from(up["snapshot"]["path"].as_str().unwrap());
    fs::remove_file(&local).unwrap();
    fs::remove_file(format!("{}.sha256", local.display())).unwrap();
    let skipped = s3
        .env(
            Agent::standalone(&node, &["snapshot", "--target", t, "--if-changed"]),
            "etcd-backups",
            "",
        )
        .run()
        .success();
    assert!(skipped["snapshot"]["skipped"]
        .as_str()
        .unwrap()
        .starts_with("unchanged since"));
    assert_eq!(skipped["upload"]["url"], up["upload"]["url"]);
}

#[test]
fn backup_snapshots_when_changed_uploads_and_prunes() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &["etcd-backups"]);
    let node = Node::single(tmp.path(), "unit", &v35());
    wait_cluster_version(&node);
    let snaps = tmp.path().join("snaps");
    let backup = || {
        s3.env(
            Agent::standalone(&node, &["backup", "--target", snaps.to_str().unwrap()]),
            "etcd-backups",
            "",
        )
        .env("ETCD_ACTIONS_RETENTION", "last=2")
        .run()
    };
    for i in 0..3 {
        node.put("k", &format!("v{i}"));
        let r = backup().success();
        assert!(r["upload"]["url"].as_str().is_some());
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let archives: Vec<String> = files_in(&snaps)
        .into_iter()
        .filter(|n| n.ends_with(".tar.gz"))
        .collect();
    assert_eq!(archives.len(), 2, "last=2 kept two: {archives:?}");
    assert_eq!(s3.archives("etcd-backups", "").len(), 2);
    // Nothing changed: exit 0, nothing new.
    let r = backup();
    assert_eq!(r.code(), 0);
    assert!(r.success()["snapshot"]["skipped"].as_str().is_some());
    // A bad policy is refused before anything happens.
    let bad = s3
        .env(
            Agent::standalone(&node, &["backup", "--target", snaps.to_str().unwrap()]),
            "etcd-backups",
            "",
        )
        .env("ETCD_ACTIONS_RETENTION", "last=two")
        .run();
    assert_eq!(bad.code(), 2);
    assert_eq!(files_in(&snaps).len(), 6);
}

/// `systemd-analyze verify` on the backup service and timer.
fn verify_units(dir: &Path) {
    systemd_verify(&[
        &dir.join("etcd-actions-backup.service"),
        &dir.join("etcd-actions-backup.timer"),
    ]);
}

#[test]
fn schedule_units_verify_and_the_charm_hook_follows_its_config() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    let units = tmp.path().join("units");
    let env_file = tmp.path().join("backup.env");
    let r = Agent::standalone(
        &node,
        &[
            "schedule",
            "--on-calendar",
            "*-*-* 02:30:00",
            "--target",
            "/var/backups/etcd",
            "--install",
        ],
    )
    .env("ETCD_ACTIONS_SYSTEMD_DIR", &units)
    .env("ETCD_ACTIONS_ENV_FILE", &env_file)
    .env("ETCD_ACTIONS_RETENTION", "daily=7")
    .env("AWS_ACCESS_KEY_ID", "AKSCHED")
    .env("AWS_SECRET_ACCESS_KEY", "sched-secret")
    .run()
    .success();
    verify_units(&units);
    let service = fs::read_to_string(units.join("etcd-actions-backup.service")).unwrap();
    assert!(
        service.contains("\"backup\" \"--target\" \"/var/backups/etcd\""),
        "{service}"
    );
    assert!(service.contains(&format!(
        "ETCD_ACTIONS_ETCD_CONFIG={}",
        node.config_path().display()
    )));
    assert!(
        !service.contains("sched-secret"),
        "no secret in a world-readable unit"
    );
    assert!(!r["schedule"]["service"]
        .as_str()
        .unwrap()
        .contains("sched-secret"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&env_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let env = fs::read_to_string(&env_file).unwrap();
    assert!(env.contains("ETCD_ACTIONS_RETENTION=\"daily=7\"") && env.contains("sched-secret"));
    let bad = Agent::standalone(&node, &["schedule", "--on-calendar", "every full moon"]).run();
    assert_eq!(bad.code(), 2);

    // The charm: config-changed installs, updates and removes the timer.
    let juju = Juju::new(tmp.path(), "etcd/0");
    let units = tmp.path().join("charm-units");
    let run_hook = juju.config_hook(tmp.path(), &units);
    let (code, err) =
        run_hook(serde_json::json!({"backup-schedule": "daily", "backup-retention": "last=3"}));
    assert_eq!(code, Some(0), "{err}");
    verify_units(&units);
    let service = fs::read_to_string(units.join("etcd-actions-backup.service")).unwrap();
    assert!(service.contains("juju-exec\" \"etcd/0\""), "{service}");
    let (code, _) =
        run_hook(serde_json::json!({"backup-schedule": "hourly", "backup-retention": "last=3"}));
    assert_eq!(code, Some(0));
    assert!(fs::read_to_string(units.join("etcd-actions-backup.timer"))
        .unwrap()
        .contains("OnCalendar=hourly"));
    let (code, err) =
        run_hook(serde_json::json!({"backup-schedule": "hourly", "backup-retention": "last=x"}));
    assert_eq!(code, Some(0), "a bad policy blocks the unit: {err}");
    assert!(
        juju.statuses().contains("blocked backup-retention"),
        "{}",
        juju.statuses()
    );
    let (code, _) = run_hook(serde_json::json!({"backup-schedule": "", "backup-retention": ""}));
    assert_eq!(code, Some(0));
    assert!(files_in(&units).is_empty(), "the timer is removed");
}
