//! Hardening round 2: each defect found by attacking the agent as a hostile local user and
//! with crafted archives, reproduced against real etcd. Races are made deterministic with
//! pause points (`ETCD_ACTIONS_PAUSE`) compiled into the `failpoints` build.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;

use crate::errors::{mount_tmpfs, umount};
use crate::restore::snapshot;
use crate::util::*;

/// A system user for the hostile-user tests, created once; its (uid, gid).
fn hostile_user() -> (u32, u32) {
    static USER: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *USER.get_or_init(|| {
        const NAME: &str = "etcd-actions-test";
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").arg(flag).arg(NAME).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        if id("-u").is_none() {
            let st = Command::new("useradd")
                .args(["--system", "--no-create-home", "--shell", "/bin/sh", NAME])
                .status()
                .unwrap();
            assert!(st.success() || id("-u").is_some(), "useradd failed");
        }
        (id("-u").unwrap(), id("-g").unwrap())
    })
}

/// Runs `script` with sh as the hostile user.
#[track_caller]
fn as_user(script: &str) {
    let (uid, gid) = hostile_user();
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(["sh", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as the test user: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory tree the hostile user can reach: the tempdir is opened up to 0755.
fn reachable_tmp() -> tempfile::TempDir {
    let tmp = tempdir();
    set_mode(tmp.path(), 0o755);
    tmp
}

/// A root-owned file in a root-owned directory: what the hostile user wants to own.
fn root_victim(base: &Path) -> (PathBuf, PathBuf) {
    let dir = base.join("rootdir");
    fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o755);
    let file = dir.join("archive.tar.gz");
    fs::write(&file, b"root's own file").unwrap();
    set_mode(&file, 0o600);
    (dir, file)
}

#[track_caller]
fn assert_root_owned_untouched(file: &Path) {
    let md = fs::symlink_metadata(file).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (0, 0),
        "`{}` changed owner",
        file.display()
    );
    assert_eq!(md.mode() & 0o7777, 0o600);
    assert_eq!(fs::read(file).unwrap(), b"root's own file");
}

/// The published archive is exactly what the results describe, owned by the target's owner.
#[track_caller]
fn assert_describes(results: &serde_yaml::Value, owner: (u32, u32)) -> PathBuf {
    let path = PathBuf::from(results["snapshot"]["path"].as_str().unwrap());
    let md = fs::symlink_metadata(&path).unwrap();
    assert!(
        md.file_type().is_file(),
        "{} is not a plain file",
        path.display()
    );
    assert_eq!((md.uid(), md.gid()), owner);
    assert_eq!(md.mode() & 0o777, 0o600);
    assert_eq!(
        results["snapshot"]["sha256"].as_str().unwrap(),
        sha256_file(&path),
        "the results describe other bytes than those at path"
    );
    assert_sidecar_ok(&path);
    path
}

// Defect 1: a swapped temp dir or a planted sidecar symlink never makes root chown, write or
// report anything but our own file.
#[test]
fn root_never_follows_a_target_owners_symlinks() {
    let tmp = reachable_tmp();
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("k/", 20);
    let user = hostile_user();
    let target = tmp.path().join("user-backups");
    fs::create_dir(&target).unwrap();
    std::os::unix::fs::chown(&target, Some(user.0), Some(user.1)).unwrap();
    set_mode(&target, 0o755);
    let (rootdir, victim) = root_victim(tmp.path());
    let ctl = tmp.path().join("ctl");
    fs::create_dir(&ctl).unwrap();

    // The temp dir is swapped for a symlink to a root-owned dir just before publishing.
    let mut child = Agent::snapshot(&node, target.to_str().unwrap())
        .env(
            "ETCD_ACTIONS_PAUSE",
            format!("archive-written:{}", ctl.display()),
        )
        .spawn();
    wait_reached(&ctl, "archive-written", &mut child);
    let temp = files_in(&target)
        .into_iter()
        .find(|n| n.starts_with(".etcd-actions-tmp-"))
        .expect("a temp dir in the target");
    as_user(&format!(
        "cd '{t}' && mv '{temp}' moved-away && ln -s '{r}' '{temp}'",
        t = target.display(),
        r = rootdir.display()
    ));
    go(&ctl, "archive-written");
    let out = wait_ok(child);
    let results: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_root_owned_untouched(&victim);
    assert_describes(&results["results"], user);

    // A symlink planted at the sidecar's name once the archive is in place.
    let mut child = Agent::snapshot(&node, target.to_str().unwrap())
        .env(
            "ETCD_ACTIONS_PAUSE",
            format!("archive-published:{}", ctl.display()),
        )
        .spawn();
    wait_reached(&ctl, "archive-published", &mut child);
    let fresh = files_in(&target)
        .into_iter()
        .filter(|n| n.ends_with(".tar.gz"))
        .find(|n| !target.join(format!("{n}.sha256")).exists())
        .expect("the archive being published");
    as_user(&format!(
        "ln -s '{}' '{}/{fresh}.sha256'",
        victim.display(),
        target.display()
    ));
    go(&ctl, "archive-published");
    let out = wait_ok(child);
    let results: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_root_owned_untouched(&victim);
    let path = assert_describes(&results["results"], user);
    assert_ne!(
        path,
        target.join(&fresh),
        "the planted name was not taken over"
    );
    assert!(
        fs::symlink_metadata(target.join(format!("{fresh}.sha256")))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the user's own symlink is left alone"
    );
}

// Defect 1: a target that is a symlink owned by another user is refused; root's are followed.
#[test]
fn target_symlinks_are_followed_only_when_root_owns_them() {
    let tmp = reachable_tmp();
    let node = Node::single(tmp.path(), "unit", &v35());
    let user = hostile_user();
    let (rootdir, _) = root_victim(tmp.path());
    let link = tmp.path().join("user-link");
    std::os::unix::fs::symlink(&rootdir, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(user.0), Some(user.1)).unwrap();
    let before = files_in(&rootdir);
    let run = Agent::snapshot(&node, link.to_str().unwrap()).run();
    let msg = run.failure();
    assert_eq!(run.code(), 2, "{msg}");
    assert!(msg.contains("symlink owned by uid"), "{msg}");
    assert_eq!(
        files_in(&rootdir),
        before,
        "nothing written through the link"
    );
    // Below a user's symlink too.
    let deeper = link.join("sub");
    let msg = Agent::snapshot(&node, deeper.to_str().unwrap())
        .run()
        .failure();
    assert!(msg.contains("symlink owned by uid"), "{msg}");
    assert!(!rootdir.join("sub").exists());

    let root_link = tmp.path().join("root-link");
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, &root_link).unwrap();
    let r = Agent::snapshot(&node, root_link.to_str().unwrap())
        .run()
        .success();
    let path = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
    assert!(path.starts_with(&root_link));
    assert_eq!(
        files_in(&real).len(),
        3,
        "archive and sidecars in the real dir"
    );
}

// Defect 6: a target inside the data dir (or its state dir) is refused, for both actions.
#[test]
fn targets_inside_the_data_dir_are_refused() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("k/", 10);
    let before = (node.dump(), node.cluster_id());
    for target in [
        node.data_dir(),
        node.data_dir().join("backups"),
        node.data_dir().join(".etcd-actions/x"),
        node.data_dir().join("member/snap"),
    ] {
        let t = target.to_str().unwrap();
        let run = Agent::snapshot(&node, t).run();
        let msg = run.failure();
        assert_eq!(run.code(), 2, "{msg}");
        assert!(msg.contains("inside etcd's data dir"), "{msg}");
        let run = Agent::restore(&node, archive.to_str().unwrap(), &["--target", t]).run();
        let msg = run.failure();
        assert_eq!(run.code(), 2, "{msg}");
        assert!(msg.contains("inside etcd's data dir"), "{msg}");
    }
    // Through a symlink that leads into the data dir as well.
    let sneaky = tmp.path().join("sneaky");
    std::os::unix::fs::symlink(node.data_dir(), &sneaky).unwrap();
    let msg = Agent::snapshot(&node, sneaky.join("b").to_str().unwrap())
        .run()
        .failure();
    assert!(msg.contains("inside etcd's data dir"), "{msg}");
    assert_eq!((node.dump(), node.cluster_id()), before);
    // Refused before anything was created in the data dir (not even the state dir).
    assert_eq!(files_in(&node.data_dir()), vec!["member".to_string()]);
    assert_eq!(
        files_in(&node.data_dir().join("member")),
        vec!["snap".to_string(), "wal".to_string()]
    );
}

fn gz(bytes: impl FnOnce(&mut GzEncoder<Vec<u8>>)) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
    bytes(&mut e);
    e.finish().unwrap()
}

/// A raw 512-byte tar header with `name`, `kind` and a size field of `size`.
fn raw_header(name: &str, kind: u8, size: u64) -> [u8; 512] {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_size(size);
    h.set_mode(0o600);
    let gnu = h.as_gnu_mut().unwrap();
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    *h.as_bytes()
}

fn zeros(e: &mut impl Write, mut n: u64) {
    let block = vec![0u8; 1 << 20];
    while n > 0 {
        let k = n.min(block.len() as u64) as usize;
        e.write_all(&block[..k]).unwrap();
        n -= k as u64;
    }
}

/// `n` MiB of zeros as concatenated gzip members (one 16 MiB member compressed once and
/// repeated): a bomb made in milliseconds.
fn gz_zeros(out: &mut Vec<u8>, mib: u64) {
    static MEMBER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let member = MEMBER.get_or_init(|| gz(|e| zeros(e, 16 << 20)));
    assert_eq!(mib % 16, 0);
    for _ in 0..mib / 16 {
        out.extend_from_slice(member);
    }
}

fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

/// A unit whose data dir is a small tmpfs of its own, with some data.
struct SmallUnit {
    node: Node,
    before: (std::collections::BTreeMap<String, String>, u64),
}

impl SmallUnit {
    fn new(base: &Path) -> SmallUnit {
        let node = Node::prepare(base, "small", &v35());
        fs::create_dir_all(node.data_dir()).unwrap();
        mount_tmpfs(&node.data_dir(), "300m", false);
        node.start_alone();
        node.fill("old/", 30);
        SmallUnit {
            before: (node.dump(), node.cluster_id()),
            node,
        }
    }

    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.node.data_dir())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[track_caller]
    fn unchanged(&self) {
        assert!(self.node.running(), "the live etcd died");
        assert_eq!((self.node.dump(), self.node.cluster_id()), self.before);
        assert_eq!(
            files_in(&self.node.data_dir().join(".etcd-actions")),
            vec!["lock".to_string()]
        );
    }
}

impl Drop for SmallUnit {
    fn drop(&mut self) {
        self.node.stop();
        umount(&self.node.data_dir());
    }
}

// Defect 2: a PAX `size` larger than the header's cannot make the copy outgrow the limit, and
// the live etcd keeps its reserve.
#[test]
fn a_pax_size_cannot_fill_the_data_filesystem() {
    let _g = heavy_lock();
    let tmp = tempdir();
    let unit = SmallUnit::new(tmp.path());
    let free_before = unit.free();
    // Header: 1 MiB `db`; PAX: 1 GiB; then 1 GiB of zeros (a 1 MiB download).
    let pax = pax_record("size", &(1u64 << 30).to_string());
    let archive = tmp.path().join("pax-size.tar.gz");
    let mut bytes = gz(|e| {
        e.write_all(&raw_header("./PaxHeaders/db", b'x', pax.len() as u64))
            .unwrap();
        let mut rec = pax.clone().into_bytes();
        rec.resize(512, 0);
        e.write_all(&rec).unwrap();
        e.write_all(&raw_header("./db", b'0', 1 << 20)).unwrap();
    });
    gz_zeros(&mut bytes, 1024);
    fs::write(&archive, bytes).unwrap();
    let run = Agent::restore(&unit.node, archive.to_str().unwrap(), &["--skip-backup"]).run();
    let msg = run.failure();
    assert_eq!(run.code(), 3, "{msg}");
    assert!(msg.contains("PAX header says"), "{msg}");
    unit.unchanged();
    let free_after = unit.free();
    assert!(
        free_after + (16 << 20) > free_before,
        "space was used: {free_before} -> {free_after}"
    );
}

// Defect 2: the reserve. A db that fits the filesystem but not beside the reserve is refused
// before a byte of it is written.
#[test]
fn staging_keeps_a_reserve_for_the_live_etcd() {
    let _g = heavy_lock();
    let tmp = tempdir();
    let unit = SmallUnit::new(tmp.path());
    // A 40 MiB db: it fits the ~170 MiB free (etcd keeps two 64 MiB WAL segments) once, not
    // twice beside the restored WAL segment and the 64 MiB reserve.
    let archive = tmp.path().join("big.tar.gz");
    let mut bytes = gz(|e| {
        e.write_all(&raw_header("./db", b'0', 40 << 20)).unwrap();
    });
    gz_zeros(&mut bytes, 48);
    fs::write(&archive, bytes).unwrap();
    let run = Agent::restore(&unit.node, archive.to_str().unwrap(), &["--skip-backup"]).run();
    let msg = run.failure();
    assert_eq!(run.code(), 3, "{msg}");
    assert!(msg.contains("there is room for at most"), "{msg}");
    unit.unchanged();
}

// Defect 2: a failure says the data is unchanged only when etcd is healthy.
#[test]
fn a_failure_with_etcd_down_does_not_claim_all_is_well() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let node = Node::single(tmp.path(), "unit", &v35());
    let juju = Juju::new(tmp.path(), "etcd/0");
    juju.params(
        "restore",
        serde_json::json!({"snapshot": archive.to_str().unwrap(), "skip-backup": true}),
    );
    // The restore tool fails, and etcd went down meanwhile (its disk died, say).
    let wrapper = tmp.path().join("etcdutl-kills-etcd");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$*\" in *\"snapshot restore\"*--help*) ;; *\"snapshot restore\"*) {stop} >/dev/null; echo 'Error: write: input/output error' >&2; exit 1;; esac\nexec \"{real}\" \"$@\"\n",
            stop = node.stop_command(),
            real = node.flavor.etcdutl.as_ref().unwrap().display()
        ),
    )
    .unwrap();
    set_mode(&wrapper, 0o755);
    let run = Agent::juju(&node, &juju, "restore")
        .env("ETCD_ACTIONS_ETCDUTL", &wrapper)
        .run();
    let msg = run.juju_failed(&juju);
    assert!(msg.contains("etcd is not healthy now"), "{msg}");
    assert!(!msg.contains("unchanged"), "{msg}");
    let statuses = juju.statuses();
    let last = statuses.lines().last().unwrap();
    assert!(last.starts_with("blocked"), "{statuses}");
    assert!(!last.contains("unchanged"), "{statuses}");
}

/// Runs a restore of `archive` with the agent's peak RSS recorded; returns (message, KiB).
fn restore_rss(node: &Node, archive: &Path, dir: &Path) -> (String, u64) {
    let rss = dir.join("rss");
    let run = Agent::restore(node, archive.to_str().unwrap(), &["--skip-backup"])
        .env("ETCD_ACTIONS_PEAK_RSS_FILE", &rss)
        .run();
    let msg = run.failure();
    assert_eq!(run.code(), 3, "{msg}");
    let line = fs::read_to_string(&rss).unwrap();
    let kib = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    (msg, kib)
}

// Defect 3: header bombs are refused before they are read; memory stays bounded.
#[test]
fn header_bombs_are_refused_with_bounded_memory() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    let before = node.dump();
    for (kind, what) in [(b'L', "GNU long name"), (b'x', "PAX header")] {
        let archive = tmp.path().join(format!("bomb-{}.tar.gz", kind as char));
        let bytes = gz(|e| {
            e.write_all(&raw_header("././@LongLink", kind, 1 << 30))
                .unwrap();
            zeros(e, 1 << 30);
        });
        assert!(bytes.len() < 4 << 20);
        fs::write(&archive, bytes).unwrap();
        let (msg, kib) = restore_rss(&node, &archive, tmp.path());
        assert!(msg.contains(what), "{msg}");
        assert!(kib < 200 * 1024, "peak RSS {kib} KiB for a {what} bomb");
    }
    assert_eq!(node.dump(), before);
}

// Defect 3: a message of any size reaches the operator, cut, through action-fail.
#[test]
fn huge_messages_reach_the_operator_cut() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    let juju = Juju::new(tmp.path(), "etcd/0");
    // A 300 KiB path in the message: over the kernel's 128 KiB limit for one argument.
    let long = format!("/{}", "d/".repeat(150_000));
    juju.params(
        "restore",
        serde_json::json!({"snapshot": long, "skip-backup": true}),
    );
    let run = Agent::juju(&node, &juju, "restore").run();
    let msg = run.juju_failed(&juju);
    assert!(msg.len() <= 16 * 1024, "{} bytes", msg.len());
    assert!(msg.contains("bytes cut"), "{msg}");
    assert!(msg.contains("no snapshot to restore"), "{msg}");
    // A tool that prints megabytes on stderr.
    juju.reset();
    let src = Node::single(tmp.path(), "src", &v35());
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let noisy = tmp.path().join("noisy-etcdutl");
    fs::write(
        &noisy,
        format!(
            "#!/bin/sh\ncase \"$*\" in *\"snapshot restore\"*--help*) ;; *\"snapshot restore\"*) head -c 20000000 /dev/zero | tr '\\0' x >&2; echo ' the real cause' >&2; exit 1;; esac\nexec \"{}\" \"$@\"\n",
            node.flavor.etcdutl.as_ref().unwrap().display()
        ),
    )
    .unwrap();
    set_mode(&noisy, 0o755);
    juju.params(
        "restore",
        serde_json::json!({"snapshot": archive.to_str().unwrap(), "skip-backup": true}),
    );
    let run = Agent::juju(&node, &juju, "restore")
        .env("ETCD_ACTIONS_ETCDUTL", &noisy)
        .env("ETCD_ACTIONS_PEAK_RSS_FILE", tmp.path().join("rss"))
        .run();
    let msg = run.juju_failed(&juju);
    assert!(msg.len() <= 16 * 1024, "{} bytes", msg.len());
    assert!(
        msg.contains("the real cause"),
        "the end of stderr is kept: {msg}"
    );
    let rss = fs::read_to_string(tmp.path().join("rss")).unwrap();
    let kib: u64 = rss.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(kib < 200 * 1024, "peak RSS {kib} KiB");
}

/// A 2-member cluster.
fn pair(base: &Path, flavor: &Flavor) -> Vec<Node> {
    let nodes: Vec<Node> = (0..2)
        .map(|i| Node::prepare(base, &format!("m{i}"), flavor))
        .collect();
    let initial: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}={}", n.name, n.peer_url()))
        .collect();
    for n in &nodes {
        n.write_config(&initial.join(","), "new", "tok-pair");
        n.start();
    }
    for n in &nodes {
        n.wait_healthy();
    }
    nodes
}

// Defect 4: a stopped member of a 2-member cluster is refused, from its db's members bucket,
// and failing that from `initial-cluster`.
#[test]
fn a_stopped_member_of_a_cluster_is_refused() {
    stopped_member_is_refused(&v35());
}

#[test]
fn a_stopped_member_of_a_cluster_is_refused_on_etcd_34() {
    stopped_member_is_refused(&v34());
}

fn stopped_member_is_refused(flavor: &Flavor) {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", flavor);
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let nodes = pair(tmp.path(), flavor);
    nodes[0].fill("k/", 10);
    let before = nodes[0].dump();
    nodes[1].stop();
    let member = nodes[1].data_dir().join("member");
    let ino = fs::metadata(&member).unwrap().ino();
    let run = Agent::restore(&nodes[1], archive.to_str().unwrap(), &["--skip-backup"]).run();
    let msg = run.failure();
    assert_eq!(run.code(), 3, "{msg}");
    assert!(
        msg.contains("2 etcd members according to the members bucket"),
        "{msg}"
    );
    assert!(msg.contains("m0, m1"), "{msg}");
    assert_eq!(fs::metadata(&member).unwrap().ino(), ino);
    assert!(!nodes[1].running());
    nodes[1].start();
    nodes[1].wait_healthy();
    assert_eq!(nodes[1].dump(), before, "the member rejoins with its data");
    assert_eq!(nodes[0].member_names().len(), 2);

    // No db: the config's initial-cluster tells.
    nodes[1].stop();
    fs::rename(&member, tmp.path().join("aside")).unwrap();
    let msg = Agent::restore(&nodes[1], archive.to_str().unwrap(), &["--skip-backup"])
        .run()
        .failure();
    assert!(msg.contains("according to `initial-cluster`"), "{msg}");
    assert!(!member.exists());
}

// Defect 4: a TLS failure or a timeout is an error, not a stopped etcd.
#[test]
fn tls_failures_and_timeouts_are_not_offline() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let node = single_tls(tmp.path(), "tls", &v35());
    node.put("k", "v");
    let before = node.dump();
    // A config whose CA is another one: the handshake fails.
    let other = make_tls(&tmp.path().join("other"));
    let text = fs::read_to_string(node.config_path()).unwrap();
    let tls = node.tls.as_ref().unwrap();
    let bad = tmp.path().join("bad-ca.yml");
    fs::write(
        &bad,
        text.replace(
            &format!("{}/ca.crt", tls.display()),
            &format!("{}/ca.crt", other.display()),
        ),
    )
    .unwrap();
    let run = Agent::restore(&node, archive.to_str().unwrap(), &["--skip-backup"])
        .env("ETCD_ACTIONS_ETCD_CONFIG", &bad)
        .run();
    let msg = run.failure();
    assert!(!msg.contains("restored"), "{msg}");
    assert_eq!(node.dump(), before);
    assert_eq!(
        files_in(&node.data_dir().join(".etcd-actions")),
        vec!["lock".to_string()]
    );

    // A port that accepts connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hole.local_addr().unwrap().port();
    let plain = Node::single(tmp.path(), "plain", &v35());
    let text = fs::read_to_string(plain.config_path())
        .unwrap()
        .replace(&plain.client.to_string(), &port.to_string());
    let cfg = tmp.path().join("hole.yml");
    fs::write(&cfg, text).unwrap();
    let before = plain.dump();
    let msg = Agent::restore(&plain, archive.to_str().unwrap(), &["--skip-backup"])
        .env("ETCD_ACTIONS_ETCD_CONFIG", &cfg)
        .run()
        .failure();
    assert!(!msg.contains("restored"), "{msg}");
    assert_eq!(plain.dump(), before);
    drop(hole);
}

// Defect 5: a write acknowledged after the pre-restore backup survives: the replaced member dir
// is kept, reported, and dropped only by the next successful restore.
#[test]
fn writes_after_the_backup_are_kept() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("new/", 10);
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("old/", 10);
    // The stop command acknowledges one more write, then stops etcd.
    let stop = format!(
        "ETCDCTL_API=3 {ctl} --endpoints={ep} put late-key late-write-0123456789 >/dev/null && {stop}",
        ctl = node.flavor.etcdctl.display(),
        ep = node.endpoint(),
        stop = node.stop_command()
    );
    let backups = tmp.path().join("backups");
    let r = Agent::restore(
        &node,
        archive.to_str().unwrap(),
        &["--target", backups.to_str().unwrap()],
    )
    .env("ETCD_ACTIONS_STOP_COMMAND", &stop)
    .run()
    .success();
    assert_eq!(node.dump(), src.dump());
    let prev = PathBuf::from(r["restore"]["previous-data"].as_str().unwrap());
    assert_eq!(prev, node.data_dir().join(".etcd-actions/previous-member"));
    assert!(r["restore"]["previous-data-note"]
        .as_str()
        .unwrap()
        .contains("to go back"));
    assert!(r["restore"]["downtime"].as_str().unwrap().ends_with('s'));
    // The backup archive does not hold the late write; the kept member dir does.
    let grep = |dir: &Path| {
        Command::new("grep")
            .args(["-rqa", "late-write-0123456789"])
            .arg(dir)
            .status()
            .unwrap()
            .success()
    };
    let extracted = extract_db(
        Path::new(r["backup"]["path"].as_str().unwrap()),
        &tmp.path().join("bk"),
    );
    assert!(
        !grep(&extracted),
        "the backup was taken before the late write"
    );
    assert!(grep(&prev), "the late write is in the kept member dir");

    // Going back as the note says brings the late write back.
    node.stop();
    let member = node.data_dir().join("member");
    fs::rename(&member, tmp.path().join("restored-aside")).unwrap();
    fs::rename(&prev, &member).unwrap();
    node.start();
    node.wait_healthy();
    assert_eq!(
        node.ctl_ok(&["get", "late-key", "--print-value-only"])
            .trim(),
        "late-write-0123456789"
    );
    // The next successful restore replaces the kept dir with the one it replaced.
    let r = Agent::restore(&node, archive.to_str().unwrap(), &["--skip-backup"])
        .run()
        .success();
    assert_eq!(r["restore"]["previous-data"].as_str(), prev.to_str());
    assert!(grep(&prev));
    assert_eq!(
        files_in(&node.data_dir().join(".etcd-actions")),
        kept_previous()
    );
}

// Defect 7: a member dir that is a symlink to another place is refused, saying why.
#[test]
fn a_symlinked_member_dir_is_refused() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let node = Node::prepare(tmp.path(), "unit", &v35());
    let elsewhere = tmp.path().join("other-volume/member");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::create_dir_all(node.data_dir()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, node.data_dir().join("member")).unwrap();
    node.start_alone();
    node.fill("k/", 5);
    let before = node.dump();
    let run = Agent::restore(&node, archive.to_str().unwrap(), &["--skip-backup"]).run();
    let msg = run.failure();
    assert_eq!(run.code(), 3, "{msg}");
    assert!(msg.contains("is a symlink to"), "{msg}");
    assert!(msg.contains("orphaned"), "{msg}");
    assert_eq!(node.dump(), before);
    assert!(fs::symlink_metadata(node.data_dir().join("member"))
        .unwrap()
        .file_type()
        .is_symlink());
}

/// Rewrites an archive's manifest with `edit`, keeping everything else.
fn with_manifest(archive: &Path, out: &Path, edit: impl Fn(&str) -> String) {
    let dir = out.with_extension("d");
    let db = extract_db(archive, &dir);
    let manifest = fs::read_to_string(dir.join("manifest.yaml")).unwrap();
    fs::write(dir.join("manifest.yaml"), edit(&manifest)).unwrap();
    let st = Command::new("tar")
        .arg("czf")
        .arg(out)
        .arg("-C")
        .arg(&dir)
        .args(["./db", "./manifest.yaml"])
        .status()
        .unwrap();
    assert!(st.success() && db.exists());
}

// Defect 8: a manifest with a false revision is refused before etcd is stopped.
#[test]
fn a_false_manifest_revision_is_refused_before_the_stop() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("k/", 10);
    let (archive, r) = snapshot(&src, &tmp.path().join("snaps"));
    let rev = r["snapshot"]["revision"].as_str().unwrap().to_string();
    let forged = tmp.path().join("forged.tar.gz");
    with_manifest(&archive, &forged, |m| {
        m.replace(&format!("revision: {rev}"), "revision: 999999")
    });
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("mine/", 5);
    let before = (node.dump(), node.cluster_id(), node.pid());
    let run = Agent::restore(&node, forged.to_str().unwrap(), &["--skip-backup"]).run();
    let msg = run.failure();
    assert_eq!(run.code(), 3, "{msg}");
    assert!(msg.contains("revision 999999"), "{msg}");
    assert_eq!(
        (node.dump(), node.cluster_id(), node.pid()),
        before,
        "etcd was not stopped"
    );
}

// A db with a valid trailer that the restore tool rejects is a refused archive (exit 3).
#[test]
fn a_crafted_db_with_a_valid_trailer_is_refused() {
    use sha2::Digest;
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    let before = (node.dump(), node.pid());
    let mut db: Vec<u8> = (0..8 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let sum = sha2::Sha256::digest(&db);
    db.extend_from_slice(&sum);
    let dir = tmp.path().join("crafted");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("db"), &db).unwrap();
    let archive = tmp.path().join("crafted.tar.gz");
    let st = Command::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(&dir)
        .arg("./db")
        .status()
        .unwrap();
    assert!(st.success());
    let run = Agent::restore(&node, archive.to_str().unwrap(), &["--skip-backup"]).run();
    let msg = run.failure();
    assert_eq!(run.code(), 3, "{msg}");
    assert!(msg.contains("not a valid etcd snapshot"), "{msg}");
    assert_eq!((node.dump(), node.pid()), before);
}

// Defect 9: a stop command that never returns is killed with its process group; the journal
// stays and the next run recovers.
#[test]
fn a_hung_stop_command_is_killed_and_the_next_run_recovers() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let node = Node::single(tmp.path(), "unit", &v35());
    node.fill("old/", 10);
    let before = node.dump();
    let pids = tmp.path().join("hung.pids");
    let stop = format!(
        "sleep 1000 & echo $! >> {p}; echo $$ >> {p}; wait",
        p = pids.display()
    );
    let run = Agent::restore(&node, archive.to_str().unwrap(), &["--skip-backup"])
        .env("ETCD_ACTIONS_STOP_COMMAND", &stop)
        .env("ETCD_ACTIONS_SERVICE_TIMEOUT", "2")
        .run();
    let msg = run.failure();
    assert!(msg.contains("did not finish within 2s"), "{msg}");
    for pid in fs::read_to_string(&pids).unwrap().split_whitespace() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.contains(") Z ") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "process {pid} of the stop command lives on"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let state = node.data_dir().join(".etcd-actions");
    assert!(
        state.join("restore-journal.yaml").exists(),
        "the journal is kept: {:?}",
        files_in(&state)
    );
    // The next run (a snapshot) recovers: etcd runs with its old data, nothing left over.
    let r = Agent::snapshot(&node, tmp.path().join("after").to_str().unwrap())
        .run()
        .success();
    assert!(node.running());
    assert_eq!(node.dump(), before);
    assert_eq!(r["snapshot"]["keys"].as_str(), Some("10"));
    assert_eq!(files_in(&state), vec!["lock".to_string()]);
}

// Defect 10: the snapshot is opened once; a FIFO put in its place afterwards is never read,
// and a FIFO given as the snapshot is refused at once.
#[test]
fn the_snapshot_is_opened_once_and_fifos_never_block() {
    let tmp = tempdir();
    let src = Node::single(tmp.path(), "src", &v35());
    src.fill("new/", 10);
    let (archive, _) = snapshot(&src, &tmp.path().join("snaps"));
    let node = Node::single(tmp.path(), "unit", &v35());
    let fifo = tmp.path().join("fifo.tar.gz");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let run = Agent::restore(&node, fifo.to_str().unwrap(), &["--skip-backup"]).run();
    let msg = run.failure();
    assert_eq!(run.code(), 3, "{msg}");
    assert!(msg.contains("not a regular file"), "{msg}");
    // A symlink is not followed either.
    let link = tmp.path().join("link.tar.gz");
    std::os::unix::fs::symlink(&archive, &link).unwrap();
    let msg = Agent::restore(&node, link.to_str().unwrap(), &["--skip-backup"])
        .run()
        .failure();
    assert!(msg.contains("symlink"), "{msg}");

    let ctl = tmp.path().join("ctl");
    fs::create_dir(&ctl).unwrap();
    let swapped = tmp.path().join("swapped.tar.gz");
    fs::copy(&archive, &swapped).unwrap();
    let mut child = Agent::restore(&node, swapped.to_str().unwrap(), &["--skip-backup"])
        .env(
            "ETCD_ACTIONS_PAUSE",
            format!("snapshot-opened:{}", ctl.display()),
        )
        .spawn();
    wait_reached(&ctl, "snapshot-opened", &mut child);
    fs::rename(&swapped, tmp.path().join("moved.tar.gz")).unwrap();
    let st = Command::new("mkfifo").arg(&swapped).status().unwrap();
    assert!(st.success());
    go(&ctl, "snapshot-opened");
    let out = wait_ok(child);
    let y: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(
        y["results"]["restore"]["sha256"].as_str().unwrap(),
        sha256_file(&archive)
    );
    assert_eq!(node.dump(), src.dump());
}

// copy.cmd quotes a path that needs quoting.
#[test]
fn copy_cmd_quotes_the_path() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "unit", &v35());
    let target = tmp.path().join("with space's");
    let r = Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let cmd = r["copy"]["cmd"].as_str().unwrap();
    let path = r["snapshot"]["path"].as_str().unwrap();
    // The shell gives the path back whole.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("set -- {cmd}; printf %s \"$2\""))
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(host.ends_with(&format!(":{path}")), "{cmd} -> {host}");
}
