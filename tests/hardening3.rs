//! Hardening round 3 (issue 15): the store and the lifecycle attacked as a hostile store, a
//! hostile local user and an operator making ordinary mistakes. Each test failed on the code
//! before the fix.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::lifecycle::snapshot_at;
use crate::util::*;

fn name_of(results: &serde_yaml::Value) -> String {
    Path::new(results["snapshot"]["path"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

fn listed(results: &serde_yaml::Value) -> Vec<serde_yaml::Value> {
    results["backups"]
        .as_mapping()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default()
}

/// Two clusters (standalone, so both are application `etcd`) share one real store folder:
/// same-second snapshots get different names and both objects stay; each cluster's prune and
/// `backup` count only its own archives; `where: both` only when the sha256 values agree.
#[test]
fn two_clusters_sharing_a_store_folder_keep_each_others_backups() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &["shared-backups"]);
    let a = Node::single(&tmp.path().join("a"), "alpha", &v35());
    let b = Node::single(&tmp.path().join("b"), "beta", &v35());
    assert_ne!(a.cluster_id(), b.cluster_id());
    a.put("owner", "a");
    b.put("owner", "b");
    let (ta, tb) = (tmp.path().join("snaps-a"), tmp.path().join("snaps-b"));
    let in_store = |node: &Node, target: &Path, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--target", target.to_str().unwrap()]);
        s3.env(
            Agent::standalone(node, &all).env("ETCD_ACTIONS_ETCDCTL", NO_ETCDCTL),
            "shared-backups",
            "fleet",
        )
    };
    // The same second on both clusters.
    let now = "1795000000";
    let ra = in_store(&a, &ta, &["snapshot"])
        .env("ETCD_ACTIONS_TEST_NOW", now)
        .run()
        .success();
    let rb = in_store(&b, &tb, &["snapshot"])
        .env("ETCD_ACTIONS_TEST_NOW", now)
        .run()
        .success();
    let (na, nb) = (name_of(&ra), name_of(&rb));
    assert_ne!(na, nb, "two clusters never name two archives alike");
    let objects = s3.archives("shared-backups", "fleet/etcd");
    assert_eq!(objects.len(), 2, "{objects:?}");
    // Each object is its own cluster's archive.
    for (r, name) in [(&ra, &na), (&rb, &nb)] {
        let obj = s3.dir.join("shared-backups/fleet/etcd").join(name);
        assert_eq!(sha256_file(&obj), r["snapshot"]["sha256"].as_str().unwrap());
    }

    // Cluster A keeps one: B's only archive stays, and so does A's own new one.
    a.put("more", "x");
    let pruned = in_store(&a, &ta, &["backup"])
        .env("ETCD_ACTIONS_RETENTION", "last=1")
        .run()
        .success();
    let newest_a = name_of(&pruned);
    let objects = s3.objects("shared-backups", "fleet/etcd");
    assert!(
        objects.iter().any(|o| o.ends_with(&nb)),
        "B's only archive survived A's prune: {objects:?}"
    );
    assert!(objects.iter().any(|o| o.ends_with(&newest_a)));
    assert!(
        !objects.iter().any(|o| o.ends_with(&na)),
        "A's older one went"
    );
    let ignored: Vec<String> = pruned["ignored"]
        .as_mapping()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(ignored.iter().any(|i| i.ends_with(&nb)), "{ignored:?}");
    // A prune on B keeps its own.
    let pb = in_store(&b, &tb, &["prune", "--keep-last", "1"])
        .run()
        .success();
    assert_eq!(pb["prune"]["removed"].as_str(), Some("0"));
    assert!(s3
        .objects("shared-backups", "fleet/etcd")
        .iter()
        .any(|o| o.ends_with(&nb)));

    // A local file under B's name that is not B's archive: listed apart, never `both`.
    fs::copy(ta.join(&newest_a), ta.join(&nb)).unwrap();
    fs::write(
        ta.join(format!("{nb}.sha256")),
        format!("{}  {nb}\n", sha256_file(&ta.join(&nb))),
    )
    .unwrap();
    let list = in_store(&a, &ta, &["list-backups"]).run().success();
    let same_name: Vec<serde_yaml::Value> = listed(&list)
        .into_iter()
        .filter(|e| e["id"].as_str() == Some(nb.as_str()))
        .collect();
    assert_eq!(same_name.len(), 2, "{list:?}");
    for e in &same_name {
        assert_ne!(e["where"].as_str(), Some("both"), "{e:?}");
    }
    let store_copy = same_name
        .iter()
        .find(|e| e["where"].as_str() == Some("store"))
        .unwrap();
    assert_eq!(store_copy["sha256"], rb["snapshot"]["sha256"]);
    let a_newest = listed(&list)
        .into_iter()
        .find(|e| e["id"].as_str() == Some(newest_a.as_str()))
        .unwrap();
    assert_eq!(a_newest["where"].as_str(), Some("both"));
}

/// An archive dated in the future (clock ahead when taken) never makes `backup` delete the
/// archive it just wrote; it is kept, reported, and not counted.
#[test]
fn a_future_dated_archive_never_pushes_out_the_new_one() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    let snaps = tmp.path().join("snaps");
    let future = snapshot_at(&node, &snaps, 1_924_992_000, "etcd-snapshot");
    for i in 0..2 {
        node.put("k", &format!("v{i}"));
        let r = Agent::standalone(&node, &["backup", "--target", snaps.to_str().unwrap()])
            .env("ETCD_ACTIONS_RETENTION", "last=1")
            .run()
            .success();
        let written = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
        assert!(written.exists(), "the reported archive exists: {r:?}");
        assert!(
            r["future"]["0"].as_str().unwrap().contains(&future),
            "{r:?}"
        );
    }
    let archives: Vec<String> = files_in(&snaps)
        .into_iter()
        .filter(|n| n.ends_with(".tar.gz"))
        .collect();
    assert_eq!(
        archives.len(),
        2,
        "the future one and the newest: {archives:?}"
    );
    assert!(archives.contains(&future));
}

fn if_changed(node: &Node, snaps: &Path) -> serde_yaml::Value {
    Agent::standalone(
        node,
        &[
            "snapshot",
            "--target",
            snaps.to_str().unwrap(),
            "--if-changed",
        ],
    )
    .run()
    .success()
}

/// Users, roles, grants and leases do not move the revision; `if-changed` still sees them.
fn if_changed_sees_auth_and_leases(flavor: &Flavor) {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", flavor);
    wait_cluster_version(&node);
    node.put("k", "v");
    node.settle();
    let snaps = tmp.path().join("snaps");
    Agent::snapshot(&node, snaps.to_str().unwrap())
        .run()
        .success();
    // Nothing changed: skipped (the applied index of an idle member stays put).
    assert!(if_changed(&node, &snaps)["snapshot"]["skipped"]
        .as_str()
        .is_some());
    let rev = node.revision();
    for step in [
        vec!["user", "add", "alice:secret-pw"],
        vec!["role", "add", "reader"],
        vec!["user", "grant-role", "alice", "reader"],
        vec!["lease", "grant", "600"],
    ] {
        node.ctl_ok(&step);
        node.settle();
        assert_eq!(node.revision(), rev, "{step:?} does not move the revision");
        let r = if_changed(&node, &snaps);
        assert!(
            r["snapshot"]["skipped"].is_null(),
            "after {step:?} a new snapshot is taken: {r:?}"
        );
        let again = if_changed(&node, &snaps);
        assert!(
            again["snapshot"]["skipped"].as_str().is_some(),
            "right after {step:?}'s snapshot nothing changed: {again:?}, {}",
            node.ctl_ok(&["endpoint", "status", "-w", "json"])
        );
    }
    // The newest archive has alice: restore it into a new cluster and look.
    let newest = files_in(&snaps)
        .into_iter()
        .filter(|n| n.ends_with(".tar.gz"))
        .max_by_key(|n| fs::metadata(snaps.join(n)).unwrap().modified().unwrap())
        .unwrap();
    let other = Node::single(&tmp.path().join("other"), "other", flavor);
    Agent::restore(
        &other,
        snaps.join(&newest).to_str().unwrap(),
        &["--skip-backup"],
    )
    .run()
    .success();
    let users = other.ctl_ok(&["user", "list"]);
    assert!(users.contains("alice"), "{users}");
}

#[test]
fn if_changed_sees_auth_and_leases_on_etcd_35() {
    if_changed_sees_auth_and_leases(&v35());
}

#[test]
fn if_changed_sees_auth_and_leases_on_etcd_34() {
    if_changed_sees_auth_and_leases(&v34());
}

/// An upload that failed is done by the next `--if-changed` run, from the verified local
/// archive, instead of "unchanged" forever.
#[test]
fn a_failed_upload_is_done_by_the_next_run() {
    let tmp = tempdir();
    let mut s3 = S3::start(tmp.path(), &["etcd-backups"]);
    let node = Node::single(tmp.path(), "unit", &v35());
    node.put("k", "v");
    let snaps = tmp.path().join("snaps");
    let t = snaps.to_str().unwrap();
    let run = |s3: &S3| {
        s3.env(
            Agent::standalone(&node, &["snapshot", "--target", t, "--if-changed"]),
            "etcd-backups",
            "",
        )
        .run()
    };
    // The store is down while the snapshot is taken (without if-changed, nothing is listed
    // first): the upload fails, the local archive stays.
    s3.kill();
    let failed = s3
        .env(
            Agent::standalone(&node, &["snapshot", "--target", t]),
            "etcd-backups",
            "",
        )
        .run();
    let msg = failed.failure();
    assert!(msg.contains("uploads it"), "{msg}");
    assert_eq!(
        files_in(&snaps).len(),
        3,
        "the local archive (and sidecars) are kept"
    );
    s3.restart();
    let r = run(&s3).success();
    assert!(r["snapshot"]["skipped"].as_str().is_some(), "{r:?}");
    let url = r["upload"]["url"].as_str().expect("uploaded now");
    let name = files_in(&snaps)
        .into_iter()
        .find(|n| n.ends_with(".tar.gz"))
        .unwrap();
    assert!(url.ends_with(&name), "{url}");
    assert_eq!(
        sha256_file(&s3.dir.join("etcd-backups/etcd").join(&name)),
        sha256_file(&snaps.join(&name))
    );
    assert_eq!(files_in(&snaps).len(), 3, "no new archive");
    let list = s3
        .env(
            Agent::standalone(&node, &["list-backups", "--target", t]),
            "etcd-backups",
            "",
        )
        .run()
        .success();
    assert_eq!(list["backups"]["0"]["where"].as_str(), Some("both"));
}

/// `schedule --install` carries the settings given as flags and etcdctl-style variables,
/// and writes secrets to the environment file as they are (`%` included).
#[test]
fn schedule_carries_every_setting_and_secrets_verbatim() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    let units = tmp.path().join("units");
    let env_file = tmp.path().join("backup.env");
    let secret = "p%d\"q$x`y\\z";
    let mut agent = Agent::standalone(
        &node,
        &[
            "schedule",
            "--on-calendar",
            "daily",
            "--install",
            "--s3-bucket",
            "flag-bucket",
            "--s3-endpoint",
            "http://127.0.0.1:9",
            "--endpoints",
            "http://127.0.0.1:2379",
        ],
    )
    .env("ETCD_ACTIONS_SYSTEMD_DIR", &units)
    .env("ETCD_ACTIONS_ENV_FILE", &env_file)
    .env("ETCDCTL_CACERT", "/etc/etcd/ca.crt")
    .env("AWS_ACCESS_KEY_ID", "AKSCHED")
    .env("AWS_SECRET_ACCESS_KEY", secret);
    agent.command().env_remove("ETCD_ACTIONS_ETCD_CONFIG");
    agent.command().arg("--etcd-config").arg(node.config_path());
    agent.run().success();
    let service = fs::read_to_string(units.join("etcd-actions-backup.service")).unwrap();
    for want in [
        "ETCD_ACTIONS_S3_BUCKET=flag-bucket",
        "ETCD_ACTIONS_S3_ENDPOINT=http://127.0.0.1:9",
        "ETCDCTL_ENDPOINTS=http://127.0.0.1:2379",
        "ETCDCTL_CACERT=/etc/etcd/ca.crt",
        &format!("ETCD_ACTIONS_ETCD_CONFIG={}", node.config_path().display()),
    ] {
        assert!(service.contains(want), "{want} missing:\n{service}");
    }
    assert!(!service.contains("p%d"), "no secret in the unit");
    // As systemd reads an EnvironmentFile (double quotes, backslash escapes, no specifiers),
    // the line gives back the secret exactly.
    let env = fs::read_to_string(&env_file).unwrap();
    let line = env
        .lines()
        .find(|l| l.starts_with("AWS_SECRET_ACCESS_KEY="))
        .unwrap();
    let quoted = line.trim_start_matches("AWS_SECRET_ACCESS_KEY=");
    let inner = &quoted[1..quoted.len() - 1];
    let mut parsed = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            parsed.push(chars.next().unwrap());
        } else {
            parsed.push(c);
        }
    }
    assert_eq!(parsed, secret, "{line}");
    assert!(!line.contains("%%"), "{line}");

    // A spec that looks like an option is refused, and nothing is written.
    let before = fs::read_to_string(units.join("etcd-actions-backup.timer")).unwrap();
    for spec in ["--help", "-h"] {
        let bad = Agent::standalone(
            &node,
            &["schedule", &format!("--on-calendar={spec}"), "--install"],
        )
        .env("ETCD_ACTIONS_SYSTEMD_DIR", &units)
        .env("ETCD_ACTIONS_ENV_FILE", &env_file)
        .run();
        assert_eq!(bad.code(), 2, "{spec}: {}", bad.stdout());
        assert!(bad.failure().contains("starts with `-`"));
    }
    assert_eq!(
        fs::read_to_string(units.join("etcd-actions-backup.timer")).unwrap(),
        before
    );
}

/// The charm's config reaches root's unit files: a newline in `backup-target` (writable by
/// model users below admin) is refused with a blocked status naming the option, and the unit
/// files stay as they were.
#[test]
fn config_values_that_would_split_a_unit_file_are_refused() {
    let tmp = tempdir();
    let juju = Juju::new(tmp.path(), "etcd/0");
    let units = tmp.path().join("units");
    let hook = juju.config_hook(tmp.path(), &units);
    let run_hook = |config: serde_json::Value| {
        let (code, err) = hook(config);
        assert_eq!(code, Some(0), "{err}");
    };
    run_hook(serde_json::json!({"backup-schedule": "daily", "backup-target": "/srv/etcd"}));
    let service = fs::read_to_string(units.join("etcd-actions-backup.service")).unwrap();
    for (option, config) in [
        (
            "backup-target",
            serde_json::json!({"backup-schedule": "daily",
                "backup-target": "/srv/x\nExecStartPre=/bin/touch /tmp/pwned"}),
        ),
        (
            "backup-target",
            serde_json::json!({"backup-schedule": "daily", "backup-target": "relative/dir"}),
        ),
        (
            "backup-retention",
            serde_json::json!({"backup-schedule": "daily", "backup-retention": "last=x"}),
        ),
        (
            "backup-schedule",
            serde_json::json!({"backup-schedule": "--help"}),
        ),
    ] {
        run_hook(config.clone());
        let statuses = juju.statuses();
        assert!(
            statuses.starts_with("blocked") && statuses.contains(option),
            "{config}: {statuses}"
        );
        assert_eq!(
            fs::read_to_string(units.join("etcd-actions-backup.service")).unwrap(),
            service,
            "the unit is as it was"
        );
    }
    run_hook(serde_json::json!({"backup-schedule": "hourly", "backup-target": "/srv/etcd"}));
    assert!(juju.statuses().starts_with("active"), "{}", juju.statuses());
}

/// A stand-in for a hostile S3 server on loopback (no SigV4 check): answers each request
/// with what `respond` returns for its first line.
struct FakeStore {
    port: u16,
    served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

type Respond = dyn Fn(&str) -> Vec<u8> + Send + Sync;

impl FakeStore {
    fn start(respond: std::sync::Arc<Respond>) -> FakeStore {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let respond = respond.clone();
                let count = count.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut first = String::new();
                        if reader.read_line(&mut first).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0u8; len];
                        let _ = reader.read_exact(&mut body);
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if conn.write_all(&respond(first.trim_end())).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeStore { port, served }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn http(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn list_page(keys: &[&str], truncated: bool) -> Vec<u8> {
    let mut xml =
        String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>bk</Name>");
    for k in keys {
        xml.push_str(&format!(
            "<Contents><Key>{k}</Key><LastModified>2026-11-01T00:00:00.000Z</LastModified>\
             <ETag>\"e\"</ETag><Size>10</Size></Contents>"
        ));
    }
    xml.push_str(&format!(
        "<KeyCount>{}</KeyCount><IsTruncated>{truncated}</IsTruncated>",
        keys.len()
    ));
    if truncated {
        xml.push_str("<NextContinuationToken>more</NextContinuationToken>");
    }
    xml.push_str("</ListBucketResult>");
    http("200 OK", &[], xml.as_bytes())
}

fn list_backups_against(node: &Node, endpoint: &str, bucket: &str) -> Run {
    let dir = tempdir();
    Agent::standalone(
        node,
        &["list-backups", "--target", dir.path().to_str().unwrap()],
    )
    .env("ETCD_ACTIONS_S3_ENDPOINT", endpoint)
    .env("ETCD_ACTIONS_S3_BUCKET", bucket)
    .env("AWS_ACCESS_KEY_ID", "AK")
    .env("AWS_SECRET_ACCESS_KEY", "SK")
    .env("ETCD_ACTIONS_PEAK_RSS_FILE", dir.path().join("rss"))
    .run()
}

/// A store that paginates forever, sends a huge page, redirects elsewhere, or lists a key
/// the client cannot read: bounded errors (or the key passed over), never memory or time.
#[test]
fn a_hostile_store_gets_bounded_answers() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());

    // Always truncated: an error after a bounded number of pages.
    let endless = FakeStore::start(std::sync::Arc::new(|first: &str| {
        if first.contains("list-type=2") {
            list_page(&[], true)
        } else {
            http("404 Not Found", &[], b"")
        }
    }));
    let started = Instant::now();
    let run = list_backups_against(&node, &endless.endpoint(), "bk");
    let msg = run.failure();
    assert!(msg.contains("did not end after"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(100));

    // One 64 MiB page: refused before it is parsed, with bounded memory.
    let huge = FakeStore::start(std::sync::Arc::new(|first: &str| {
        if first.contains("list-type=2") {
            let mut xml = String::from("<?xml version=\"1.0\"?><ListBucketResult>");
            xml.push_str(&" ".repeat(64 << 20));
            xml.push_str("</ListBucketResult>");
            http("200 OK", &[], xml.as_bytes())
        } else {
            http("404 Not Found", &[], b"")
        }
    }));
    let dir = tempdir();
    let run = Agent::standalone(
        &node,
        &["list-backups", "--target", dir.path().to_str().unwrap()],
    )
    .env("ETCD_ACTIONS_S3_ENDPOINT", huge.endpoint())
    .env("ETCD_ACTIONS_S3_BUCKET", "bk")
    .env("AWS_ACCESS_KEY_ID", "AK")
    .env("AWS_SECRET_ACCESS_KEY", "SK")
    .env("ETCD_ACTIONS_PEAK_RSS_FILE", dir.path().join("rss"))
    .run();
    let msg = run.failure();
    assert!(msg.contains("larger than"), "{msg}");
    let rss = fs::read_to_string(dir.path().join("rss")).unwrap();
    let kib: u64 = rss.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(kib < 60 * 1024, "peak RSS {kib} KiB");

    // A redirect to another host: not followed, and that host's body is never shown.
    let (redirecting, elsewhere) = redirecting_elsewhere();
    let msg = list_backups_against(&node, &redirecting.endpoint(), "bk").failure();
    assert!(!msg.contains("ELSEWHERE"), "{msg}");
    assert_eq!(
        elsewhere.served.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the other host was never asked"
    );

    // A key the client cannot take as a path: passed over and named, the rest listed.
    let odd = FakeStore::start(std::sync::Arc::new(|first: &str| {
        if first.contains("list-type=2") {
            list_page(&["etcd/..", "etcd/a//b", "etcd/notes.txt"], false)
        } else {
            http("404 Not Found", &[], b"")
        }
    }));
    let r = list_backups_against(&node, &odd.endpoint(), "bk").success();
    assert_eq!(r["count"].as_str(), Some("1"), "{r:?}");
    assert_eq!(r["backups"]["0"]["id"].as_str(), Some("notes.txt"));
}

/// Provider values that would crash the agent, leak, or point elsewhere are refused with a
/// message naming the setting.
#[test]
fn store_settings_that_crash_leak_or_escape_are_refused() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    for (endpoint, bucket, want) in [
        ("file:///etc", "bk", "scheme"),
        (
            "http://user:hunter2@127.0.0.1:9",
            "bk",
            "user name or password",
        ),
        ("http://127.0.0.1:9", "bk/../other", "not a bucket name"),
    ] {
        let run = list_backups_against(&node, endpoint, bucket);
        assert_ne!(run.code(), 101, "no panic: {}", run.stderr());
        let msg = run.failure();
        assert!(msg.contains(want), "{endpoint} {bucket}: {msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
    }
    // The same through the relation, in Juju: action-fail, not a crash.
    let juju = Juju::new(tmp.path(), "etcd/0");
    juju.s3_relation(
        serde_json::json!({"bucket": "bk", "endpoint": "file:///etc",
            "access-key": "AK", "secret-key": "SK"}),
        None,
    );
    juju.params("list-backups", serde_json::json!({}));
    let msg = Agent::juju(&node, &juju, "list-backups")
        .run()
        .juju_failed(&juju);
    assert!(msg.contains("scheme"), "{msg}");
}

/// A deep verify cancelled by Juju (SIGTERM) or killed outright takes its throwaway etcd
/// with it; a leftover recorded drill is ended by the next run.
#[test]
fn a_cancelled_drill_leaves_no_etcd_running() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("d/", 10);
    let snaps = tmp.path().join("snaps");
    let r = Agent::snapshot(&node, snaps.to_str().unwrap())
        .run()
        .success();
    let archive = r["snapshot"]["path"].as_str().unwrap().to_string();
    let running = |base: &Path| {
        fs::read_dir("/proc").unwrap().flatten().any(|e| {
            fs::read(e.path().join("cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains(&*base.to_string_lossy()) && c.contains("drill-")
                })
                .unwrap_or(false)
        })
    };
    let gone_soon = |base: &Path| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while running(base) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    };
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let ctl = tempdir();
        let mut child = Agent::standalone(&node, &["verify", "--snapshot", &archive, "--deep"])
            .env(
                "ETCD_ACTIONS_PAUSE",
                format!("drill-started:{}", ctl.path().display()),
            )
            .spawn();
        wait_reached(ctl.path(), "drill-started", &mut child);
        assert!(running(tmp.path()), "the drill's etcd runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let _ = child.wait();
        assert!(
            gone_soon(tmp.path()),
            "{signal}: the throwaway etcd died with the agent"
        );
    }
    // The next run cleans what a killed one left in the state dir.
    let v = Agent::standalone(&node, &["verify", "--snapshot", &archive])
        .run()
        .success();
    assert_eq!(v["verify"]["drill"].as_str(), Some("not run"));
    let r = Agent::snapshot(&node, snaps.to_str().unwrap()).run();
    r.success();
    assert_eq!(
        files_in(&node.data_dir().join(".etcd-actions")),
        vec!["lock".to_string()]
    );
}

/// A file named like an archive, made of a flood of tiny gzip members carrying our length
/// field: listing it costs neither memory nor much time.
#[test]
fn a_flood_of_tiny_members_costs_no_memory() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    let snaps = tmp.path().join("snaps");
    fs::create_dir_all(&snaps).unwrap();
    let mut member = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255, 8, 0, b'E', b'A', 4, 0];
    member.extend_from_slice(&28u32.to_le_bytes());
    member.extend_from_slice(&[0u8; 8]);
    let mut f = fs::File::create(snaps.join("etcd-snapshot-2026-11-01-00.00.00.tar.gz")).unwrap();
    let block: Vec<u8> = member.iter().copied().cycle().take(28 << 16).collect();
    for _ in 0..(256 << 20) / block.len() {
        f.write_all(&block).unwrap();
    }
    drop(f);
    let started = Instant::now();
    let r = Agent::standalone(
        &node,
        &["list-backups", "--target", snaps.to_str().unwrap()],
    )
    .env("ETCD_ACTIONS_PEAK_RSS_FILE", tmp.path().join("rss"))
    .run()
    .success();
    assert_eq!(r["count"].as_str(), Some("1"));
    let rss = fs::read_to_string(tmp.path().join("rss")).unwrap();
    let kib: u64 = rss.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(kib < 64 * 1024, "peak RSS {kib} KiB");
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// Protobuf, by hand: a varint, and fields of the few etcd messages a snapshot asks for.
fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn field_varint(no: u64, v: u64, out: &mut Vec<u8>) {
    varint(no << 3, out);
    varint(v, out);
}

fn field_bytes(no: u64, v: &[u8], out: &mut Vec<u8>) {
    varint((no << 3) | 2, out);
    varint(v.len() as u64, out);
    out.extend_from_slice(v);
}

/// A gRPC frame around a message.
fn grpc(msg: &[u8]) -> bytes::Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    out.into()
}

/// An endpoint that answers Status and MemberList as a small etcd would (a 1 MiB db), then
/// announces a snapshot of `announced` bytes and streams 32 KiB of zeros every `pace`.
fn lying_etcd(announced: u64, pace: Duration) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(sock).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        tokio::spawn(async move {
                            let mut header = Vec::new();
                            field_varint(1, 0xc1c1, &mut header);
                            field_varint(2, 0x3e3e, &mut header);
                            field_varint(3, 7, &mut header);
                            let path = req.uri().path().to_string();
                            let response = http::Response::builder()
                                .status(200)
                                .header("content-type", "application/grpc")
                                .body(())
                                .unwrap();
                            let Ok(mut send) = respond.send_response(response, false) else {
                                return;
                            };
                            let mut msg = Vec::new();
                            field_bytes(1, &header, &mut msg);
                            if path.ends_with("/Status") {
                                field_bytes(2, b"3.5.99", &mut msg);
                                field_varint(3, 1 << 20, &mut msg);
                                field_varint(7, 42, &mut msg);
                                let _ = send.send_data(grpc(&msg), false);
                            } else if path.ends_with("/MemberList") {
                                let mut member = Vec::new();
                                field_varint(1, 0x3e3e, &mut member);
                                field_bytes(2, b"liar", &mut member);
                                field_bytes(2, &member, &mut msg);
                                let _ = send.send_data(grpc(&msg), false);
                            } else if path.ends_with("/Snapshot") {
                                for _ in 0..20_000 {
                                    let mut m = msg.clone();
                                    field_varint(2, announced, &mut m);
                                    field_bytes(3, &[0u8; 32 << 10], &mut m);
                                    send.reserve_capacity(m.len() + 5);
                                    if send.send_data(grpc(&m), false).is_err() {
                                        return;
                                    }
                                    tokio::task::yield_now().await;
                                    if !pace.is_zero() {
                                        tokio::time::sleep(pace).await;
                                    }
                                }
                            } else {
                                // AuthStatus, LeaseLeases: a response with just its header.
                                let _ = send.send_data(grpc(&msg), false);
                            }
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            let _ = send.send_trailers(trailers);
                        });
                    }
                });
            }
        });
    });
    port
}

/// An endpoint that announces a snapshot far larger than its status says its db is: refused
/// before anything is written, and no temp dir is left.
#[test]
fn an_endpoint_that_lies_about_the_snapshot_size_writes_nothing() {
    let tmp = tempdir();
    let port = lying_etcd(1 << 62, Duration::ZERO);
    let snaps = tmp.path().join("snaps");
    let mut agent = Agent::standalone(
        &Node::prepare(tmp.path(), "unused", &v35()),
        &["snapshot", "--target", snaps.to_str().unwrap()],
    )
    .env("ETCDCTL_ENDPOINTS", format!("http://127.0.0.1:{port}"));
    agent.command().env_remove("ETCD_ACTIONS_ETCD_CONFIG");
    let started = Instant::now();
    let run = agent.run();
    let msg = run.failure();
    assert!(msg.contains("announced"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(files_in(&snaps), Vec::<String>::new(), "nothing written");
}

/// A stream that keeps coming but never ends is cut at `--snapshot-timeout`, and the temp dir
/// it was written into goes with it.
#[test]
fn a_snapshot_stream_is_bounded_in_time() {
    let tmp = tempdir();
    // Announces the 1 MiB its status reports, then sends 32 KiB every 300 ms: not a stall.
    let port = lying_etcd(1 << 20, Duration::from_millis(300));
    let snaps = tmp.path().join("snaps");
    let mut agent = Agent::standalone(
        &Node::prepare(tmp.path(), "unused", &v35()),
        &[
            "snapshot",
            "--target",
            snaps.to_str().unwrap(),
            "--snapshot-timeout",
            "2",
        ],
    )
    .env("ETCDCTL_ENDPOINTS", format!("http://127.0.0.1:{port}"));
    agent.command().env_remove("ETCD_ACTIONS_ETCD_CONFIG");
    let started = Instant::now();
    let msg = agent.run().failure();
    assert!(msg.contains("did not finish within 2s"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(files_in(&snaps), Vec::<String>::new(), "no temp dir left");
}

/// A snapshot killed while it writes leaves its temp dir; the next action's recovery removes
/// it, whatever target that action uses.
#[test]
fn recovery_removes_a_killed_writers_temp_dir() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("k/", 50);
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    let ctl = tmp.path().join("ctl");
    fs::create_dir_all(&ctl).unwrap();
    let mut child = Agent::snapshot(&node, first.to_str().unwrap())
        .env(
            "ETCD_ACTIONS_PAUSE",
            format!("snapshot-streaming:{}", ctl.display()),
        )
        .spawn();
    wait_reached(&ctl, "snapshot-streaming", &mut child);
    let left: Vec<String> = files_in(&first)
        .into_iter()
        .filter(|n| n.starts_with(".etcd-actions-tmp-"))
        .collect();
    assert_eq!(left.len(), 1, "{:?}", files_in(&first));
    child.kill().unwrap();
    let _ = child.wait();
    Agent::snapshot(&node, second.to_str().unwrap())
        .run()
        .success();
    assert_eq!(
        files_in(&first),
        Vec::<String>::new(),
        "the killed run's temp dir is gone"
    );
    assert_eq!(
        files_in(&node.data_dir().join(".etcd-actions")),
        vec!["lock".to_string()]
    );
}

/// The same bounds hold on Azure and GCS: an Azure listing that never ends is cut, and a GCS
/// answer that redirects to another host is not followed.
#[test]
fn hostile_azure_and_gcs_stores_get_bounded_answers() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unitag", &v35());
    let dir = tempdir();
    let list = |extra: &[(&str, String)]| {
        let mut a = Agent::standalone(
            &node,
            &["list-backups", "--target", dir.path().to_str().unwrap()],
        );
        for (k, v) in extra {
            a = a.env(k, v);
        }
        a.run()
    };

    let endless = FakeStore::start(std::sync::Arc::new(|first: &str| {
        if first.contains("comp=list") {
            let xml = "<?xml version=\"1.0\" encoding=\"utf-8\"?><EnumerationResults \
                       ContainerName=\"bk\"><Prefix>etcd/</Prefix><Delimiter>/</Delimiter>\
                       <Blobs></Blobs><NextMarker>more</NextMarker></EnumerationResults>";
            http("200 OK", &[], xml.as_bytes())
        } else {
            http("404 Not Found", &[], b"")
        }
    }));
    let started = Instant::now();
    let run = list(&[
        (
            "ETCD_ACTIONS_AZURE_ENDPOINT",
            format!("{}/acct", endless.endpoint()),
        ),
        ("ETCD_ACTIONS_AZURE_ACCOUNT", "acct".into()),
        ("ETCD_ACTIONS_AZURE_CONTAINER", "bk".into()),
        ("AZURE_STORAGE_ACCOUNT_KEY", "c2VjcmV0LWtleQ==".into()),
    ]);
    let msg = run.failure();
    assert!(msg.contains("did not end after"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(100));
    assert!(!msg.contains("c2VjcmV0LWtleQ"), "the key leaked: {msg}");

    let (redirecting, elsewhere) = redirecting_elsewhere();
    let key = tmp.path().join("key.json");
    fs::write(
        &key,
        serde_json::json!({
            "type": "service_account", "gcs_base_url": redirecting.endpoint(),
            "disable_oauth": true, "client_email": "x@example.com",
            "private_key_id": "", "private_key": "",
        })
        .to_string(),
    )
    .unwrap();
    let msg = list(&[
        ("ETCD_ACTIONS_GCS_BUCKET", "bk".into()),
        ("GOOGLE_APPLICATION_CREDENTIALS", key.display().to_string()),
    ])
    .failure();
    assert!(!msg.contains("ELSEWHERE"), "{msg}");
    assert_eq!(
        elsewhere.served.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the other host was never asked"
    );
}

/// A store that answers every request with a redirect to another host (127.0.0.2), and that
/// host, which would answer with a body that must never be shown.
fn redirecting_elsewhere() -> (FakeStore, FakeStore) {
    let elsewhere = FakeStore::start(std::sync::Arc::new(|_: &str| {
        http("403 Forbidden", &[], b"ELSEWHERE-SAYS-SECRET")
    }));
    let target = format!("http://127.0.0.2:{}/x", elsewhere.port);
    let redirecting = FakeStore::start(std::sync::Arc::new(move |_: &str| {
        http(
            "307 Temporary Redirect",
            &[("Location", target.clone())],
            b"",
        )
    }));
    (redirecting, elsewhere)
}
