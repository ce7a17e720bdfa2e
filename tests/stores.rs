//! The store suite on every S3 implementation we can run: s3s-fs, moto's S3 server, and a
//! strict front of our own that behaves like the old stores operators run (refuses checksum
//! headers, ignores `If-None-Match`, changes a byte on the way, has no multi-object delete).
//! What the agent reports as uploaded, it has confirmed itself.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;

use crate::hardening4::{follow_logged, keygen, restore_to, wait_logged};
use crate::pitr::{follow_agent, no_leases, range, sigterm};
use crate::util::*;

const BUCKET: &str = "etcd-backups";
const FOLDER: &str = "suite/etcd";

fn name_of(r: &serde_yaml::Value) -> String {
    PathBuf::from(r["snapshot"]["path"].as_str().unwrap())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The archives directly in the suite's folder of `store`.
fn in_folder(store: &dyn TestStore) -> Vec<String> {
    store
        .archives(BUCKET, FOLDER)
        .into_iter()
        .filter(|k| {
            k.strip_prefix(&format!("{FOLDER}/"))
                .is_some_and(|n| !n.contains('/'))
        })
        .collect()
}

/// A snapshot uploaded to `store`: the results say the real size and how the object was
/// confirmed, and the object is the archive, byte for byte, with its record beside it.
fn snapshot_uploads(store: &dyn TestStore, agent: Agent) -> serde_yaml::Value {
    let run = store.env(agent, BUCKET, "suite").run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let r = run.success();
    let name = name_of(&r);
    let key = format!("{FOLDER}/{name}");
    assert_eq!(
        r["upload"]["url"].as_str(),
        Some(&*format!("{}://{BUCKET}/{key}", store.scheme()))
    );
    assert_eq!(r["upload"]["size"], r["snapshot"]["bytes"], "{r:?}");
    let how = r["upload"]["confirmed"].as_str().unwrap_or_default();
    assert!(how.contains("etag") || how.contains("read back"), "{r:?}");
    let local = fs::read(r["snapshot"]["path"].as_str().unwrap()).unwrap();
    assert_eq!(
        store.get(BUCKET, &key).as_deref(),
        Some(&local[..]),
        "the object is not the archive"
    );
    let record = store
        .get(BUCKET, &format!("{key}.manifest.yaml"))
        .unwrap_or_else(|| panic!("no record: {:?}", store.objects(BUCKET, "")));
    let record = String::from_utf8(record).unwrap();
    assert!(
        record.contains(r["snapshot"]["sha256"].as_str().unwrap()),
        "{record}"
    );
    r
}

/// The whole store suite on one store: upload, encryption, list, restore by id from the store
/// alone, follow's segments and a restore to a revision from the store alone, and prune.
fn store_suite(store: &dyn TestStore, tmp: &Path, tag: &str) {
    let node = Node::single(tmp, &format!("{tag}src"), &v3530());
    node.fill("k/", 40);
    let target = tmp.join("backups");
    let t = target.to_str().unwrap();
    let metrics = tmp.join("metrics");
    let first = snapshot_uploads(
        store,
        Agent::snapshot(&node, t).env("ETCD_ACTIONS_METRICS_DIR", &metrics),
    );
    let prom = fs::read_to_string(metrics.join("etcd_backup.prom")).unwrap();
    let label = format!("operation=\"upload\",location=\"{}\"", store.location());
    assert!(prom.contains(&label), "{label} not in:\n{prom}");
    node.fill("more/", 20);

    // Encrypted, uploaded, restored by id on a new unit from the store alone.
    let (identity, public) = keygen(tmp, "key.txt");
    let enc = snapshot_uploads(
        store,
        Agent::snapshot(&node, t).env("ETCD_ACTIONS_ENCRYPT_TO", &public),
    );
    let enc_name = name_of(&enc);
    assert!(
        store
            .get(BUCKET, &format!("{FOLDER}/{enc_name}"))
            .is_some_and(|b| b.starts_with(b"age-encryption.org/v1")),
        "the object is not age-encrypted"
    );
    let list = store
        .env(
            Agent::standalone(&node, &["list-backups", "--target", t]),
            BUCKET,
            "suite",
        )
        .run()
        .success();
    let listed = format!("{list:?}");
    assert!(
        listed.contains(&enc_name) && listed.contains(&name_of(&first)),
        "{listed}"
    );
    assert!(listed.contains("both"), "{listed}");
    let fresh = Node::single(tmp, &format!("{tag}fresh"), &v3530());
    let fresh_target = tmp.join("fresh-backups");
    // A standalone run on the suite's folder, with the identity that opens the archive.
    let keyed = |node: &Node, args: &[&str]| {
        store
            .env(Agent::standalone(node, args), BUCKET, "suite")
            .env("ETCD_ACTIONS_IDENTITY_FILE", &identity)
            .run()
    };
    let id = format!("etcd/{enc_name}");
    let restored = keyed(
        &fresh,
        &[
            "restore",
            "--backup-id",
            &id,
            "--target",
            fresh_target.to_str().unwrap(),
            "--skip-backup",
        ],
    );
    assert_eq!(restored.code(), 0, "{}", restored.stderr());
    assert_eq!(restored.success()["restore"]["origin"], "store");
    let verified = keyed(&node, &["verify", "--backup-id", &id, "--target", t]);
    assert_eq!(verified.code(), 0, "{}", verified.stderr());
    assert_eq!(fresh.dump(), node.dump());
    drop(fresh);

    // follow's segments reach the store; a new unit restores to a revision from it alone.
    let log = tmp.join("follow.log");
    let f: Child = follow_logged(
        store.env(follow_agent(&node, &target), BUCKET, "suite"),
        &log,
    );
    for i in 0..30 {
        node.put(&format!("f/{i}"), &format!("v{i}"));
    }
    let end = node.revision();
    let want = range(&node, end);
    wait_logged(
        &target,
        &node,
        end,
        &log,
        40,
        "follow did not record the writes",
    );
    let out = sigterm(f);
    assert!(
        out.status.success(),
        "{}",
        fs::read_to_string(&log).unwrap()
    );
    let segments = store.objects(BUCKET, "suite/etcd/changes/");
    assert!(!segments.is_empty(), "no segment reached the store");
    let new = Node::single(tmp, &format!("{tag}new"), &v3530());
    let r = store
        .env(
            restore_to(&new, end, tmp.join("new-backups").to_str().unwrap()),
            BUCKET,
            "suite",
        )
        .env("ETCD_ACTIONS_IDENTITY_FILE", &identity)
        .run();
    assert_eq!(
        r.code(),
        0,
        "{}\n{}",
        r.stderr(),
        fs::read_to_string(&log).unwrap()
    );
    assert_eq!(no_leases(range(&new, 0)), no_leases(want));
    drop(new);

    // prune, for real: one archive is left, here and in the store.
    let before = in_folder(store).len();
    assert!(before >= 2, "{:?}", in_folder(store));
    let p = store
        .env(
            Agent::standalone(&node, &["prune", "--keep-last", "1", "--target", t]),
            BUCKET,
            "suite",
        )
        .run();
    assert_eq!(p.code(), 0, "{}", p.stderr());
    assert_eq!(in_folder(store).len(), 1, "{:?}", in_folder(store));
    let records: Vec<String> = store
        .objects(BUCKET, FOLDER)
        .into_iter()
        .filter(|k| k.ends_with(".manifest.yaml") && !k.contains("/changes/"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    // No claim is left behind.
    assert!(
        !store
            .objects(BUCKET, FOLDER)
            .iter()
            .any(|k| k.contains("/.claims/")),
        "{:?}",
        store.objects(BUCKET, FOLDER)
    );
}

#[test]
fn the_store_suite_on_s3s_fs() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    store_suite(&s3, tmp.path(), "sfs");
}

#[test]
fn the_store_suite_on_azurite() {
    let tmp = tempdir();
    let azurite = Azurite::start(tmp.path(), &[BUCKET]);
    store_suite(&azurite, tmp.path(), "az");
}

#[test]
fn the_store_suite_on_gcs_xml() {
    let tmp = tempdir();
    let gcs = Gcs::start(tmp.path(), &[BUCKET], Rules::default());
    store_suite(&gcs, tmp.path(), "gcs");
}

#[test]
fn the_store_suite_on_moto() {
    let tmp = tempdir();
    let moto = Moto::start(&[BUCKET]);
    store_suite(&moto, tmp.path(), "moto");
}

#[test]
fn the_store_suite_on_a_store_that_refuses_checksums_ignores_conditions_and_flips_a_byte() {
    let tmp = tempdir();
    let front = Front::start(tmp.path(), &[BUCKET], Rules::strict());
    store_suite(&front, tmp.path(), "strict");
    let seen = front.seen.lines();
    assert!(front.seen.count("refused checksum") >= 1, "{seen:#?}");
    assert!(front.seen.count("bad digest") == 1, "{seen:#?}");
    // Refused once, then never asked again in that run; prune deleted one object at a time.
    assert!(front.seen.count("refused multi-delete") == 0, "{seen:#?}");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("DELETE ") && l.contains("-> 204")),
        "{seen:#?}"
    );
}

/// A byte changed on the way and stored, with the store's answer for the part hiding it: the
/// object is not reported, it is removed, and the archive is uploaded again, intact.
#[test]
fn a_corrupted_object_is_never_reported_as_uploaded() {
    let tmp = tempdir();
    let rules = Rules {
        flip: Some(Flip::Hidden),
        ..Rules::default()
    };
    let front = Front::start(tmp.path(), &[BUCKET], rules);
    let node = Node::single(tmp.path(), "flip", &v3530());
    // More than one part (5 MiB each), incompressible.
    fill_random(&node, 700);
    let target = tmp.path().join("backups");
    let run = front
        .env(
            Agent::snapshot(&node, target.to_str().unwrap()),
            BUCKET,
            "suite",
        )
        .run();
    assert_eq!(run.code(), 0, "{}", run.stderr());
    let r = run.success();
    assert_eq!(
        front.seen.count("etag lied"),
        1,
        "{:#?}",
        front.seen.lines()
    );
    assert!(run.stderr().contains("again"), "{}", run.stderr());
    // The first object was read back, found not to be the archive, and removed; the second
    // one is confirmed by its multipart ETag.
    assert!(run.stderr().contains("not the archive"), "{}", run.stderr());
    assert_eq!(
        r["upload"]["confirmed"].as_str(),
        Some("size and multipart etag"),
        "{r:?}"
    );
    let key = format!("{FOLDER}/{}", name_of(&r));
    let local = fs::read(r["snapshot"]["path"].as_str().unwrap()).unwrap();
    assert!(local.len() > 5 << 20, "one part only: {}", local.len());
    assert_eq!(front.get(BUCKET, &key).as_deref(), Some(&local[..]));
    assert_eq!(in_folder(&front), vec![key]);
}

/// Writes `n` values of 10 KiB of random bytes (base64): an archive that does not compress.
fn fill_random(node: &Node, n: usize) {
    use base64::Engine;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut ops = String::new();
    for i in 0..n {
        let mut v = vec![0u8; 7680];
        for b in v.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        let value = base64::engine::general_purpose::STANDARD.encode(&v);
        ops.push_str(&format!("put r/{i} {value}\n"));
        if ops.len() > 1 << 20 || i + 1 == n {
            for line in ops.lines() {
                let (k, v) = line[4..].split_once(' ').unwrap();
                node.put(k, v);
            }
            ops.clear();
        }
    }
}

/// Three units of one cluster, the same second, one folder: each keeps its own archive, under
/// its own name, byte for byte.
fn three_units_keep_their_own(store: &dyn TestStore, nodes: &[Node], tmp: &Path, tag: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let children: Vec<(PathBuf, Child)> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let target = tmp.join(format!("{tag}-u{i}"));
            let child = store
                .env(
                    Agent::snapshot(n, target.to_str().unwrap()),
                    BUCKET,
                    "suite",
                )
                .env("ETCD_ACTIONS_TEST_NOW", &now)
                .env("JUJU_UNIT_NAME", format!("etcd/{i}"))
                .spawn();
            (target, child)
        })
        .collect();
    let mut keys = Vec::new();
    for (target, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r =
            serde_yaml::from_slice::<serde_yaml::Value>(&out.stdout).unwrap()["results"].clone();
        let name = name_of(&r);
        let key = format!("{FOLDER}/{name}");
        assert_eq!(
            store.get(BUCKET, &key),
            Some(fs::read(target.join(&name)).unwrap()),
            "{tag}: {name}: the store does not hold this unit's archive\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        keys.push(key);
    }
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 3, "{tag}: {keys:?}");
    assert_eq!(in_folder(store), keys, "{tag}");
}

/// On a store that ignores `If-None-Match`, the claim keeps three same-second units apart.
#[test]
fn three_units_in_the_same_second_each_keep_their_own_archive() {
    let tmp = tempdir();
    let rules = Rules {
        ignore_conditional: true,
        ..Rules::default()
    };
    let front = Front::start(tmp.path(), &[BUCKET], rules);
    let nodes = cluster(tmp.path(), "same3", &v3530());
    nodes[0].fill("k/", 200);
    for n in &nodes {
        n.settle();
    }
    three_units_keep_their_own(&front, &nodes, tmp.path(), "s3");
}

/// `--s3-checksum`: `md5` never sends a checksum header; `crc64nvme` fails on a store that
/// refuses them, saying what to set, and leaves nothing; `auto` falls back once and says so.
#[test]
fn the_pinned_checksum_modes_do_what_they_say() {
    let tmp = tempdir();
    let rules = Rules {
        refuse_checksums: true,
        ..Rules::default()
    };
    let front = Front::start(tmp.path(), &[BUCKET], rules);
    let node = Node::single(tmp.path(), "modes", &v3530());
    node.fill("k/", 20);
    let t = tmp.path().join("backups");
    let snap = |mode: &str| {
        front
            .env(Agent::snapshot(&node, t.to_str().unwrap()), BUCKET, "suite")
            .env("ETCD_ACTIONS_S3_CHECKSUM", mode)
            .run()
    };

    let pinned = snap("crc64nvme");
    assert_ne!(pinned.code(), 0);
    let msg = pinned.failure();
    assert!(msg.contains("md5"), "{msg}");
    assert!(in_folder(&front).is_empty(), "{:?}", in_folder(&front));

    let refused = front.seen.count("refused checksum");
    let md5 = snap("md5");
    assert_eq!(md5.code(), 0, "{}", md5.stderr());
    assert_eq!(md5.success()["upload"]["checksum"].as_str(), Some("md5"));
    assert_eq!(
        front.seen.count("refused checksum"),
        refused,
        "md5 sent a checksum: {:#?}",
        front.seen.lines()
    );

    node.put("x", "y");
    let auto = snap("auto");
    assert_eq!(auto.code(), 0, "{}", auto.stderr());
    assert_eq!(auto.success()["upload"]["checksum"].as_str(), Some("md5"));
    assert_eq!(front.seen.count("refused checksum"), refused + 1);
    assert_eq!(
        auto.stderr().matches("refuses CRC64NVME").count(),
        1,
        "{}",
        auto.stderr()
    );

    let bad = snap("sha1");
    assert_ne!(bad.code(), 0);
    assert!(bad.failure().contains("--s3-checksum"), "{}", bad.failure());
    assert_eq!(in_folder(&front).len(), 2);
}

/// In Juju, the charm's `s3-checksum` option pins the mode for actions on the `s3` relation.
#[test]
fn the_charm_option_pins_the_checksum_mode_in_juju() {
    let tmp = tempdir();
    let rules = Rules {
        refuse_checksums: true,
        ..Rules::default()
    };
    let front = Front::start(tmp.path(), &[BUCKET], rules);
    let node = Node::single(tmp.path(), "jmode", &v3530());
    node.put("k", "v");
    let juju = Juju::new(tmp.path(), "etcd/0");
    let (access, secret) = front.keys();
    juju.s3_relation(
        serde_json::json!({
            "bucket": BUCKET, "path": "suite", "endpoint": front.endpoint(),
            "region": "us-east-1", "s3-uri-style": "path",
            "access-key": access, "secret-key": secret,
        }),
        None,
    );
    let target = tmp.path().join("backups");
    let snapshot = |config: serde_json::Value| {
        fs::write(juju.state.join("config.json"), config.to_string()).unwrap();
        juju.reset();
        juju.params(
            "snapshot",
            serde_json::json!({"target": target.to_str().unwrap()}),
        );
        Agent::juju(&node, &juju, "snapshot").run()
    };
    let r = snapshot(serde_json::json!({"s3-checksum": "md5"})).juju_ok(&juju);
    assert_eq!(r["upload"]["checksum"], "md5");
    assert_eq!(
        front.seen.count("refused checksum"),
        0,
        "{:#?}",
        front.seen.lines()
    );
    node.put("k", "w");
    let failed = snapshot(serde_json::json!({"s3-checksum": "sha256"})).juju_failed(&juju);
    assert!(failed.contains("s3-checksum"), "{failed}");
    assert_eq!(in_folder(&front).len(), 1);
}

/// Snapshot, list and restore by id through a store relation in Juju: the relation bag and
/// its `secret-extra` secret as the integrator writes them.
fn juju_round_trip(
    store: &dyn TestStore,
    tmp: &Path,
    (endpoint, id, provider): (&str, u32, &str),
    bag: serde_json::Value,
    secret: serde_json::Value,
) {
    let node = Node::single(tmp, &format!("j{id}src"), &v3530());
    node.fill("k/", 30);
    let juju = Juju::new(&tmp.join("j"), "etcd/0");
    juju.store_relation(endpoint, id, provider, bag.clone(), Some(secret.clone()));
    let target = tmp.join("backups");
    juju.params(
        "snapshot",
        serde_json::json!({"target": target.to_str().unwrap()}),
    );
    let r = Agent::juju(&node, &juju, "snapshot").run().juju_ok(&juju);
    let path = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let key = format!("{FOLDER}/{name}");
    assert_eq!(
        r["upload"]["url"].as_str(),
        Some(&*format!("{}://{BUCKET}/{key}", store.scheme()))
    );
    assert_eq!(store.get(BUCKET, &key), Some(fs::read(&path).unwrap()));
    juju.reset();
    juju.params(
        "list-backups",
        serde_json::json!({"target": tmp.join("elsewhere").to_str().unwrap()}),
    );
    let l = Agent::juju(&node, &juju, "list-backups")
        .run()
        .juju_ok(&juju);
    let want = if store.scheme() == "gs" {
        "gcs"
    } else {
        store.scheme()
    };
    assert_eq!(l["backups"]["0"]["where"].as_str(), Some(want), "{l}");
    // A new unit of another application restores it from the store alone.
    let fresh = Node::single(tmp, &format!("j{id}new"), &v3530());
    let juju2 = Juju::new(&tmp.join("j2"), "new-etcd/0");
    juju2.store_relation(endpoint, id, provider, bag, Some(secret.clone()));
    juju2.params(
        "restore",
        serde_json::json!({"backup-id": format!("etcd/{name}"), "skip-backup": true}),
    );
    let rr = Agent::juju(&fresh, &juju2, "restore").run().juju_ok(&juju2);
    assert_eq!(rr["restore"]["origin"], "store");
    assert_eq!(fresh.dump(), node.dump());
    let key_text = secret["secret-key"].as_str().unwrap().to_string();
    let seen = format!("{r}{rr}{l}{}{}", juju.log(), juju2.log());
    assert!(!seen.contains(&key_text), "the key leaked");

    // A second store related at once: blocked, naming both; nothing uploaded.
    juju.store_relation(
        "s3-credentials",
        7,
        "s3-integrator",
        serde_json::json!({}),
        None,
    );
    juju.reset();
    juju.params(
        "snapshot",
        serde_json::json!({"target": target.to_str().unwrap()}),
    );
    let failed = Agent::juju(&node, &juju, "snapshot")
        .run()
        .juju_failed(&juju);
    assert!(
        failed.contains("s3-credentials") && failed.contains(endpoint),
        "{failed}"
    );
    let statuses = juju.statuses();
    assert!(
        statuses.contains("blocked") && statuses.contains("more than one store"),
        "{statuses}"
    );
}

#[test]
fn azure_through_the_juju_relation() {
    let tmp = tempdir();
    let azurite = Azurite::start(tmp.path(), &[BUCKET]);
    juju_round_trip(
        &azurite,
        tmp.path(),
        ("azure-storage-credentials", 9, "azure-storage-integrator"),
        serde_json::json!({
            "container": BUCKET, "storage-account": AZURITE_ACCOUNT, "path": "suite",
            "endpoint": azurite.endpoint(), "connection-protocol": "http", "version": "1",
        }),
        serde_json::json!({"secret-key": AZURITE_KEY}),
    );
}

#[test]
fn gcs_through_the_juju_relation() {
    let tmp = tempdir();
    let gcs = Gcs::start(tmp.path(), &[BUCKET], Rules::default());
    juju_round_trip(
        &gcs,
        tmp.path(),
        ("gcs-credentials", 11, "gcs-integrator"),
        serde_json::json!({"bucket": BUCKET, "path": "suite", "version": "1"}),
        serde_json::json!({"secret-key": fs::read_to_string(&gcs.key_file).unwrap()}),
    );
}

/// Three units of one cluster in the same second each keep their own archive on Azure and on
/// GCS (whose front enforces no conditional create: the agent's claim does it).
#[test]
fn three_units_in_the_same_second_on_azure_and_gcs() {
    let tmp = tempdir();
    let azurite = Azurite::start(tmp.path(), &[BUCKET]);
    let gcs = Gcs::start(
        &tmp.path().join("g"),
        &[BUCKET],
        Rules {
            ignore_conditional: true,
            ..Rules::default()
        },
    );
    let nodes = cluster(tmp.path(), "same3ag", &v3530());
    nodes[0].fill("k/", 100);
    for n in &nodes {
        n.settle();
    }
    three_units_keep_their_own(&azurite, &nodes, tmp.path(), "az");
    three_units_keep_their_own(&gcs, &nodes, tmp.path(), "gcs");
}

/// Under Juju the follow service is never given the GCS key on disk: it reads it from the
/// relation through `juju-exec`, into memory, and its segments reach the bucket.
#[test]
fn follow_under_juju_reads_the_gcs_key_through_juju_exec() {
    let tmp = tempdir();
    let gcs = Gcs::start(tmp.path(), &[BUCKET], Rules::default());
    let key = fs::read_to_string(&gcs.key_file).unwrap();
    fs::remove_file(&gcs.key_file).unwrap();
    let juju = Juju::new(&tmp.path().join("j"), "etcd/0");
    juju.store_relation(
        "gcs-credentials",
        11,
        "gcs-integrator",
        serde_json::json!({"bucket": BUCKET, "path": "suite", "version": "1"}),
        Some(serde_json::json!({"secret-key": key})),
    );
    // juju-exec <unit> <command>: the command in the unit's hook context.
    let exec = juju.bin.join("juju-exec");
    fs::write(
        &exec,
        format!(
            "#!/bin/sh\nunit=\"$1\"; shift\nJUJU_UNIT_NAME=\"$unit\" FAKE_JUJU_STATE='{}' \
             PATH='{}':\"$PATH\" exec sh -c \"$1\"\n",
            juju.state.display(),
            juju.bin.display()
        ),
    )
    .unwrap();
    set_mode(&exec, 0o755);
    let node = Node::single(tmp.path(), "gfollow", &v3530());
    node.put("a", "1");
    let target = tmp.path().join("backups");
    let log = tmp.path().join("follow.log");
    let f = follow_logged(
        follow_agent(&node, &target)
            .env("ETCD_ACTIONS_GCS_BUCKET", BUCKET)
            .env("ETCD_ACTIONS_GCS_PATH", "suite")
            .env("ETCD_ACTIONS_GCS_KEY_FROM_UNIT", "etcd/0")
            .env(
                "PATH",
                format!("{}:{}", juju.bin.display(), std::env::var("PATH").unwrap()),
            ),
        &log,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("follow: recording")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for i in 0..10 {
        node.put(&format!("f/{i}"), "v");
    }
    let end = node.revision();
    wait_logged(
        &target,
        &node,
        end,
        &log,
        40,
        "follow did not record the writes",
    );
    let out = sigterm(f);
    let text = fs::read_to_string(&log).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(
        gcs.objects(BUCKET, "suite/etcd/changes/")
            .iter()
            .any(|k| !k.contains("/.claims/")),
        "no segment reached the bucket: {text}"
    );
    assert!(!text.contains("private_key"), "{text}");
}

/// A store relation missing a field or with a broken one: the action fails naming the relation
/// and the field, and the unit is `blocked` saying so.
#[test]
fn a_broken_store_relation_blocks_the_unit_naming_the_field() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "broken", &v3530());
    node.put("k", "v");
    let target = tmp.path().join("backups");
    for (endpoint, id, provider, bag, secret, field) in [
        (
            "azure-storage-credentials",
            9,
            "azure-storage-integrator",
            serde_json::json!({"storage-account": "acct", "version": "1"}),
            serde_json::json!({"secret-key": AZURITE_KEY}),
            "container",
        ),
        (
            "gcs-credentials",
            11,
            "gcs-integrator",
            serde_json::json!({"bucket": BUCKET, "version": "1"}),
            serde_json::json!({"secret-key": "{\"type\": \"user\"}"}),
            "service-account",
        ),
    ] {
        let juju = Juju::new(&tmp.path().join(endpoint), "etcd/0");
        juju.store_relation(endpoint, id, provider, bag, Some(secret));
        juju.params(
            "snapshot",
            serde_json::json!({"target": target.to_str().unwrap()}),
        );
        let failed = Agent::juju(&node, &juju, "snapshot")
            .run()
            .juju_failed(&juju);
        assert!(failed.contains(field), "{endpoint}: {failed}");
        let statuses = juju.statuses();
        assert!(
            statuses.contains("blocked") && statuses.contains(endpoint) && statuses.contains(field),
            "{endpoint}: {statuses}"
        );
    }
}
