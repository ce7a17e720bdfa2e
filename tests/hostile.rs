//! Hostile and broken input is refused with a clear message, and nothing changes: not the
//! live data, not the target, not the state directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;

use crate::restore::snapshot;
use crate::util::*;

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A tar entry with a raw name (no path checks) of any type.
fn entry(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    data: &[u8],
    link: Option<&str>,
) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o600);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(l) = link {
        gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_cksum();
    tar.append(&h, data).unwrap();
}

fn archive_of(entries: &[(&str, tar::EntryType, Vec<u8>, Option<&str>)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        entry(&mut tar, name, *kind, data, *link);
    }
    gz(&tar.into_inner().unwrap())
}

fn manifest_for(db: &[u8], source: &str) -> Vec<u8> {
    use sha2::Digest;
    format!(
        "format-version: 1\ncreated: 2026-01-01T00:00:00Z\ntool-version: 0.1.0\nunit: etcd/0\nsource: {source}\ndb-size: {}\ndb-sha256: {}\n",
        db.len(),
        hex::encode(sha2::Sha256::digest(db))
    )
    .into_bytes()
}

struct Victim {
    node: Node,
    before: std::collections::BTreeMap<String, String>,
    cluster: u64,
    target: PathBuf,
}

impl Victim {
    #[track_caller]
    fn refuses(&self, archive: &Path, extra: &[&str], expect: &[&str]) -> String {
        let mut args = vec![
            "restore",
            "--snapshot",
            archive.to_str().unwrap(),
            "--target",
            self.target.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = Agent::standalone(&self.node, &args).run();
        let msg = run.failure();
        for e in expect {
            assert!(msg.contains(e), "expected `{e}` in: {msg}");
        }
        self.unchanged(&msg);
        msg
    }

    #[track_caller]
    fn unchanged(&self, context: &str) {
        assert_eq!(
            self.node.dump(),
            self.before,
            "live data changed after: {context}"
        );
        assert_eq!(
            self.node.cluster_id(),
            self.cluster,
            "cluster changed after: {context}"
        );
        assert_eq!(
            files_in(&self.node.data_dir().join(".etcd-actions")),
            vec!["lock".to_string()],
            "leftovers after: {context}"
        );
        assert!(
            files_in(&self.target).is_empty(),
            "target written after: {context}"
        );
        let data = files_in(&self.node.data_dir());
        assert_eq!(
            data,
            vec![".etcd-actions".to_string(), "member".to_string()],
            "data dir after: {context}"
        );
    }
}

#[test]
fn broken_and_hostile_archives_are_refused() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("s/", 50);
    let (good, sr) = snapshot(&src, &tmp.path().join("snaps"));
    let good_bytes = fs::read(&good).unwrap();
    let db = fs::read(extract_db(&good, &tmp.path().join("x"))).unwrap();

    let node = Node::single(tmp.path(), "victim", &v35());
    node.fill("mine/", 25);
    let v = Victim {
        before: node.dump(),
        cluster: node.cluster_id(),
        node,
        target: tmp.path().join("backups"),
    };
    fs::create_dir(&v.target).unwrap();
    let dir = tmp.path().join("evil");
    fs::create_dir(&dir).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        fs::write(&p, bytes).unwrap();
        p
    };

    let mut flipped = good_bytes.clone();
    let mid = flipped.len() / 2;
    // Several bytes, so that not all can land in gzip header fields no checksum covers
    // (MTIME, OS), where a flip leaves the content intact.
    let len = flipped.len();
    for at in [mid, mid + 37, mid + 101] {
        flipped[at % len] ^= 0x55;
    }
    v.refuses(
        &write("flipped.tar.gz", &flipped),
        &[],
        &["refused", "corrupt"],
    );
    v.refuses(
        &write("truncated.tar.gz", &good_bytes[..good_bytes.len() * 2 / 3]),
        &[],
        &["truncated"],
    );
    let noise: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    v.refuses(&write("random.tar.gz", &noise), &[], &["not a gzip file"]);
    v.refuses(
        &write(
            "text.tar.gz",
            &gz(b"just some text, not a tar archive\n"
                .repeat(100)
                .as_slice()),
        ),
        &[],
        &["refused"],
    );

    // A db whose etcd trailer does not match, with a manifest that agrees with the bad db.
    let mut bad_db = db.clone();
    bad_db[100] ^= 1;
    let a = archive_of(&[
        ("./db", tar::EntryType::Regular, bad_db.clone(), None),
        (
            "./manifest.yaml",
            tar::EntryType::Regular,
            manifest_for(&bad_db, "snapshot-api"),
            None,
        ),
    ]);
    v.refuses(&write("trailer.tar.gz", &a), &[], &["trailer"]);
    // A db that does not match its manifest.
    let a = archive_of(&[
        ("./db", tar::EntryType::Regular, db.clone(), None),
        (
            "./manifest.yaml",
            tar::EntryType::Regular,
            manifest_for(&bad_db, "snapshot-api"),
            None,
        ),
    ]);
    v.refuses(&write("manifest.tar.gz", &a), &[], &["manifest"]);

    // Paths and entry types.
    let reg = tar::EntryType::Regular;
    for (name, entries, expect) in [
        ("dotdot", vec![("../db", reg, db.clone(), None)], ".."),
        (
            "dotdot-deep",
            vec![("a/../../db", reg, db.clone(), None)],
            "..",
        ),
        ("absolute", vec![("/db", reg, db.clone(), None)], "absolute"),
        (
            "symlink",
            vec![("./db", tar::EntryType::Symlink, vec![], Some("/etc/passwd"))],
            "symlink",
        ),
        (
            "hardlink",
            vec![("./db", tar::EntryType::Link, vec![], Some("/etc/passwd"))],
            "hard link",
        ),
        (
            "device",
            vec![("./db", tar::EntryType::Char, vec![], None)],
            "character device",
        ),
        (
            "fifo",
            vec![("./x", tar::EntryType::Fifo, vec![], None)],
            "FIFO",
        ),
        (
            "duplicate",
            vec![
                ("./db", reg, db.clone(), None),
                ("db", reg, db.clone(), None),
            ],
            "more than one `db`",
        ),
        (
            "unexpected",
            vec![
                ("./db", reg, db.clone(), None),
                ("./evil.sh", reg, b"rm -rf /".to_vec(), None),
            ],
            "unexpected file",
        ),
        (
            "no-db",
            vec![(
                "./manifest.yaml",
                reg,
                manifest_for(&db, "snapshot-api"),
                None,
            )],
            "no `db`",
        ),
        (
            "v2",
            vec![
                (
                    "./backup/member/wal/0000000000000000-0000000000000000.wal",
                    reg,
                    vec![0; 512],
                    None,
                ),
                ("./backup/member/snap/db", reg, db.clone(), None),
            ],
            "v2-era",
        ),
    ] {
        let a = archive_of(&entries);
        let msg = v.refuses(&write(&format!("{name}.tar.gz"), &a), &[], &[expect]);
        assert!(!msg.contains("panicked"), "{msg}");
    }
    assert!(
        !tmp.path().join("db").exists(),
        "nothing written outside the staging area"
    );

    // A gzip bomb: a db entry claiming far more than the disk holds.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(reg);
    h.set_size(1 << 40);
    h.set_mode(0o600);
    h.set_path("db").unwrap();
    h.set_cksum();
    let mut raw = h.as_bytes().to_vec();
    raw.extend(std::iter::repeat_n(0u8, 1 << 20));
    v.refuses(
        &write("bomb.tar.gz", &gz(&raw)),
        &[],
        &["claims 1.0T", "room for at most"],
    );

    // sha256 param that does not match, and one that is not hex.
    let wrong = "0".repeat(64);
    v.refuses(
        &good,
        &["--sha256", &wrong],
        &["sha256", &wrong, sr["snapshot"]["sha256"].as_str().unwrap()],
    );
    let run = Agent::restore(&v.node, good.to_str().unwrap(), &["--sha256", "xyz"]).run();
    assert!(run.failure().contains("64 hex digits"));
    v.unchanged("bad sha256 syntax");

    // A relative target, and params with shell metacharacters: never interpolated.
    let run = Agent::restore(&v.node, good.to_str().unwrap(), &["--target", "backups"]).run();
    assert!(run.failure().contains("relative"));
    v.unchanged("relative target");
    let pwned = tmp.path().join("pwned");
    let evil = format!("{}; touch {}", good.display(), pwned.display());
    let run = Agent::restore(&v.node, &evil, &[]).run();
    let msg = run.failure();
    assert!(msg.contains("cannot be read"), "{msg}");
    let evil_target = format!("{}/$(touch {})", v.target.display(), pwned.display());
    let juju = Juju::new(tmp.path(), "etcd/0");
    juju.params("restore", serde_json::json!({"snapshot": format!("`touch {}`", pwned.display()), "target": evil_target}));
    let msg = Agent::juju(&v.node, &juju, "restore")
        .run()
        .juju_failed(&juju);
    assert!(msg.contains("relative"), "{msg}");
    assert!(!pwned.exists(), "a param reached a shell");
    v.unchanged("metacharacters");
}

#[test]
fn legacy_charm_archives_restore_and_ours_restore_the_legacy_way() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "legacy", &v34());
    src.fill("old-charm/", 40);
    let wanted = src.dump();
    // The original charm: `cp member/snap/db` (we stop etcd first so the copy is whole), then
    // `tar cvfz ../x.tar.gz .` of the directory holding it.
    src.stop();
    let work = tmp.path().join("work");
    fs::create_dir_all(work.join("flat")).unwrap();
    fs::create_dir_all(work.join("nested/etcd-snapshot-1")).unwrap();
    fs::copy(src.data_dir().join("member/snap/db"), work.join("flat/db")).unwrap();
    fs::copy(
        src.data_dir().join("member/snap/db"),
        work.join("nested/etcd-snapshot-1/db"),
    )
    .unwrap();
    src.start();
    src.wait_healthy();
    let flat = tmp.path().join("legacy-flat.tar.gz");
    assert!(Command::new("tar")
        .arg("czf")
        .arg(&flat)
        .arg(".")
        .current_dir(work.join("flat"))
        .status()
        .unwrap()
        .success());
    let nested = tmp.path().join("legacy-nested.tar.gz");
    assert!(Command::new("tar")
        .arg("czf")
        .arg(&nested)
        .arg("etcd-snapshot-1")
        .current_dir(work.join("nested"))
        .status()
        .unwrap()
        .success());

    let unit = Node::single(tmp.path(), "unit", &v34());
    let r = Agent::restore(&unit, flat.to_str().unwrap(), &["--skip-backup"])
        .run()
        .success();
    assert_eq!(unit.dump(), wanted);
    assert!(
        r["restore"]["integrity"]
            .as_str()
            .unwrap()
            .contains("unchecked"),
        "{:?}",
        r["restore"]["integrity"]
    );
    unit.put("other", "x");
    let sha = sha256_file(&nested);
    let r = Agent::restore(
        &unit,
        nested.to_str().unwrap(),
        &["--skip-backup", "--sha256", &sha],
    )
    .run()
    .success();
    assert_eq!(unit.dump(), wanted);
    assert_eq!(
        r["restore"]["integrity"].as_str(),
        Some("legacy archive with a raw db: integrity checked with the archive sha256 only")
    );

    // Ours, the way the original charm's restore reads it: `tar -tvf --wildcards '*/db'`,
    // extract, `etcdctl snapshot restore <dir>/db --skip-hash-check`.
    let (ours, _) = snapshot(&src, &tmp.path().join("snaps"));
    let listed = Command::new("tar")
        .arg("-tvf")
        .arg(&ours)
        .args(["--wildcards", "*/db"])
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "the charm's v3 detection finds our db"
    );
    let restore_v3 = tmp.path().join("restore-v3");
    let db = extract_db(&ours, &restore_v3);
    let out = Command::new(&v34().etcdctl)
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(&db)
        .arg("--skip-hash-check")
        .arg(format!("--data-dir={}", restore_v3.join("etcd").display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(restore_v3.join("etcd/member/snap/db").is_file());
}
