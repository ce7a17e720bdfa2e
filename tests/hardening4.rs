//! Hardening round 4 (issue 26): the change history, the follower and the files they write,
//! attacked as a hostile local user, a hostile store and an ordinary operator would. Each test
//! fails on the code before the fix, for the reason the issue names.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_actions::history::{self, Named};

use crate::pitr::{follow, follow_agent, no_leases, range, sigterm, txn, wait_recorded};
use crate::util::*;

/// follow started with its stderr in a file (a pipe nobody reads would block it).
pub fn follow_logged(agent: Agent, log: &Path) -> Child {
    let mut agent = agent;
    agent
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits until follow (logging to `log`) has made `rev` durable; fails with `what` and its log.
pub fn wait_logged(target: &Path, node: &Node, rev: i64, log: &Path, secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while state_of(target, node)["through_revision"].as_i64() < Some(rev) {
        assert!(
            Instant::now() < deadline,
            "{what}: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `restore --to-revision <rev> --target <target> --skip-backup`, standalone.
pub fn restore_to(node: &Node, rev: i64, target: &str) -> Agent {
    Agent::standalone(
        node,
        &[
            "restore",
            "--to-revision",
            &rev.to_string(),
            "--target",
            target,
            "--skip-backup",
        ],
    )
}

fn state_of(target: &Path, node: &Node) -> serde_json::Value {
    let state = target
        .join("changes")
        .join(format!("{:x}", node.cluster_id()))
        .join("follow.json");
    fs::read_to_string(state)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn peak_rss_kb(file: &Path) -> u64 {
    let text = fs::read_to_string(file).unwrap();
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Defect 1: follow never writes through a symlink or a directory planted under the target, and a
/// FIFO planted as `follow.json` does not hang `status`.
#[test]
fn nothing_planted_under_the_target_is_followed_or_waited_on() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4sym", &v35());
    let victim = tmp.path().join("shadow");
    fs::write(&victim, "root:secret-hash:19000::::::\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o640)).unwrap();
    let before = fs::read(&victim).unwrap();
    let untouched = || {
        assert_eq!(
            fs::read(&victim).unwrap(),
            before,
            "the victim is untouched"
        );
        assert_eq!(mode(&victim), 0o640);
    };

    // `changes` is a symlink to a directory holding a lock that points at the victim.
    let target = tmp.path().join("backups");
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::create_dir_all(&target).unwrap();
    std::os::unix::fs::symlink(&victim, elsewhere.join(".follow.lock")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, target.join("changes")).unwrap();
    let run = follow_agent(&node, &target).run();
    assert_ne!(run.code(), 0, "follow refuses a symlinked `changes`");
    untouched();

    // `changes` is a real directory of another user's with the lock a symlink to the victim.
    fs::remove_file(target.join("changes")).unwrap();
    fs::create_dir_all(target.join("changes")).unwrap();
    std::os::unix::fs::symlink(&victim, target.join("changes/.follow.lock")).unwrap();
    std::os::unix::fs::chown(target.join("changes"), Some(65534), Some(65534)).unwrap();
    let run = follow_agent(&node, &target).run();
    assert_ne!(
        run.code(),
        0,
        "follow refuses a `changes` of another user's"
    );
    assert!(
        run.stderr().contains("owned by uid 65534"),
        "{}",
        run.stderr()
    );
    untouched();

    // Root's own `changes` with the lock a symlink (planted before): refused, not followed.
    fs::remove_dir_all(target.join("changes")).unwrap();
    fs::create_dir_all(target.join("changes")).unwrap();
    std::os::unix::fs::symlink(&victim, target.join("changes/.follow.lock")).unwrap();
    let run = follow_agent(&node, &target).run();
    assert_ne!(run.code(), 0);
    untouched();

    // A FIFO as follow.json and as the lock: status answers at once.
    fs::remove_dir_all(target.join("changes")).unwrap();
    let cluster = format!("{:x}", node.cluster_id());
    fs::create_dir_all(target.join("changes").join(&cluster)).unwrap();
    for fifo in [
        target.join("changes").join(&cluster).join("follow.json"),
        target.join("changes/.follow.lock"),
    ] {
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }
    let mut child =
        Agent::standalone(&node, &["status", "--target", target.to_str().unwrap()]).spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("status hangs on a FIFO planted as follow.json");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Defect 2: A watch message over 4 MiB (a catch-up of eight 1 MB values) is recorded, not a
/// reconnect loop.
#[test]
fn watch_messages_over_4_mib_are_recorded() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4big", &v3530());
    let target = tmp.path().join("backups");
    node.put("a", "1");
    let f = follow(&node, &target);
    wait_recorded(&target, &node, node.revision());
    sigterm(f);
    let value = vec![b'v'; 1_000_000];
    for i in 0..8 {
        let out = run_with_stdin(node.ctl().args(["put", &format!("big/{i}")]), &value);
        assert!(out.status.success(), "{out:?}");
    }
    let end = node.revision();
    let log = tmp.path().join("follow.log");
    let f = follow_logged(follow_agent(&node, &target), &log);
    wait_logged(
        &target,
        &node,
        end,
        &log,
        40,
        "follow never recorded the 8 MB catch-up",
    );
    sigterm(f);
    let text = fs::read_to_string(&log).unwrap();
    assert!(!text.contains("not reachable"), "{text}");
}

/// Defect 3: A segment that decompresses to hundreds of MB is refused with bounded memory.
#[test]
fn a_segment_decompression_bomb_costs_little_memory() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4bomb", &v35());
    let target = tmp.path().join("backups");
    // An archive, so that verify goes on to the history.
    Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let cluster = "abc123";
    let dir = target.join("changes").join(cluster);
    fs::create_dir_all(&dir).unwrap();
    let named = Named::new(cluster, 5, 9, (1000, 2000), false, false);
    let head = format!(
        "{{\"format\":\"{}\",\"cluster_id\":\"{cluster}\",\"first\":5,\"last\":9,\
         \"prev_sha256\":null,\"gap\":false,\"revisions\":1,\"events\":1}}\n",
        history::FORMAT
    );
    // 512 MiB of spaces after the head, gzip'd by the system's gzip (a few MB).
    let script = format!(
        "{{ printf '%s' '{head}'; head -c 536870912 /dev/zero | tr '\\0' ' '; }} | gzip -1 > '{}'",
        dir.join(&named.name).display()
    );
    let st = Command::new("sh").arg("-c").arg(&script).status().unwrap();
    assert!(st.success());
    assert!(fs::metadata(dir.join(&named.name)).unwrap().len() < 8 << 20);
    let rss = tmp.path().join("rss");
    let run = Agent::standalone(&node, &["verify", "--target", target.to_str().unwrap()])
        .env("ETCD_ACTIONS_PEAK_RSS_FILE", &rss)
        .run();
    assert_ne!(run.code(), 0);
    assert!(
        run.failure().contains("damaged") && run.failure().contains("longer than"),
        "{}",
        run.failure()
    );
    let kb = peak_rss_kb(&rss);
    eprintln!("verify's peak RSS on a 512 MiB bomb: {kb} kB");
    assert!(kb < 300 * 1024, "verify's peak RSS was {kb} kB");
}

/// Defect 9: After a key rotation follow (holding only the new identity) resumes its history.
#[test]
fn follow_resumes_after_a_key_rotation() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4rot", &v35());
    let target = tmp.path().join("backups");
    let keys = |name: &str| keygen(tmp.path(), name);
    let (old_id, old_pub) = keys("old.txt");
    let (new_id, new_pub) = keys("new.txt");
    let with = |id: &Path, public: &str| {
        follow_agent(&node, &target)
            .env("ETCD_ACTIONS_ENCRYPT_TO", public)
            .env("ETCD_ACTIONS_IDENTITY_FILE", id)
    };
    node.put("a", "1");
    let f = with(&old_id, &old_pub).spawn();
    node.put("b", "1");
    wait_recorded(&target, &node, node.revision());
    sigterm(f);
    node.put("c", "1");
    let end = node.revision();
    let log = tmp.path().join("follow.log");
    let f = follow_logged(with(&new_id, &new_pub), &log);
    wait_logged(
        &target,
        &node,
        end,
        &log,
        30,
        "follow with the rotated key did not resume",
    );
    let out = sigterm(f);
    assert!(out.status.success());
}

/// A new age identity file in `dir` and its public key, made by the stock `age-keygen`.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let p = dir.join(name);
    let out = Command::new(age_tool("age-keygen"))
        .arg("-o")
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let public = fs::read_to_string(&p)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .unwrap()
        .to_string();
    (p, public)
}

pub fn age_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed (scripts/install-deps installs age)");
}

/// Defect 10: Creating and deleting fresh keys (Events, Leases) replays deterministically.
#[test]
fn put_delete_pairs_of_fresh_keys_replay() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4pd", &v3530());
    let target = tmp.path().join("backups");
    node.put("base", "1");
    let f = follow(&node, &target);
    wait_recorded(&target, &node, node.revision());
    for i in 0..40 {
        node.put(&format!("ev/{i}"), "x");
        node.ctl_ok(&["del", &format!("ev/{i}")]);
        if i % 10 == 0 {
            // A delete-only txn of two keys, then a put of one of them.
            node.put(&format!("p/{i}"), "1");
            node.put(&format!("q/{i}"), "1");
            txn(&node, &format!("del p/{i}\ndel q/{i}"));
            node.put(&format!("p/{i}"), "2");
        }
    }
    let end = node.revision();
    let want = range(&node, end);
    wait_recorded(&target, &node, end);
    sigterm(f);
    for _ in 0..2 {
        let r = restore_to(&node, end, target.to_str().unwrap())
            .run()
            .success();
        assert_eq!(
            r["restore"]["point-revision"].as_str(),
            Some(&*end.to_string())
        );
        assert_eq!(no_leases(range(&node, 0)), no_leases(want.clone()));
    }
}

/// Defect 12: A second restore of an older point lands above every revision clients have seen.
#[test]
fn the_revision_bump_never_goes_backwards() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4bump", &v3530());
    let target = tmp.path().join("snaps");
    let t = target.to_str().unwrap();
    node.put("a", "1");
    let snap = Agent::snapshot(&node, t).run().success();
    let archive = snap["snapshot"]["path"].as_str().unwrap().to_string();
    node.fill("more/", 20);
    Agent::restore(&node, &archive, &["--skip-backup"])
        .run()
        .success();
    node.fill("after/", 20);
    let served = node.revision();
    assert!(served > 1_000_000_000, "{served}");
    Agent::restore(&node, &archive, &["--skip-backup"])
        .run()
        .success();
    let now = node.revision();
    assert!(
        now > served,
        "the second restore's revision {now} is below the {served} clients have seen"
    );
}

/// Defect 13: The metrics textfile is never chmod'ed through a name another user can swap.
#[test]
fn the_textfile_is_never_chmodded_by_name() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4prom", &v35());
    let target = tmp.path().join("backups");
    let metrics = tmp.path().join("textfiles");
    fs::create_dir_all(&metrics).unwrap();
    let victim = tmp.path().join("victim");
    fs::write(&victim, "secret").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let log = tmp.path().join("follow.log");
    let f = follow_logged(
        follow_agent(&node, &target).env("ETCD_ACTIONS_METRICS_DIR", &metrics),
        &log,
    );
    let prom = metrics.join("etcd_backup_follow.prom");
    // Swap the textfile for a symlink to the victim, over and over, while follow rewrites it.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let tmp_link = metrics.join("swap");
        let _ = fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(&victim, &tmp_link).unwrap();
        let _ = fs::rename(&tmp_link, &prom);
        node.put("tick", "x");
    }
    sigterm(f);
    assert_eq!(
        mode(&victim),
        0o600,
        "root chmod'ed a file through a symlink"
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "secret");
    // What follow writes is a readable regular file.
    let st = fs::symlink_metadata(&prom).unwrap();
    if st.file_type().is_file() {
        assert_eq!(mode(&prom), 0o644);
    }
}

/// Defect 14: Encryption configured without a usable recipient never gives plaintext backups.
#[test]
fn encryption_without_a_usable_recipient_refuses_plaintext() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4enc", &v35());
    let target = tmp.path().join("snaps");
    let run = Agent::snapshot(&node, target.to_str().unwrap())
        .env("ETCD_ACTIONS_ENCRYPT_TO", ",")
        .run();
    assert_ne!(run.code(), 0);
    assert!(run.failure().contains("no recipient"), "{}", run.failure());
    assert!(
        files_in(&target).iter().all(|f| !f.contains(".tar.gz")),
        "{:?}",
        files_in(&target)
    );

    // Juju: a secret with only an identity, or only comments as recipients.
    let juju = Juju::new(tmp.path(), "etcd/0");
    let uri = "secret:cs8d8k3mp25c7r5sd7eh";
    let id = fs::read_to_string(keygen(tmp.path(), "id.txt").0).unwrap();
    let units = tmp.path().join("units");
    fs::create_dir_all(&units).unwrap();
    let hook = juju.config_hook(tmp.path(), &units);
    for secret in [
        serde_json::json!({"identity": id}),
        serde_json::json!({"recipients": "", "identity": id}),
        serde_json::json!({"recipients": "# age1notakeyjustacomment\n"}),
    ] {
        fs::write(
            juju.state.join("secrets.json"),
            serde_json::json!({ uri: secret }).to_string(),
        )
        .unwrap();
        let (code, err) = hook(serde_json::json!({
            "backup-encryption-secret": uri, "backup-schedule": ""
        }));
        assert_eq!(code, Some(0), "{err}");
        let statuses = juju.statuses();
        assert!(
            statuses.contains("blocked") && statuses.contains("recipient"),
            "{secret}: {statuses}"
        );
        juju.reset();
        fs::write(
            juju.state.join("config.json"),
            serde_json::json!({"backup-encryption-secret": uri}).to_string(),
        )
        .unwrap();
        juju.params(
            "snapshot",
            serde_json::json!({"target": target.to_str().unwrap()}),
        );
        let msg = Agent::juju(&node, &juju, "snapshot")
            .run()
            .juju_failed(&juju);
        assert!(msg.contains("recipient"), "{msg}");
        assert!(files_in(&target).iter().all(|f| !f.contains(".tar.gz")));
    }
}

/// 15 and 16. The follow service gets the rotated recipients at `secret-changed`, and an s3
/// relation hook keeps a target with a space.
#[test]
fn the_follow_service_follows_the_secret_and_keeps_its_target() {
    let tmp = tempdir();
    let juju = Juju::new(tmp.path(), "etcd/0");
    let units = tmp.path().join("charm-units");
    let hook = juju.config_hook(tmp.path(), &units);
    let uri = "secret:cs8d8k3mp25c7r5sd7ei";
    let (old, new) = (
        keygen(tmp.path(), "old.txt").1,
        keygen(tmp.path(), "new.txt").1,
    );
    let set_secret = |r: &str| {
        fs::write(
            juju.state.join("secrets.json"),
            serde_json::json!({ uri: {"recipients": r} }).to_string(),
        )
        .unwrap();
    };
    set_secret(&old);
    let config = serde_json::json!({
        "backup-schedule": "", "continuous-backup": true,
        "backup-target": "/var/backups/etcd history",
        "backup-encryption-secret": uri,
    });
    let (code, err) = hook(config.clone());
    assert_eq!(code, Some(0), "{err}");
    let env = tmp.path().join("follow.env");
    assert!(fs::read_to_string(&env).unwrap().contains(&old));

    // The secret rotates: secret-changed refreshes the env file.
    set_secret(&new);
    let run_hook = |name: &str| {
        let link = tmp.path().join("charm/hooks").join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(
                fs::read_link(tmp.path().join("charm/hooks/config-changed")).unwrap(),
                &link,
            )
            .unwrap();
        }
        let out = Command::new(&link)
            .env(
                "PATH",
                format!("{}:{}", juju.bin.display(), std::env::var("PATH").unwrap()),
            )
            .env("JUJU_UNIT_NAME", "etcd/0")
            .env("JUJU_RELATION_ID", "s3-credentials:7")
            .env("FAKE_JUJU_STATE", &juju.state)
            .env("ETCD_ACTIONS_SYSTEMD_DIR", &units)
            .env("ETCD_ACTIONS_ENV_FILE", tmp.path().join("charm.env"))
            .env_remove("JUJU_ACTION_NAME")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    run_hook("secret-changed");
    let text = fs::read_to_string(&env).unwrap();
    assert!(text.contains(&new) && !text.contains(&old), "{text}");

    // An s3 relation appears: the service keeps its target with the space.
    let s3 = S3::start(tmp.path(), &["b"]);
    juju.s3_relation(s3.bag("b", "etcd"), None);
    run_hook("s3-credentials-relation-changed");
    let service = fs::read_to_string(units.join("etcd-actions-follow.service")).unwrap();
    assert!(
        service.contains("\"follow\" \"--target\" \"/var/backups/etcd history\""),
        "{service}"
    );
    assert!(fs::read_to_string(&env)
        .unwrap()
        .contains("ETCD_ACTIONS_S3_BUCKET"));
}

/// Also: hostile to-time values are refused plainly (no panic), and a time between the
/// oldest full snapshot and the first recorded change is answered by the snapshot.
#[test]
fn to_time_is_parsed_strictly_and_a_snapshot_answers_before_the_first_change() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4time", &v3530());
    let target = tmp.path().join("backups");
    let t = target.to_str().unwrap();
    for bad in [
        "2026-12-01T10:00:0é",
        "2026-12-01T10:00:00+99:99",
        "2026-13-01T10:00:00Z",
    ] {
        let run = Agent::standalone(
            &node,
            &["restore", "--to-time", bad, "--target", t, "--skip-backup"],
        )
        .run();
        assert_eq!(run.code(), 2, "{bad}: {}", run.stderr());
        assert!(!run.stderr().contains("panicked"), "{}", run.stderr());
        assert!(run.failure().contains("RFC 3339"), "{}", run.failure());
    }
    node.put("k", "before");
    let f = follow(&node, &target);
    wait_recorded(&target, &node, node.revision());
    // Well after the full snapshot, before any change.
    std::thread::sleep(Duration::from_millis(2500));
    let between = now_rfc3339();
    std::thread::sleep(Duration::from_millis(1500));
    node.put("k", "after");
    wait_recorded(&target, &node, node.revision());
    sigterm(f);
    let r = Agent::standalone(
        &node,
        &[
            "restore",
            "--to-time",
            &between,
            "--target",
            t,
            "--skip-backup",
        ],
    )
    .run()
    .success();
    assert!(r["restore"]["point-revision"].as_str().is_some(), "{r:?}");
    assert_eq!(
        node.ctl_ok(&["get", "k", "--print-value-only"]).trim(),
        "before"
    );
}

fn now_rfc3339() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    etcd_actions::replay::show_ms(ms)
}

/// Defect 7: A time after a gap is answered by the full snapshot follow took after it.
#[test]
fn to_time_after_a_gap_takes_the_snapshot_after_it() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4gap", &v3530());
    let target = tmp.path().join("backups");
    let t = target.to_str().unwrap();
    node.put("a", "1");
    let f = follow(&node, &target);
    node.put("before-gap", "1");
    wait_recorded(&target, &node, node.revision());
    sigterm(f);
    node.fill("lost/", 10);
    node.put("lost-last", "x");
    let compacted = node.revision();
    node.ctl_ok(&["compact", &compacted.to_string()]);
    let f = follow(&node, &target);
    wait_recorded(&target, &node, compacted);
    // follow confirms the history complete until a time after its full snapshot.
    std::thread::sleep(Duration::from_millis(3000));
    let when = now_rfc3339();
    std::thread::sleep(Duration::from_millis(2000));
    sigterm(f);
    let r = Agent::standalone(
        &node,
        &[
            "restore",
            "--to-time",
            &when,
            "--target",
            t,
            "--skip-backup",
        ],
    )
    .run()
    .success();
    assert!(
        r["restore"]["point-revision"]
            .as_str()
            .is_some_and(|p| p.parse::<i64>().unwrap() >= compacted),
        "{r:?}"
    );
    assert_eq!(
        node.ctl_ok(&["get", "lost-last", "--print-value-only"])
            .trim(),
        "x",
        "the state after the gap, not before it"
    );
}

/// The store keys of the change segments under `bucket`.
fn segment_keys(s3: &S3, bucket: &str) -> Vec<String> {
    s3.objects(bucket, "")
        .into_iter()
        .filter(|k| k.contains("etcd-changes-"))
        .collect()
}

/// Defect 4: A forged store object beside this unit's own segments, and a plaintext store segment
/// while recipients are set, are refused by restore and reported by verify.
#[test]
fn forged_store_segments_never_override_the_local_history() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &["hist"]);
    let node = Node::single(tmp.path(), "h4forge", &v3530());
    let target = tmp.path().join("backups");
    let t = target.to_str().unwrap();
    let with_store = |a: Agent| s3.env(a, "hist", "etcd");
    node.put("a", "1");
    let f = with_store(follow_agent(&node, &target)).spawn();
    wait_recorded(&target, &node, node.revision());
    for i in 0..10 {
        node.put(&format!("good/{i}"), "v");
    }
    let end = node.revision();
    wait_recorded(&target, &node, end);
    sigterm(f);
    let want = range(&node, end);
    let keys = segment_keys(&s3, "hist");
    assert!(!keys.is_empty(), "follow uploaded its segments");
    // The attacker's object: the same revisions, other names, other changes.
    let newest = keys
        .iter()
        .map(Path::new)
        .max_by_key(|k| {
            Named::parse(k.file_name().unwrap().to_str().unwrap())
                .unwrap()
                .last
        })
        .unwrap();
    let named = Named::parse(newest.file_name().unwrap().to_str().unwrap()).unwrap();
    let forged_name = Named::new(
        &named.cluster_id,
        named.first,
        named.last,
        (named.first_ms + 1, named.last_ms + 1),
        false,
        false,
    );
    let revs: Vec<history::Rev> = (named.first..=named.last)
        .map(|r| history::Rev {
            r,
            t: named.first_ms,
            ev: vec![history::Ev::of(&etcd_actions::etcd::Change {
                delete: false,
                key: format!("evil/{r}").into_bytes(),
                value: b"x".to_vec(),
                create_revision: r,
                mod_revision: r,
                version: 1,
                lease: 0,
            })],
            leases: vec![],
        })
        .collect();
    let head = history::Head {
        format: history::FORMAT.into(),
        cluster_id: named.cluster_id.clone(),
        first: named.first,
        last: named.last,
        prev_sha256: None,
        base_sha256: None,
        bases: vec![],
        gap: false,
        revisions: revs.len() as u64,
        events: revs.len() as u64,
    };
    let bytes = history::encode(&head, &revs, &etcd_actions::crypt::Keys::default()).unwrap();
    let forged = s3
        .dir
        .join("hist")
        .join(newest.parent().unwrap())
        .join(&forged_name.name);
    fs::write(&forged, &bytes).unwrap();

    let restore = |extra: &[(&str, &str)]| {
        let mut a = with_store(restore_to(&node, end, t));
        for (k, v) in extra {
            a = a.env(k, v);
        }
        a.run()
    };
    let run = restore(&[]);
    assert_ne!(run.code(), 0, "a history with a forged object is refused");
    assert!(run.failure().contains("disagree"), "{}", run.failure());
    assert!(node
        .try_ctl(&["get", "evil/", "--prefix", "--keys-only"])
        .unwrap()
        .trim()
        .is_empty());
    let v = with_store(Agent::standalone(&node, &["verify", "--target", t])).run();
    assert_ne!(v.code(), 0);
    assert!(v.failure().contains("disagree"), "{}", v.failure());

    // Without the forgery it restores from the local segments.
    fs::remove_file(&forged).unwrap();
    restore(&[]).success();
    assert_eq!(no_leases(range(&node, 0)), no_leases(want));

    // A unit with no local history and recipients set refuses the store's plaintext segments.
    fs::rename(target.join("changes"), tmp.path().join("changes-aside")).unwrap();
    let public = keygen(tmp.path(), "k.txt").1;
    let run = restore(&[("ETCD_ACTIONS_ENCRYPT_TO", &public)]);
    assert_ne!(run.code(), 0);
    assert!(run.failure().contains("not encrypted"), "{}", run.failure());
}

/// Defect 5: Three units of one cluster all run follow into one store folder; a new unit restores
/// to a point from the store alone.
#[test]
fn three_units_following_one_cluster_restore_from_the_store() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &["hist"]);
    let nodes = cluster(tmp.path(), "h4three", &v3530());
    nodes[0].put("a", "1");
    // One full snapshot in the store first: three units taking theirs in the same second race
    // for one name on a store that does not enforce write-once (s3s-fs; issue 27).
    s3.env(
        Agent::snapshot(&nodes[0], tmp.path().join("backups-0").to_str().unwrap()),
        "hist",
        "etcd",
    )
    .env("JUJU_UNIT_NAME", "etcd/0")
    .run()
    .success();
    let follows: Vec<Child> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let target = tmp.path().join(format!("backups-{i}"));
            let log = tmp.path().join(format!("follow-{i}.log"));
            follow_logged(
                s3.env(follow_agent(n, &target), "hist", "etcd")
                    .env("JUJU_UNIT_NAME", format!("etcd/{i}")),
                &log,
            )
        })
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        wait_recorded(&tmp.path().join(format!("backups-{i}")), n, n.revision());
    }
    for i in 0..30 {
        nodes[i % 3].put(&format!("k/{i}"), &format!("v{i}"));
    }
    txn(&nodes[0], "put t1 one\nput t2 two\ndel k/0");
    let end = nodes[0].revision();
    let want = range(&nodes[0], end);
    for (i, n) in nodes.iter().enumerate() {
        wait_recorded(&tmp.path().join(format!("backups-{i}")), n, end);
    }
    // Give the uploads a moment, then stop every follow (each uploads before it exits).
    for f in follows {
        let out = sigterm(f);
        assert!(out.status.success());
    }
    // A new unit: nothing local, the store only.
    let fresh = Node::single(tmp.path(), "h4new", &v3530());
    let r = s3
        .env(
            restore_to(
                &fresh,
                end,
                tmp.path().join("fresh-backups").to_str().unwrap(),
            ),
            "hist",
            "etcd",
        )
        .env("JUJU_UNIT_NAME", "etcd/7")
        .run();
    assert_eq!(
        r.code(),
        0,
        "{}\nin the store: {:#?}",
        r.stderr(),
        s3.objects("hist", "")
    );
    let r = r.success();
    assert_eq!(
        r["restore"]["point-revision"].as_str(),
        Some(&*end.to_string())
    );
    assert_eq!(no_leases(range(&fresh, 0)), no_leases(want));
}

/// Defect 6: A member cut off from the quorum never says the history is complete through now.
#[test]
fn a_member_cut_off_from_the_quorum_stops_the_history_end() {
    let tmp = tempdir();
    let nodes = cluster(tmp.path(), "h4part", &v3530());
    let target = tmp.path().join("backups");
    nodes[0].put("a", "1");
    let log = tmp.path().join("follow.log");
    let f = follow_logged(follow_agent(&nodes[0], &target), &log);
    wait_recorded(&target, &nodes[0], nodes[0].revision());
    std::thread::sleep(Duration::from_millis(2500));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let before = state_of(&target, &nodes[0])["through_ms"].as_u64().unwrap();
    assert!(
        before + 5000 > now_ms(),
        "the end advances while the quorum is there"
    );
    let stop = |sig| {
        for n in &nodes[1..] {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(n.pid().unwrap()), sig).unwrap();
        }
    };
    stop(nix::sys::signal::Signal::SIGSTOP);
    let cut = now_ms();
    std::thread::sleep(Duration::from_millis(6000));
    let during = state_of(&target, &nodes[0])["through_ms"].as_u64().unwrap();
    stop(nix::sys::signal::Signal::SIGCONT);
    assert!(
        during <= cut + 1500,
        "follow claimed the history complete {} ms after the quorum was lost: {}",
        during.saturating_sub(cut),
        fs::read_to_string(&log).unwrap_or_default()
    );
    // Back in the quorum: it advances again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while state_of(&target, &nodes[0])["through_ms"].as_u64().unwrap() <= cut + 6000 {
        assert!(Instant::now() < deadline, "the end never advanced again");
        std::thread::sleep(Duration::from_millis(200));
    }
    sigterm(f);
}

/// Defect 8: Another application's history restores with `from-app` (a clone or migration).
#[test]
fn another_applications_history_restores_with_from_app() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &["hist"]);
    let source = Node::single(tmp.path(), "h4src", &v3530());
    let target = tmp.path().join("backups");
    source.put("a", "1");
    let f = s3
        .env(follow_agent(&source, &target), "hist", "models")
        .env("JUJU_UNIT_NAME", "etcd/0")
        .spawn();
    wait_recorded(&target, &source, source.revision());
    for i in 0..20 {
        source.put(&format!("app/{i}"), "v");
    }
    let end = source.revision();
    let want = range(&source, end);
    wait_recorded(&target, &source, end);
    sigterm(f);
    let clone = Node::single(tmp.path(), "h4dst", &v3530());
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            "--target",
            "/nonexistent-h4-target",
            "--skip-backup",
        ];
        let e = end.to_string();
        args.extend(["--to-revision", &e]);
        args.extend_from_slice(extra);
        s3.env(Agent::standalone(&clone, &args), "hist", "models")
            .env("JUJU_UNIT_NAME", "new-etcd/0")
            .run()
    };
    let run = restore(&[]);
    assert_ne!(run.code(), 0, "not in new-etcd's own folder");
    let r = restore(&["--from-app", "etcd"]).success();
    assert_eq!(
        r["restore"]["point-revision"].as_str(),
        Some(&*end.to_string())
    );
    assert_eq!(no_leases(range(&clone, 0)), no_leases(want));
}

/// Defect 11: etcd rolled back under the same cluster id while follow runs: the history starts anew
/// and a restore never splices the two timelines.
#[test]
fn a_rollback_under_the_same_cluster_id_is_never_spliced() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "h4roll", &v3530());
    let target = tmp.path().join("backups");
    node.put("a", "1");
    let log = tmp.path().join("follow.log");
    let f = follow_logged(follow_agent(&node, &target), &log);
    wait_recorded(&target, &node, node.revision());
    let early = tmp.path().join("early.db");
    node.ctl_ok(&["snapshot", "save", early.to_str().unwrap()]);
    for i in 1..=30 {
        node.put(&format!("x{i}"), "old");
    }
    let old_end = node.revision();
    wait_recorded(&target, &node, old_end);
    let cluster = node.cluster_id();

    // The standard rollback: etcdutl snapshot restore with the same name, token and peers.
    node.stop();
    fs::rename(node.data_dir(), tmp.path().join("data-before")).unwrap();
    let out = Command::new(node.flavor.etcdutl.as_ref().unwrap())
        .args(["snapshot", "restore", early.to_str().unwrap()])
        .arg(format!("--data-dir={}", node.data_dir().display()))
        .arg(format!("--name={}", node.name))
        .arg(format!(
            "--initial-cluster={}={}",
            node.name,
            node.peer_url()
        ))
        .arg(format!("--initial-cluster-token=tok-{}", node.name))
        .arg(format!("--initial-advertise-peer-urls={}", node.peer_url()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    node.start();
    node.wait_healthy();
    assert_eq!(node.cluster_id(), cluster, "the same cluster id");
    assert!(node.revision() < old_end);
    for i in 1..=40 {
        node.put(&format!("y{i}"), "new");
    }
    let new_end = node.revision();
    assert!(new_end > old_end);
    let point = old_end - 5;
    let want = range(&node, point);
    wait_logged(
        &target,
        &node,
        new_end,
        &log,
        60,
        "follow did not record the new timeline",
    );
    sigterm(f);
    assert!(
        fs::read_to_string(&log).unwrap().contains("rolled back"),
        "{}",
        fs::read_to_string(&log).unwrap()
    );
    let r = restore_to(&node, point, target.to_str().unwrap())
        .run()
        .success();
    assert_eq!(
        r["restore"]["point-revision"].as_str(),
        Some(&*point.to_string())
    );
    let got = range(&node, 0);
    assert!(
        !got.keys().any(|k| k.starts_with('x')),
        "keys of the abandoned timeline: {:?}",
        got.keys().collect::<Vec<_>>()
    );
    assert_eq!(no_leases(got), no_leases(want));
}
