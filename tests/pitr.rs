//! Point-in-time recovery: `follow` records the change history from etcd's watch stream and
//! `restore --to-revision/--to-time` replays it onto a full snapshot. Real etcd 3.5.30 (its
//! etcdutl has the revision bump).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use etcd_actions::history::{self, Named};

use crate::util::*;

/// Every key at `rev` (0: now) with its value, create and mod revisions and version, as
/// etcd's own Range gives them.
pub fn range(node: &Node, rev: i64) -> BTreeMap<String, (String, i64, i64, i64, i64)> {
    let mut args = vec!["get", "", "--prefix", "-w", "json"];
    let r = format!("--rev={rev}");
    if rev > 0 {
        args.push(&r);
    }
    let out: serde_json::Value = serde_json::from_str(&node.ctl_ok(&args)).unwrap();
    let b64 = |v: &serde_json::Value| {
        use base64::Engine;
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or_default())
                .unwrap(),
        )
        .unwrap()
    };
    out["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    (
                        b64(&kv["key"]),
                        (
                            b64(&kv["value"]),
                            kv["create_revision"].as_i64().unwrap(),
                            kv["mod_revision"].as_i64().unwrap(),
                            kv["version"].as_i64().unwrap(),
                            kv["lease"].as_i64().unwrap_or(0),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The same without leases (a restore keeps lease ids; compared separately).
pub fn no_leases(
    m: BTreeMap<String, (String, i64, i64, i64, i64)>,
) -> BTreeMap<String, (String, i64, i64, i64)> {
    m.into_iter()
        .map(|(k, (v, c, m, ver, _))| (k, (v, c, m, ver)))
        .collect()
}

pub fn follow_agent(node: &Node, target: &Path) -> Agent {
    Agent::standalone(
        node,
        &[
            "follow",
            "--target",
            target.to_str().unwrap(),
            "--flush-interval",
            "1",
        ],
    )
}

pub fn follow(node: &Node, target: &Path) -> Child {
    follow_agent(node, target).spawn()
}

/// Waits until follow's state says it has made `rev` durable.
pub fn wait_recorded(target: &Path, node: &Node, rev: i64) {
    let state = target
        .join("changes")
        .join(format!("{:x}", node.cluster_id()))
        .join("follow.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let through = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["through_revision"].as_i64());
        if through.is_some_and(|t| t >= rev) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "follow never recorded revision {rev} (state: {through:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn sigterm(mut child: Child) -> std::process::Output {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "follow did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Every segment of the node's cluster in `target`, in order, decoded.
pub fn segments(target: &Path, cluster: u64) -> Vec<(Named, history::Head, Vec<history::Rev>)> {
    let dir = target.join("changes").join(format!("{cluster:x}"));
    let mut names: Vec<Named> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| Named::parse(&e.file_name().to_string_lossy()))
        .collect();
    names.sort_by_key(|n| n.first);
    names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n.name)).unwrap();
            let (h, revs) =
                history::decode(&bytes, &n, &etcd_actions::crypt::Keys::default()).unwrap();
            (n, h, revs)
        })
        .collect()
}

pub fn txn(node: &Node, ops: &str) {
    let out = run_with_stdin(node.ctl().arg("txn"), format!("\n{ops}\n\n\n").as_bytes());
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn restore_to_a_revision_equals_the_source_at_that_revision() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "p0", &v3530());
    let target = tmp.path().join("backups");
    node.fill("base/", 50);
    // No full snapshot yet: follow takes one first.
    let f = follow(&node, &target);
    let base_rev = node.revision();
    wait_recorded(&target, &node, base_rev);
    assert_eq!(
        std::fs::read_dir(&target)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.gz"))
            .count(),
        1,
        "follow took a full snapshot first"
    );
    // Overwrites, deletes, a multi-key txn, a leased key, a prefix delete.
    node.put("a", "1");
    node.put("a", "2");
    node.put("b", "x");
    txn(&node, "put t1 one\nput t2 two\ndel b");
    let lease_out = node.ctl_ok(&["lease", "grant", "600"]);
    let lease = lease_out.split_whitespace().nth(1).unwrap().to_string();
    node.ctl_ok(&["put", "leased", "v", "--lease", &lease]);
    node.put("a", "3");
    node.fill("many/", 300);
    // One revision of 300 deletes: more ops than a txn takes by default.
    node.ctl_ok(&["del", "many/", "--prefix"]);
    let mid = node.revision();
    let at_mid = range(&node, mid);
    node.ctl_ok(&["del", "base/00", "--prefix"]);
    node.put("a", "4");
    node.put("late", "z");
    let end = node.revision();
    wait_recorded(&target, &node, end);
    let out = sigterm(f);
    assert!(
        out.status.success(),
        "SIGTERM ends follow with 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The txn is one revision in the history.
    let segs = segments(&target, node.cluster_id());
    let txn_rev = segs
        .iter()
        .flat_map(|s| s.2.iter())
        .find(|r| r.ev.len() == 3)
        .expect("the txn's revision holds its three changes");
    assert!(txn_rev.ev.iter().any(|e| e.del));

    let cluster_before = node.cluster_id();
    let r = Agent::standalone(
        &node,
        &[
            "restore",
            "--to-revision",
            &mid.to_string(),
            "--target",
            target.to_str().unwrap(),
        ],
    )
    .run()
    .success();
    assert_eq!(
        r["restore"]["point-revision"].as_str(),
        Some(&*mid.to_string())
    );
    assert_eq!(
        r["restore"]["base-revision"].as_str(),
        Some(&*base_rev.to_string())
    );
    assert_ne!(node.cluster_id(), cluster_before, "a new cluster");
    let restored = range(&node, 0);
    assert_eq!(
        no_leases(restored.clone()),
        no_leases(at_mid.clone()),
        "keys, values, create/mod revisions and versions as at revision {mid}"
    );
    // The multi-key txn's keys share its revision.
    assert_eq!(restored["t1"].2, restored["t2"].2);
    assert!(!restored.contains_key("b"));
    // The leased key is on a live lease with its id.
    let (_, _, _, _, lease_id) = restored["leased"];
    assert_eq!(
        Ok(lease_id),
        i64::from_str_radix(&lease, 16),
        "the recorded lease id"
    );
    let ttl = node.ctl_ok(&["lease", "timetolive", &lease]);
    assert!(
        ttl.contains("remaining") && !ttl.contains("already expired"),
        "the lease is alive: {ttl}"
    );
    // The numbering goes on after the bump.
    assert!(
        node.revision() > mid + 900_000_000,
        "bumped after the replay"
    );
}

#[test]
fn restore_to_a_time_and_refusals_outside_the_history() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "p1", &v3530());
    let target = tmp.path().join("backups");
    node.put("before", "0");
    Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let f = follow(&node, &target);
    node.put("first", "1");
    node.put("second", "2");
    let first_rev = node.revision();
    wait_recorded(&target, &node, first_rev);
    std::thread::sleep(Duration::from_millis(1200));
    let between = etcd_actions::manifest::rfc3339(etcd_actions::manifest::now_secs());
    std::thread::sleep(Duration::from_millis(1200));
    node.put("third", "3");
    node.put("first", "changed");
    let end = node.revision();
    wait_recorded(&target, &node, end);
    sigterm(f);
    let at_first = no_leases(range(&node, first_rev));

    // Outside the history: refused, exit 3, the range named, nothing changed.
    let before = range(&node, 0);
    let cluster = node.cluster_id();
    let run = Agent::standalone(
        &node,
        &[
            "restore",
            "--to-revision",
            &(end + 1000).to_string(),
            "--target",
            target.to_str().unwrap(),
        ],
    )
    .run();
    assert_eq!(run.code(), 3, "{}", run.stderr());
    let msg = run.failure();
    assert!(msg.contains("outside the recorded history"), "{msg}");
    assert!(
        msg.contains(&format!("–{end}")),
        "names the covered range: {msg}"
    );
    let run = Agent::standalone(
        &node,
        &[
            "restore",
            "--to-time",
            "2001-01-01T00:00:00Z",
            "--target",
            target.to_str().unwrap(),
        ],
    )
    .run();
    assert_eq!(run.code(), 3, "{}", run.stderr());
    assert_eq!(range(&node, 0), before, "nothing changed");
    assert_eq!(node.cluster_id(), cluster);
    let run = Agent::standalone(&node, &["restore", "--to-time", "yesterday"]).run();
    assert_eq!(run.code(), 2);
    assert!(run.failure().contains("RFC 3339"));

    // To a time between the writes: the last revision received at or before it.
    Agent::standalone(
        &node,
        &[
            "restore",
            "--to-time",
            &between,
            "--target",
            target.to_str().unwrap(),
        ],
    )
    .run()
    .success();
    assert_eq!(no_leases(range(&node, 0)), at_first);
}

#[test]
fn follow_resumes_after_kill_9_without_gap_or_duplicate_and_refuses_a_second() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "p2", &v3530());
    let target = tmp.path().join("backups");
    Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let base = node.revision();
    let mut f = follow(&node, &target);
    node.put("k1", "acknowledged");
    let k1 = node.revision();
    // A second follow on the same target is refused while the first runs.
    wait_recorded(&target, &node, base);
    let second = Agent::standalone(&node, &["follow", "--target", target.to_str().unwrap()]).run();
    assert_ne!(second.code(), 0);
    assert!(
        second.stderr().contains("another follow"),
        "{}",
        second.stderr()
    );
    // Older than the flush interval, then kill -9.
    std::thread::sleep(Duration::from_millis(2500));
    f.kill().unwrap();
    f.wait().unwrap();
    node.fill("while-down/", 30);
    node.put("k1", "after");
    let metrics = tmp.path().join("metrics");
    let f = follow_agent(&node, &target)
        .env("ETCD_ACTIONS_METRICS_DIR", &metrics)
        .spawn();
    node.put("k2", "v");
    // etcd restarts under it: follow reconnects and resumes after what it received.
    wait_recorded(&target, &node, node.revision());
    node.stop();
    std::thread::sleep(Duration::from_millis(1500));
    node.start();
    node.wait_healthy();
    node.put("k3", "after the restart");
    let end = node.revision();
    wait_recorded(&target, &node, end);
    // status: running, and how far the history is durable.
    let st = Agent::standalone(&node, &["status", "--target", target.to_str().unwrap()])
        .run()
        .success();
    assert_eq!(st["follow"]["state"].as_str(), Some("running"), "{st:?}");
    assert_eq!(
        st["follow"]["durable-revision"].as_str(),
        Some(&*end.to_string())
    );
    sigterm(f);
    let st = Agent::standalone(&node, &["status", "--target", target.to_str().unwrap()])
        .run()
        .success();
    assert_eq!(st["follow"]["state"].as_str(), Some("stopped"));
    // Its textfile: what promtool accepts, with the durable revision.
    let prom = metrics.join("etcd_backup_follow.prom");
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(
        text.contains(&format!("etcd_backup_follow_durable_revision {end}")),
        "{text}"
    );
    let out = run_with_stdin(
        std::process::Command::new("promtool").args(["check", "metrics"]),
        text.as_bytes(),
    );
    assert!(out.status.success(), "{out:?}");

    let segs = segments(&target, node.cluster_id());
    let mut next = base + 1;
    let mut prev_sha: Option<String> = None;
    let dir = target
        .join("changes")
        .join(format!("{:x}", node.cluster_id()));
    let mut seen = Vec::new();
    for (n, h, revs) in &segs {
        assert_eq!(n.first, next, "contiguous: {}", n.name);
        if let Some(p) = &prev_sha {
            assert_eq!(h.prev_sha256.as_ref(), Some(p), "chained: {}", n.name);
        }
        prev_sha = Some(sha256_file(&dir.join(&n.name)));
        seen.extend(revs.iter().map(|r| r.r));
        next = n.last + 1;
    }
    assert_eq!(next, end + 1, "up to the last write");
    assert_eq!(
        seen,
        (base + 1..=end).collect::<Vec<_>>(),
        "every revision once"
    );

    // The write acknowledged before the kill is restorable, with follow running: the
    // restore replaces the cluster under it, and follow ends that history.
    let want = no_leases(range(&node, k1));
    let running = follow(&node, &target);
    Agent::standalone(
        &node,
        &[
            "restore",
            "--to-revision",
            &k1.to_string(),
            "--target",
            target.to_str().unwrap(),
            "--skip-backup",
        ],
    )
    .run()
    .success();
    assert_eq!(no_leases(range(&node, 0)), want);
    let out = wait_ok_or_failed(running);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("now serves cluster"));
}

#[test]
fn the_charm_option_installs_a_follow_service_that_verifies() {
    let tmp = tempdir();
    let juju = Juju::new(tmp.path(), "etcd/0");
    let units = tmp.path().join("charm-units");
    let run_hook = juju.config_hook(tmp.path(), &units);
    let service = units.join("etcd-actions-follow.service");
    let (code, err) = run_hook(serde_json::json!({
        "backup-schedule": "", "continuous-backup": true,
        "backup-target": "/var/backups/etcd history"
    }));
    assert_eq!(code, Some(0), "{err}");
    let text = std::fs::read_to_string(&service).unwrap();
    assert!(
        text.contains("\"follow\" \"--target\" \"/var/backups/etcd history\""),
        "{text}"
    );
    assert!(text.contains("Restart=always") && text.contains("JUJU_UNIT_NAME=etcd/0"));
    systemd_verify(&[&service]);
    let env = tmp.path().join("follow.env");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&env).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Off again: the service goes, the history stays where it is.
    let (code, err) =
        run_hook(serde_json::json!({"backup-schedule": "", "continuous-backup": false}));
    assert_eq!(code, Some(0), "{err}");
    assert!(!service.exists() && !env.exists());
}

#[test]
fn history_is_listed_verified_pruned_and_a_compaction_is_an_explicit_gap() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "p3", &v3530());
    let target = tmp.path().join("backups");
    let t = target.to_str().unwrap();
    node.put("a", "1");
    Agent::snapshot(&node, t).run().success();
    let f = follow(&node, &target);
    node.fill("one/", 20);
    let recorded = node.revision();
    wait_recorded(&target, &node, recorded);
    sigterm(f);
    // Written while follow is down, then compacted away.
    node.fill("lost/", 20);
    node.put("lost-last", "x");
    let compacted = node.revision();
    node.ctl_ok(&["compact", &compacted.to_string()]);
    let f = follow(&node, &target);
    // The gap is recorded once follow's full snapshot is taken.
    wait_recorded(&target, &node, compacted);
    node.put("after", "1");
    let end = node.revision();
    wait_recorded(&target, &node, end);
    sigterm(f);

    let segs = segments(&target, node.cluster_id());
    let gap = segs
        .iter()
        .find(|s| s.0.gap)
        .expect("an explicit gap segment");
    assert_eq!(gap.0.first, recorded + 1);
    assert!(gap.0.last >= compacted, "{:?}", gap.0);
    let r = Agent::standalone(&node, &["list-backups", "--target", t])
        .run()
        .success();
    let gaps = r["history"]["0"]["gaps"].as_str().unwrap().to_string();
    assert!(gaps.starts_with(&format!("{}–", recorded + 1)), "{gaps}");
    assert!(r["table"].as_str().unwrap().contains("history of cluster"));
    // A point inside the gap is refused, naming it.
    let run = Agent::standalone(
        &node,
        &[
            "restore",
            "--to-revision",
            &(recorded + 1).to_string(),
            "--target",
            t,
        ],
    )
    .run();
    assert_eq!(run.code(), 3, "{}", run.stderr());
    assert!(run.failure().contains("lost"));

    // verify reads the chain; --deep replays it to its end in a drill.
    let r = Agent::standalone(&node, &["verify", "--target", t, "--deep"])
        .run()
        .success();
    assert!(
        r["verify"]["history"]["0"]["chain"]
            .as_str()
            .unwrap()
            .starts_with("continuous"),
        "{r:?}"
    );
    assert!(
        r["verify"]["history-drill"]
            .as_str()
            .unwrap()
            .starts_with("passed"),
        "{r:?}"
    );
    // A damaged segment fails verify.
    let dir = target
        .join("changes")
        .join(format!("{:x}", node.cluster_id()));
    let victim = dir.join(&segs[0].0.name);
    let good = std::fs::read(&victim).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x55;
    std::fs::write(&victim, &bad).unwrap();
    let run = Agent::standalone(&node, &["verify", "--target", t]).run();
    assert_ne!(run.code(), 0);
    assert!(run.failure().contains("damaged"), "{}", run.stderr());
    std::fs::write(&victim, &good).unwrap();

    // prune keeps the segments the kept snapshots need: keep-last 1 keeps the snapshot follow
    // took after the gap, so everything up to it goes.
    let r = Agent::standalone(&node, &["prune", "--target", t, "--keep-last", "1"])
        .run()
        .success();
    assert_eq!(
        r["history"]["removed"].as_str().map(str::to_string),
        Some((segs.len() - 1).to_string()),
        "{r:?}"
    );
    let left = segments(&target, node.cluster_id());
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0.last, end);
    // Under Juju: the restore action's to-revision param.
    let juju = Juju::new(&tmp.path().join("juju"), "etcd/0");
    juju.params(
        "restore",
        serde_json::json!({"to-revision": end, "target": t, "skip-backup": true}),
    );
    let r = Agent::juju(&node, &juju, "restore").run().juju_ok(&juju);
    assert_eq!(
        r["restore"]["point-revision"],
        serde_json::json!(end.to_string())
    );
    assert!(node.dump().contains_key("after"));
}

#[test]
fn encrypted_history_in_the_store_restores_with_no_local_files() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "p4", &v3530());
    let s3 = S3::start(tmp.path(), &["hist"]);
    let target = tmp.path().join("backups");
    let key = tmp.path().join("key.txt");
    let out = std::process::Command::new("/usr/bin/age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let recipient = String::from_utf8(
        std::process::Command::new("/usr/bin/age-keygen")
            .arg("-y")
            .arg(&key)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let f = s3
        .env(follow_agent(&node, &target), "hist", "pitr")
        .env("ETCD_ACTIONS_ENCRYPT_TO", &recipient)
        .spawn();
    node.fill("k/", 10);
    let mid = node.revision();
    let want = no_leases(range(&node, mid));
    node.put("k/0001", "later");
    wait_recorded(&target, &node, node.revision());
    sigterm(f);
    // Resumed without an identity: the encrypted segments chain by their names and bytes.
    let f = s3
        .env(follow_agent(&node, &target), "hist", "pitr")
        .env("ETCD_ACTIONS_ENCRYPT_TO", &recipient)
        .spawn();
    node.put("k/0002", "resumed");
    let end = node.revision();
    wait_recorded(&target, &node, end);
    sigterm(f);
    let names: Vec<Named> = files_in(
        &target
            .join("changes")
            .join(format!("{:x}", node.cluster_id())),
    )
    .iter()
    .filter_map(|n| Named::parse(n))
    .collect();
    let mut ranges: Vec<(i64, i64)> = names.iter().map(|n| (n.first, n.last)).collect();
    ranges.sort_unstable();
    assert!(
        ranges.windows(2).all(|w| w[0].1 + 1 == w[1].0),
        "{ranges:?}"
    );
    assert_eq!(ranges.last().map(|r| r.1), Some(end));
    let cluster = format!("{:x}", node.cluster_id());
    let objects = s3.objects("hist", &format!("pitr/etcd/changes/{cluster}"));
    assert!(!objects.is_empty());
    assert!(
        objects.iter().all(|o| o.ends_with(".jsonl.gz.age")),
        "{objects:?}"
    );
    // The stock age opens a segment: gzip inside.
    let local = target.join("changes").join(&cluster);
    let first = std::fs::read_dir(&local)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".age"))
        .unwrap()
        .path();
    let plain = std::process::Command::new("/usr/bin/age")
        .arg("-d")
        .arg("-i")
        .arg(&key)
        .arg(&first)
        .output()
        .unwrap();
    assert!(plain.status.success() && plain.stdout.starts_with(&[0x1f, 0x8b]));
    // Only the store: the local target is gone.
    std::fs::remove_dir_all(&target).unwrap();
    let empty = tmp.path().join("elsewhere");
    let t = empty.to_str().unwrap();
    let run = s3
        .env(
            Agent::standalone(
                &node,
                &["restore", "--to-revision", &mid.to_string(), "--target", t],
            ),
            "hist",
            "pitr",
        )
        .run();
    assert_eq!(run.code(), 3, "no identity: {}", run.stderr());
    s3.env(
        Agent::standalone(
            &node,
            &["restore", "--to-revision", &mid.to_string(), "--target", t],
        ),
        "hist",
        "pitr",
    )
    .env("ETCD_ACTIONS_IDENTITY_FILE", &key)
    .run()
    .success();
    assert_eq!(no_leases(range(&node, 0)), want);
}

#[test]
fn a_full_disk_stops_follow_with_a_clear_error_and_the_history_intact() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "p5", &v3530());
    let target = tmp.path().join("backups");
    Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let base = node.revision();
    // Two segments are written, then the disk is full.
    let f = follow_agent(&node, &target)
        .env("FAILPOINTS", "follow-disk-full=2*off->return")
        .spawn();
    node.put("one", "1");
    wait_recorded(&target, &node, base + 1);
    node.put("two", "2");
    wait_recorded(&target, &node, base + 2);
    node.put("three", "3");
    let out = wait_ok_or_failed(f);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not enough free space") && err.contains("change segment"),
        "{err}"
    );
    // What was durable is intact; no temp file is left.
    let segs = segments(&target, node.cluster_id());
    assert_eq!(segs.len(), 2);
    assert_eq!(segs[1].0.last, base + 2);
    let dir = target
        .join("changes")
        .join(format!("{:x}", node.cluster_id()));
    assert!(files_in(&dir).iter().all(|n| !n.starts_with(".tmp-")));
    // Room again: follow resumes after the last durable segment, nothing lost.
    let f = follow(&node, &target);
    let end = node.revision();
    wait_recorded(&target, &node, end);
    sigterm(f);
    let segs = segments(&target, node.cluster_id());
    assert_eq!(segs.last().unwrap().0.last, end);
    assert_eq!(segs.last().unwrap().0.first, base + 3);
}

/// Waits for a child that ends by itself (bounded), with its output.
fn wait_ok_or_failed(mut child: Child) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "follow did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_store_that_is_away_holds_up_nothing_and_gets_the_segments_later() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "p6", &v3530());
    let mut s3 = S3::start(tmp.path(), &["away"]);
    let target = tmp.path().join("backups");
    s3.env(
        Agent::snapshot(&node, target.to_str().unwrap()),
        "away",
        "h",
    )
    .run()
    .success();
    s3.kill();
    let f = s3.env(follow_agent(&node, &target), "away", "h").spawn();
    node.put("while-away", "1");
    let end = node.revision();
    wait_recorded(&target, &node, end);
    let out = sigterm(f);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not uploaded yet"));
    // The store is back: the next follow uploads what it lacks.
    s3.restart();
    let f = s3.env(follow_agent(&node, &target), "away", "h").spawn();
    wait_recorded(&target, &node, end);
    std::thread::sleep(Duration::from_millis(1500));
    sigterm(f);
    let cluster = format!("{:x}", node.cluster_id());
    let local = files_in(&target.join("changes").join(&cluster))
        .into_iter()
        .filter(|n| Named::parse(n).is_some())
        .count();
    let stored = s3
        .objects("away", &format!("h/etcd/changes/{cluster}"))
        .len();
    assert!(local > 0);
    assert_eq!(stored, local, "every local segment is in the store");
}
