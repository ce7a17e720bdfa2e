//! Backup health: the Prometheus textfile (checked by the stock promtool), the alert rules
//! (`promtool check rules` and `promtool test rules`), the charm's workload status, and the
//! `status` command / `backup-status` action. Real etcd, real S3 server.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

const BUCKET: &str = "etcd-backups";

fn promtool() -> PathBuf {
    let p = PathBuf::from("/usr/bin/promtool");
    assert!(
        p.exists(),
        "promtool is not installed: run scripts/install-deps"
    );
    p
}

/// `promtool check metrics` on a textfile: its complaints, or nothing.
fn check_metrics(file: &Path) -> Result<(), String> {
    let mut cmd = Command::new(promtool());
    cmd.args(["check", "metrics"]);
    let out = run_with_stdin(&mut cmd, &fs::read(file).unwrap());
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The value of one series of a textfile (`name{labels}` as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn alert_rules_pass_promtool_with_firing_and_quiet_cases() {
    let rules = repo().join("src/prometheus_alert_rules/etcd_backup.rules");
    let check = Command::new(promtool())
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let test = Command::new(promtool())
        .args(["test", "rules", "etcd_backup_test.yml"])
        .current_dir(repo().join("tests/prometheus"))
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

#[test]
fn the_textfile_and_status_follow_every_run() {
    let tmp = tempdir();
    let mut s3 = S3::start(tmp.path(), &[BUCKET]);
    let node = Node::single(tmp.path(), "health", &v35());
    node.fill("k/", 12);
    let metrics = tmp.path().join("textfiles");
    let prom = metrics.join("etcd_backup.prom");
    let target = tmp.path().join("snaps");
    let t = target.to_str().unwrap();
    let (endpoint, access, secret) = (s3.endpoint(), s3.access.clone(), s3.secret.clone());
    let agent = |args: &[&str]| {
        Agent::standalone(&node, args)
            .env("ETCD_ACTIONS_S3_ENDPOINT", &endpoint)
            .env("ETCD_ACTIONS_S3_BUCKET", BUCKET)
            .env("AWS_ACCESS_KEY_ID", &access)
            .env("AWS_SECRET_ACCESS_KEY", &secret)
            .env("ETCD_ACTIONS_METRICS_DIR", &metrics)
    };

    // Before any backup.
    let st = agent(&["status", "--target", t]).run().success();
    assert_eq!(st["status"]["state"].as_str(), Some("active"), "{st:?}");
    assert_eq!(st["status"]["message"].as_str(), Some("no backup yet"));
    assert!(st["newest"].as_str().unwrap().starts_with("none"), "{st:?}");
    assert_eq!(st["last-error"].as_str(), Some("none"));
    assert!(!prom.exists(), "status writes no textfile");

    // A snapshot, uploaded.
    let r = agent(&["snapshot", "--target", t]).run().success();
    check_metrics(&prom).unwrap();
    let text = fs::read_to_string(&prom).unwrap();
    let ok_snap =
        "etcd_backup_last_success_timestamp_seconds{operation=\"snapshot\",location=\"local\"}";
    let ok_up =
        "etcd_backup_last_success_timestamp_seconds{operation=\"upload\",location=\"store\"}";
    let bad_up =
        "etcd_backup_last_failure_timestamp_seconds{operation=\"upload\",location=\"store\"}";
    assert!(sample(&text, ok_snap).unwrap() > 1.7e9, "{text}");
    assert!(sample(&text, ok_up).unwrap() > 1.7e9, "{text}");
    assert_eq!(sample(&text, bad_up), Some(0.0), "{text}");
    let bytes: f64 = r["snapshot"]["bytes"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        sample(&text, "etcd_backup_newest_size_bytes{location=\"local\"}"),
        Some(bytes)
    );
    let revision: f64 = r["snapshot"]["revision"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        sample(&text, "etcd_backup_newest_revision{location=\"store\"}"),
        Some(revision)
    );
    assert!(!text.contains(t), "no paths in labels or values");

    // A failed upload: the archive is local, the failure is newer than the success.
    node.put("k/new", "1");
    s3.kill();
    let failed = agent(&["snapshot", "--target", t]).run();
    assert_ne!(failed.code(), 0);
    check_metrics(&prom).unwrap();
    let text = fs::read_to_string(&prom).unwrap();
    assert!(
        sample(&text, bad_up).unwrap() >= sample(&text, ok_up).unwrap(),
        "{text}"
    );
    let st = agent(&["status", "--target", t]).run().success();
    let msg = st["status"]["message"].as_str().unwrap();
    assert!(
        msg.contains("local") && msg.contains("upload failed"),
        "{msg}"
    );
    assert!(
        st["last-error"]["message"]
            .as_str()
            .unwrap()
            .contains("upload"),
        "{st:?}"
    );
    s3.restart();

    // A drill and a prune.
    agent(&["verify", "--target", t, "--deep"]).run().success();
    agent(&["prune", "--target", t, "--keep-last", "5"])
        .run()
        .success();
    check_metrics(&prom).unwrap();
    let text = fs::read_to_string(&prom).unwrap();
    assert_eq!(
        sample(&text, "etcd_backup_drill_passed"),
        Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "etcd_backup_drill_duration_seconds").unwrap() > 0.0);
    assert_eq!(
        sample(&text, "etcd_backup_archives_kept"),
        Some(2.0),
        "{text}"
    );

    // After several runs: the newest archive, verified, the drill, the last error.
    let st = agent(&["status", "--target", t]).run().success();
    let newest_local = &st["newest"]["local"];
    let listed = agent(&["list-backups", "--target", t]).run().success();
    assert_eq!(newest_local["id"], listed["backups"]["0"]["id"], "{st:?}");
    assert_eq!(newest_local["verified"].as_str(), Some("true"), "{st:?}");
    assert_eq!(st["drill"]["result"].as_str(), Some("passed"));
    assert_eq!(st["target"]["archives"].as_str(), Some("2"));
    assert_eq!(st["schedule"]["on-calendar"].as_str(), Some("none"));
    assert!(st["follow"].as_str().is_some());
    // With a max age the clock has passed: blocked.
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3 * 3600;
    let st = agent(&["status", "--target", t])
        .env("ETCD_ACTIONS_BACKUP_MAX_AGE", "2h")
        .env("ETCD_ACTIONS_TEST_NOW", later.to_string())
        .run()
        .success();
    assert_eq!(st["status"]["state"].as_str(), Some("blocked"), "{st:?}");
    assert!(st["status"]["message"]
        .as_str()
        .unwrap()
        .contains("older than backup-max-age"));
}

/// Runs the charm's `update-status` hook (a link to the binary) for `node`.
fn update_status(tmp: &Path, juju: &Juju, node: &Node, now: Option<u64>) -> String {
    let hook = tmp.join("charm/hooks/update-status");
    fs::create_dir_all(hook.parent().unwrap()).unwrap();
    if !hook.exists() {
        std::os::unix::fs::symlink(AGENT, &hook).unwrap();
    }
    juju.reset();
    let mut cmd = Command::new(&hook);
    cmd.env(
        "PATH",
        format!("{}:{}", juju.bin.display(), std::env::var("PATH").unwrap()),
    )
    .env("JUJU_UNIT_NAME", &juju.unit)
    .env("FAKE_JUJU_STATE", &juju.state)
    .env("ETCD_ACTIONS_ETCD_CONFIG", node.config_path())
    .env_remove("JUJU_ACTION_NAME");
    if let Some(n) = now {
        cmd.env("ETCD_ACTIONS_TEST_NOW", n.to_string());
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    juju.statuses()
}

#[test]
fn charm_status_after_success_a_failed_upload_and_past_the_max_age() {
    let tmp = tempdir();
    let mut s3 = S3::start(tmp.path(), &[BUCKET]);
    let node = Node::single(tmp.path(), "cs", &v35());
    node.fill("k/", 5);
    let juju = Juju::new(tmp.path(), "etcd/0");
    fs::write(
        juju.state.join("config.json"),
        serde_json::json!({"backup-max-age": "1h", "metrics-dir": tmp.path().join("m")})
            .to_string(),
    )
    .unwrap();
    juju.s3_relation(s3.bag(BUCKET, ""), None);
    let target = tmp.path().join("snaps");
    let snapshot = |juju: &Juju| {
        juju.reset();
        juju.params(
            "snapshot",
            serde_json::json!({"target": target.to_str().unwrap()}),
        );
        Agent::juju(&node, juju, "snapshot").run()
    };
    // After success: set by the action itself, and by update-status.
    let r = snapshot(&juju).juju_ok(&juju);
    let revision = r["snapshot"]["revision"].as_str().unwrap().to_string();
    let statuses = juju.statuses();
    assert!(
        statuses.contains("active backup ")
            && statuses.contains(&format!("(revision {revision}, s3)")),
        "{statuses}"
    );
    let statuses = update_status(tmp.path(), &juju, &node, None);
    assert!(statuses.starts_with("active backup "), "{statuses}");
    assert!(
        statuses.contains(&format!("(revision {revision}, s3)")),
        "{statuses}"
    );
    check_metrics(&tmp.path().join("m/etcd_backup.prom")).unwrap();
    let text = fs::read_to_string(tmp.path().join("m/etcd_backup.prom")).unwrap();
    assert_eq!(sample(&text, "etcd_backup_max_age_seconds"), Some(3600.0));

    // After a failed upload.
    node.put("k/more", "x");
    s3.kill();
    snapshot(&juju).juju_failed(&juju);
    let statuses = update_status(tmp.path(), &juju, &node, None);
    assert!(
        statuses.starts_with("active backup ")
            && statuses.contains("local")
            && statuses.contains("upload failed"),
        "{statuses}"
    );

    // Past the max age (the clock two hours on): blocked, saying why.
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2 * 3600;
    let statuses = update_status(tmp.path(), &juju, &node, Some(later));
    assert!(
        statuses.starts_with("blocked ") && statuses.contains("older than backup-max-age"),
        "{statuses}"
    );
    // backup-status says the same.
    juju.reset();
    juju.params(
        "backup-status",
        serde_json::json!({"target": target.to_str().unwrap()}),
    );
    let st = Agent::juju(&node, &juju, "backup-status")
        .env("ETCD_ACTIONS_TEST_NOW", later.to_string())
        .run()
        .juju_ok(&juju);
    assert_eq!(st["status"]["state"].as_str(), Some("blocked"), "{st:?}");
    assert!(st["newest"]["local"]["id"].as_str().is_some(), "{st:?}");
}
