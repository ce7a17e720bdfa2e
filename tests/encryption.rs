//! Encrypted archives (age) and store objects written once: against real etcd, the real S3
//! server (s3s-fs, behind a proxy that logs every request) and the stock `age` CLI.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use crate::util::*;

const BUCKET: &str = "etcd-backups";

/// The stock age CLI (Debian's package `age`).
fn age_bin(tool: &str) -> PathBuf {
    let p = PathBuf::from(format!("/usr/bin/{tool}"));
    assert!(
        p.exists(),
        "{tool} is not installed: run scripts/install-deps"
    );
    p
}

/// A new age key file; returns it and its recipient.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new(age_bin("age-keygen"))
        .arg("-o")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(age_bin("age-keygen"))
        .arg("-y")
        .arg(&key)
        .output()
        .unwrap();
    (
        key,
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

/// `age -d -i key archive`: the plaintext, or the failure.
pub fn age_decrypt(key: &Path, archive: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new(age_bin("age"))
        .arg("-d")
        .arg("-i")
        .arg(key)
        .arg(archive)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// An HTTP proxy in front of the S3 server that keeps every byte clients send: the test's
/// request log. Plain TCP relaying; requests stay signed for the server's own check.
struct LoggingProxy {
    port: u16,
    log: Arc<Mutex<Vec<u8>>>,
}

impl LoggingProxy {
    fn start(upstream: u16) -> LoggingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared = log.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let log = shared.clone();
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                log.lock().unwrap().extend_from_slice(&buf[..n]);
                                if s_write.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        LoggingProxy { port, log }
    }

    /// The request heads sent so far (request line and headers of each request), lowercased.
    fn heads(&self) -> Vec<String> {
        let log = self.log.lock().unwrap();
        let text = String::from_utf8_lossy(&log);
        let mut out = Vec::new();
        for (i, _) in text.match_indices(" HTTP/1.1\r\n") {
            let start = text[..i].rfind("\r\n\r\n").map_or(0, |p| p + 4);
            let start = ["PUT ", "POST ", "GET ", "HEAD ", "DELETE "]
                .iter()
                .filter_map(|m| text[start..i].rfind(m).map(|p| start + p))
                .max()
                .unwrap_or(start);
            let end = text[i..].find("\r\n\r\n").map_or(text.len(), |p| i + p);
            out.push(text[start..end].to_ascii_lowercase());
        }
        out
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Standalone agent settings for the store, through `endpoint`.
fn via(agent: Agent, s3: &S3, endpoint: &str, path: &str) -> Agent {
    s3.env(agent, BUCKET, path)
        .env("ETCD_ACTIONS_S3_ENDPOINT", endpoint)
}

fn crc64nvme_b64(path: &Path) -> String {
    use base64::Engine;
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    d.update(&fs::read(path).unwrap());
    base64::engine::general_purpose::STANDARD.encode(d.finalize().to_be_bytes())
}

#[test]
fn encrypted_archives_open_with_stock_age_and_restore_only_with_an_identity() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let proxy = LoggingProxy::start(s3.port);
    let node = Node::single(tmp.path(), "enc", &v35());
    node.fill("k/", 30);
    node.put("secret/db-password", "hunter2-plaintext-marker");
    let (online, r_online) = keygen(tmp.path(), "online.txt");
    let (breakglass, r_breakglass) = keygen(tmp.path(), "breakglass.txt");
    let (stranger, _) = keygen(tmp.path(), "stranger.txt");
    let target = tmp.path().join("snaps");
    let t = target.to_str().unwrap();
    let ep = proxy.endpoint();

    // Two recipients: one by flag, one by the env var.
    let r = via(
        Agent::standalone(
            &node,
            &["snapshot", "--target", t, "--encrypt-to", &r_online],
        ),
        &s3,
        &ep,
        "",
    )
    .env("ETCD_ACTIONS_ENCRYPT_TO", format!("{r_breakglass}\n"))
    .run()
    .success();
    // (The flag is given, so clap takes the flag over the env var: only one recipient.)
    let path = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.ends_with(".tar.gz.age"), "{name}");
    assert_eq!(r["snapshot"]["encryption"].as_str(), Some("age"));
    assert_sidecar_ok(&path);
    let bytes = fs::read(&path).unwrap();
    assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
    assert!(
        !bytes.windows(9).any(|w| w == b"hunter2-p"),
        "no plaintext in the archive"
    );
    // The object is the same bytes; its record is readable and holds no key or value.
    let key = format!("etcd/{name}");
    let object = s3.dir.join(BUCKET).join(&key);
    assert_eq!(sha256_file(&object), sha256_file(&path));
    let record =
        fs::read_to_string(s3.dir.join(BUCKET).join(format!("{key}.manifest.yaml"))).unwrap();
    assert!(record.contains("encryption: age"), "{record}");
    assert!(record.contains(&r_online), "{record}");
    assert!(
        !record.contains("hunter2") && !record.contains("secret/db"),
        "{record}"
    );
    assert_eq!(
        fs::read_to_string(target.join(format!("{name}.manifest.yaml"))).unwrap(),
        record,
        "the local record is the store's"
    );

    // The stock age CLI opens it into exactly the .tar.gz we write: db + manifest.
    let plain = age_decrypt(&online, &path).expect("age -d with the online key");
    assert_eq!(&plain[..2], &[0x1f, 0x8b]);
    let unpacked = tmp.path().join("by-hand");
    fs::create_dir_all(&unpacked).unwrap();
    fs::write(tmp.path().join("by-hand.tar.gz"), &plain).unwrap();
    let tar = Command::new("tar")
        .arg("xzf")
        .arg(tmp.path().join("by-hand.tar.gz"))
        .arg("-C")
        .arg(&unpacked)
        .output()
        .unwrap();
    assert!(tar.status.success(), "{tar:?}");
    let manifest = fs::read_to_string(unpacked.join("manifest.yaml")).unwrap();
    let db_sha = sha256_file(&unpacked.join("db"));
    assert!(manifest.contains(&db_sha), "{manifest}");
    assert!(age_decrypt(&stranger, &path).is_err());

    // A second snapshot to both recipients through the env var alone.
    node.put("k/more", "1");
    let r2 = via(
        Agent::standalone(&node, &["snapshot", "--target", t]),
        &s3,
        &ep,
        "",
    )
    .env(
        "ETCD_ACTIONS_ENCRYPT_TO",
        format!("{r_online},{r_breakglass}"),
    )
    .run()
    .success();
    let path2 = PathBuf::from(r2["snapshot"]["path"].as_str().unwrap());
    assert!(age_decrypt(&online, &path2).is_ok());
    assert!(
        age_decrypt(&breakglass, &path2).is_ok(),
        "the break-glass key opens it too"
    );
    let name2 = path2.file_name().unwrap().to_str().unwrap().to_string();

    // Without the identity: list-backups, if-changed, and prune still work.
    let list = via(
        Agent::standalone(&node, &["list-backups", "--target", t]),
        &s3,
        &ep,
        "",
    )
    .run()
    .success();
    let first = &list["backups"]["0"];
    assert_eq!(first["id"].as_str(), Some(name2.as_str()));
    assert_eq!(first["where"].as_str(), Some("both"));
    assert_eq!(first["encryption"].as_str(), Some("age"));
    assert_eq!(
        first["revision"].as_str(),
        Some(r2["snapshot"]["revision"].as_str().unwrap())
    );
    let again = via(
        Agent::standalone(&node, &["snapshot", "--target", t, "--if-changed"]),
        &s3,
        &ep,
        "",
    )
    .env("ETCD_ACTIONS_ENCRYPT_TO", &r_online)
    .run()
    .success();
    assert!(again["snapshot"]["skipped"].as_str().is_some(), "{again:?}");

    // Restore without an identity, or with one that is not a recipient: refused, exit 3,
    // nothing changed.
    let before = node.dump();
    let no_key = via(
        Agent::standalone(&node, &["restore", "--backup-id", &name2, "--target", t]),
        &s3,
        &ep,
        "",
    )
    .run();
    assert_eq!(no_key.code(), 3, "{}", no_key.stderr());
    let msg = no_key.failure();
    assert!(
        msg.contains("encrypted") && msg.contains("--identity-file"),
        "{msg}"
    );
    let wrong = via(
        Agent::standalone(&node, &["restore", "--backup-id", &name2, "--target", t]),
        &s3,
        &ep,
        "",
    )
    .env("ETCD_ACTIONS_IDENTITY_FILE", &stranger)
    .run();
    assert_eq!(wrong.code(), 3, "{}", wrong.stderr());
    assert!(
        wrong.failure().contains("cannot be decrypted"),
        "{}",
        wrong.failure()
    );
    assert!(node.running());
    assert_eq!(node.dump(), before);

    // Altered or cut ciphertext, given by path (no sidecar to catch it first): refused.
    let bad = tmp.path().join("bad");
    fs::create_dir_all(&bad).unwrap();
    let mut flipped = bytes.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x40;
    fs::write(bad.join("flipped.tar.gz.age"), &flipped).unwrap();
    fs::write(bad.join("cut.tar.gz.age"), &bytes[..bytes.len() - 100]).unwrap();
    for f in ["flipped.tar.gz.age", "cut.tar.gz.age"] {
        let p = bad.join(f);
        let out = Agent::restore(&node, p.to_str().unwrap(), &[])
            .env("ETCD_ACTIONS_IDENTITY_FILE", &online)
            .run();
        assert_eq!(out.code(), 3, "{f}: {}", out.stderr());
        assert!(node.running());
        assert_eq!(node.dump(), before, "{f}");
    }
    let identity_text = fs::read_to_string(&online).unwrap();
    let secret_line = identity_text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();

    // From the store (an empty target), with the break-glass identity: restored exactly.
    let empty = tmp.path().join("empty");
    let restored = via(
        Agent::standalone(
            &node,
            &[
                "restore",
                "--backup-id",
                &name2,
                "--target",
                empty.to_str().unwrap(),
            ],
        ),
        &s3,
        &ep,
        "",
    )
    .env("ETCD_ACTIONS_IDENTITY_FILE", &breakglass)
    .env("ETCD_ACTIONS_ENCRYPT_TO", &r_online)
    .run();
    let out = restored.stdout() + &restored.stderr();
    assert!(!out.contains(secret_line), "the identity is never printed");
    restored.success();
    node.wait_healthy();
    // The pre-restore backup of what was replaced is encrypted to the recipients too.
    let backups: Vec<String> = files_in(&empty)
        .into_iter()
        .filter(|f| f.starts_with("etcd-backup-") && f.ends_with(".tar.gz.age"))
        .collect();
    assert_eq!(backups.len(), 1, "{:?}", files_in(&empty));
    assert!(age_decrypt(&online, &empty.join(&backups[0])).is_ok());
    assert_eq!(
        node.ctl_ok(&["get", "secret/db-password", "--print-value-only"])
            .trim(),
        "hunter2-plaintext-marker"
    );
    assert_eq!(
        node.ctl_ok(&["get", "k/more", "--print-value-only"]).trim(),
        "1"
    );
    // No plaintext archive was left anywhere in the state dir.
    let state = node.data_dir().join(".etcd-actions");
    for f in files_in(&state) {
        assert!(!f.ends_with(".tar.gz"), "{f} in the state dir");
    }

    // verify (newest) with the identity, and its drill: through the decrypting reader.
    let v = via(
        Agent::standalone(&node, &["verify", "--target", t, "--deep"]),
        &s3,
        &ep,
        "",
    )
    .env("ETCD_ACTIONS_IDENTITY_FILE", &online)
    .run()
    .success();
    assert!(format!("{v:?}").contains(&name2), "{v:?}");
    assert_eq!(v["verify"]["drill"].as_str(), Some("passed"), "{v:?}");

    // No copy was ever asked of the server.
    let heads = proxy.heads();
    assert!(!heads.is_empty());
    assert!(
        !heads.iter().any(|h| h.contains("x-amz-copy-source")),
        "a CopyObject or UploadPartCopy was sent"
    );
}

#[test]
fn uploads_go_straight_to_their_key_in_many_parts_with_a_full_object_checksum() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let proxy = LoggingProxy::start(s3.port);
    let node = Node::single(tmp.path(), "parts", &v35());
    // About 30 MB of random values written as hex: an archive of 19 to 22 MB (deflate takes
    // hex to about half), at least four 5 MiB parts.
    let value: String = {
        let mut f = fs::File::open("/dev/urandom").unwrap();
        let mut raw = vec![0u8; 300 * 1024];
        f.read_exact(&mut raw).unwrap();
        raw.iter().map(|b| format!("{b:02x}")).collect()
    };
    let file = tmp.path().join("value");
    fs::write(&file, &value).unwrap();
    for i in 0..50 {
        // A different value each time: etcdctl put reads it from stdin.
        let mut v = value.clone();
        v.replace_range(0..8, &format!("{i:08}"));
        let out = run_with_stdin(node.ctl().args(["put", &format!("big/{i}")]), v.as_bytes());
        assert!(out.status.success(), "{out:?}");
    }
    let target = tmp.path().join("snaps");
    let t = target.to_str().unwrap();
    let r = via(
        Agent::standalone(&node, &["snapshot", "--target", t]),
        &s3,
        &proxy.endpoint(),
        "many",
    )
    .run()
    .success();
    let path = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let key = format!("many/etcd/{name}");
    let bytes: u64 = r["snapshot"]["bytes"]
        .as_u64()
        .or_else(|| r["snapshot"]["bytes"].as_str().and_then(|b| b.parse().ok()))
        .unwrap();
    assert!(bytes > 16 << 20, "{r:?}");
    assert_eq!(
        sha256_file(&s3.dir.join(BUCKET).join(&key)),
        sha256_file(&path)
    );

    let heads = proxy.heads();
    assert!(
        !heads.iter().any(|h| h.contains("x-amz-copy-source")),
        "no copy"
    );
    // Every part went to the final key (no temp key), and there were several.
    let parts: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("put ") && h.contains("partnumber="))
        .collect();
    assert!(parts.len() >= 4, "{} parts", parts.len());
    let final_path = format!("/{BUCKET}/{key}").to_ascii_lowercase();
    for p in &parts {
        assert!(p.contains(&final_path), "{p}");
    }
    // The completion: never over an object, with the whole object's CRC64NVME.
    let complete: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("post ") && h.contains("uploadid="))
        .collect();
    assert_eq!(complete.len(), 1, "{complete:?}");
    let c = complete[0];
    assert!(c.contains(&final_path), "{c}");
    assert!(c.contains("if-none-match: *"), "{c}");
    assert!(c.contains("x-amz-checksum-type: full_object"), "{c}");
    let crc = crc64nvme_b64(&path).to_ascii_lowercase();
    assert!(
        c.contains(&format!("x-amz-checksum-crc64nvme: {crc}")),
        "{c}\n{crc}"
    );
    // The record is written after the completion, and written once.
    let record_put = heads
        .iter()
        .position(|h| h.starts_with("put ") && h.contains(".manifest.yaml"))
        .expect("a record was written");
    let completed_at = heads.iter().position(|h| std::ptr::eq(h, c)).unwrap();
    assert!(record_put > completed_at);
    assert!(
        heads[record_put].contains("if-none-match: *"),
        "{}",
        heads[record_put]
    );
}

#[test]
fn incomplete_and_legacy_objects_are_told_apart() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let node = Node::single(tmp.path(), "legacy", &v35());
    node.fill("k/", 20);
    let target = tmp.path().join("snaps");
    let t = target.to_str().unwrap();
    let r = s3
        .env(
            Agent::standalone(&node, &["snapshot", "--target", t]),
            BUCKET,
            "",
        )
        .run()
        .success();
    let path = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let folder = s3.dir.join(BUCKET).join("etcd");
    // An archive object whose record was never written (an upload killed in between), named
    // as a newer archive.
    let orphan = name.replace(".tar.gz", "-9.tar.gz");
    fs::copy(folder.join(&name), folder.join(&orphan)).unwrap();
    let list = s3
        .env(
            Agent::standalone(&node, &["list-backups", "--target", "/nonexistent"]),
            BUCKET,
            "",
        )
        .run()
        .success();
    let text = format!("{list:?}");
    let entries: Vec<&serde_yaml::Value> = (0..2)
        .map(|i| &list["backups"][i.to_string().as_str()])
        .collect();
    let incomplete = entries
        .iter()
        .find(|e| e["id"].as_str() == Some(orphan.as_str()))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(incomplete["incomplete"].as_str().is_some(), "{text}");
    // verify picks the newest complete archive, never the incomplete one.
    let v = s3
        .env(
            Agent::standalone(&node, &["verify", "--target", "/nonexistent"]),
            BUCKET,
            "",
        )
        .run()
        .success();
    assert!(format!("{v:?}").contains(&name), "{v:?}");
    // Restoring it by id is refused: it has no record.
    let out = s3
        .env(
            Agent::standalone(
                &node,
                &[
                    "restore",
                    "--backup-id",
                    &orphan,
                    "--target",
                    "/nonexistent",
                ],
            ),
            BUCKET,
            "",
        )
        .run();
    assert_eq!(out.code(), 3, "{}", out.stderr());
    assert!(
        out.failure().contains("never finished"),
        "{}",
        out.failure()
    );
    // prune keeps it while it is young, and removes it past 24 h.
    let prune = |now: Option<u64>| {
        let mut a = s3.env(
            Agent::standalone(&node, &["prune", "--target", t, "--keep-last", "5"]),
            BUCKET,
            "",
        );
        if let Some(n) = now {
            a = a.env("ETCD_ACTIONS_TEST_NOW", n.to_string());
        }
        a.run().success()
    };
    prune(None);
    assert!(folder.join(&orphan).exists());
    let later = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 25 * 3600;
    let p = prune(Some(later));
    assert!(format!("{p:?}").contains("never finished"), "{p:?}");
    assert!(!folder.join(&orphan).exists());
    assert!(folder.join(&name).exists(), "the complete archive stays");
    assert!(folder.join(format!("{name}.manifest.yaml")).exists());
}

#[test]
fn juju_reads_the_keys_from_the_configured_secret() {
    let tmp = tempdir();
    let node = Node::single(tmp.path(), "jenc", &v35());
    node.fill("k/", 10);
    let (online, r_online) = keygen(tmp.path(), "online.txt");
    let (breakglass, r_breakglass) = keygen(tmp.path(), "breakglass.txt");
    let juju = Juju::new(tmp.path(), "etcd/0");
    let uri = "secret:cs8d8k3mp25c7r5sd7eg";
    let set_secret = |content: serde_json::Value| {
        fs::write(
            juju.state.join("secrets.json"),
            serde_json::json!({ uri: content }).to_string(),
        )
        .unwrap();
    };
    fs::write(
        juju.state.join("config.json"),
        serde_json::json!({"backup-encryption-secret": uri}).to_string(),
    )
    .unwrap();
    // A unit that only takes backups: recipients only.
    set_secret(serde_json::json!({"recipients": format!("{r_online}\n{r_breakglass}\n")}));
    let target = tmp.path().join("snaps");
    juju.reset();
    juju.params(
        "snapshot",
        serde_json::json!({"target": target.to_str().unwrap()}),
    );
    let r = Agent::juju(&node, &juju, "snapshot").run().juju_ok(&juju);
    let path = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
    assert!(path.to_str().unwrap().ends_with(".tar.gz.age"), "{r:?}");
    assert!(age_decrypt(&online, &path).is_ok());
    assert!(age_decrypt(&breakglass, &path).is_ok());
    let calls = juju.calls();
    assert!(
        calls.contains(&format!(
            "[\"secret-get\", \"{uri}\", \"--refresh\", \"--format=json\"]"
        )),
        "{calls}"
    );

    // verify without an identity in the secret: refused, naming the option.
    let verify = |juju: &Juju| {
        juju.reset();
        juju.params(
            "verify",
            serde_json::json!({"target": target.to_str().unwrap()}),
        );
        Agent::juju(&node, juju, "verify").run()
    };
    let msg = verify(&juju).juju_failed(&juju);
    assert!(
        msg.contains("encrypted") && msg.contains("backup-encryption-secret"),
        "{msg}"
    );

    // With the identity in the secret: verified; the identity is in no log, result or argv.
    let identity = fs::read_to_string(&online).unwrap();
    set_secret(serde_json::json!({
        "recipients": r_online,
        "identity": identity,
    }));
    let v = verify(&juju).juju_ok(&juju);
    assert_eq!(
        v["verify"]["id"].as_str(),
        path.file_name().unwrap().to_str()
    );
    let secret_line = identity
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    for (what, text) in [
        ("results", v.to_string()),
        ("log", juju.log()),
        ("calls", juju.calls()),
    ] {
        assert!(!text.contains(secret_line), "the identity is in the {what}");
    }

    // config-changed with a secret that cannot be read: blocked, naming the option.
    let units = tmp.path().join("units");
    fs::create_dir_all(&units).unwrap();
    let hook = juju.config_hook(tmp.path(), &units);
    let (code, stderr) = hook(serde_json::json!({
        "backup-encryption-secret": "secret:notgranted0000000000",
        "backup-schedule": "",
    }));
    assert_eq!(code, Some(0), "{stderr}");
    let statuses = juju.statuses();
    assert!(
        statuses.contains("blocked") && statuses.contains("backup-encryption-secret"),
        "{statuses}"
    );
}

#[test]
fn objects_written_before_records_are_still_read() {
    use object_store::{Attribute, Attributes, ObjectStore, PutOptions};
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let node = Node::single(tmp.path(), "old", &v35());
    node.fill("k/", 15);
    let target = tmp.path().join("snaps");
    let r = Agent::snapshot(&node, target.to_str().unwrap())
        .run()
        .success();
    let path = PathBuf::from(r["snapshot"]["path"].as_str().unwrap());
    let name = path.file_name().unwrap().to_str().unwrap().to_string();
    let sha = r["snapshot"]["sha256"].as_str().unwrap().to_string();
    let revision = r["snapshot"]["revision"].as_str().unwrap().to_string();
    let cluster = r["snapshot"]["cluster-id"].as_str().unwrap().to_string();
    // The object as the previous version published it: the archive, its facts in the object's
    // user metadata, and no record beside it.
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_bucket_name(BUCKET)
        .with_region("us-east-1")
        .with_access_key_id(&s3.access)
        .with_secret_access_key(&s3.secret)
        .with_allow_http(true)
        .build()
        .unwrap();
    let mut attributes = Attributes::new();
    for (k, v) in [
        ("format-version", "1".to_string()),
        ("sha256", sha.clone()),
        ("revision", revision.clone()),
        ("cluster-id", cluster),
        ("created", "2026-11-29T10:00:00Z".to_string()),
        ("source", "snapshot-api".to_string()),
        ("unit", "etcd/0".to_string()),
    ] {
        attributes.insert(Attribute::Metadata(k.into()), v.into());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(store.put_opts(
        &object_store::path::Path::from(format!("etcd/{name}")),
        fs::read(&path).unwrap().into(),
        PutOptions {
            attributes,
            ..Default::default()
        },
    ))
    .unwrap();
    assert_eq!(s3.objects(BUCKET, ""), vec![format!("etcd/{name}")]);
    let list = s3
        .env(
            Agent::standalone(&node, &["list-backups", "--target", "/nonexistent"]),
            BUCKET,
            "",
        )
        .run()
        .success();
    let first = &list["backups"]["0"];
    assert_eq!(first["id"].as_str(), Some(name.as_str()), "{list:?}");
    assert!(first["incomplete"].is_null(), "{list:?}");
    assert_eq!(first["sha256"].as_str(), Some(sha.as_str()));
    assert_eq!(first["revision"].as_str(), Some(revision.as_str()));
    // Restored by id from the store, checked against the metadata's sha256.
    node.put("k/after", "written after the snapshot");
    let restored = s3
        .env(
            Agent::standalone(
                &node,
                &[
                    "restore",
                    "--backup-id",
                    &name,
                    "--target",
                    "/nonexistent",
                    "--skip-backup",
                ],
            ),
            BUCKET,
            "",
        )
        .run()
        .success();
    assert!(format!("{restored:?}").contains("sha256"), "{restored:?}");
    node.wait_healthy();
    assert!(!node.dump().contains_key("k/after"));
}

#[test]
fn an_upload_killed_before_its_record_is_finished_by_the_next_run() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let node = Node::single(tmp.path(), "killed", &v35());
    node.fill("k/", 10);
    let target = tmp.path().join("snaps");
    let t = target.to_str().unwrap();
    let snapshot = |extra: &[&str]| {
        let mut args = vec!["snapshot", "--target", t];
        args.extend_from_slice(extra);
        s3.env(Agent::standalone(&node, &args), BUCKET, "")
    };
    // Killed (abort, no cleanup) after the object was completed, before its record.
    let crashed = snapshot(&[])
        .env("FAILPOINTS", "upload-before-record=return")
        .run();
    assert_ne!(crashed.code(), 0);
    let objects = s3.objects(BUCKET, "");
    assert_eq!(objects.len(), 1, "the object, no record: {objects:?}");
    let name = objects[0].rsplit('/').next().unwrap().to_string();
    assert!(
        target.join(&name).exists(),
        "the local archive was published first"
    );
    let list = s3
        .env(
            Agent::standalone(&node, &["list-backups", "--target", t]),
            BUCKET,
            "",
        )
        .run()
        .success();
    let text = format!("{list:?}");
    assert_eq!(
        list["backups"]["0"]["where"].as_str(),
        Some("local"),
        "{text}"
    );
    assert!(
        list["backups"]["1"]["incomplete"].as_str().is_some(),
        "{text}"
    );
    // The next if-changed run finds the object is this archive (by its bytes) and writes the
    // record: nothing is uploaded twice, nothing is left incomplete.
    let r = snapshot(&["--if-changed"]).run().success();
    assert!(r["snapshot"]["skipped"].as_str().is_some(), "{r:?}");
    assert!(
        r["upload"]["url"].as_str().unwrap().ends_with(&name),
        "{r:?}"
    );
    assert_eq!(
        s3.objects(BUCKET, ""),
        vec![objects[0].clone(), format!("{}.manifest.yaml", objects[0])]
    );
    let list = s3
        .env(
            Agent::standalone(&node, &["list-backups", "--target", t]),
            BUCKET,
            "",
        )
        .run()
        .success();
    assert_eq!(
        list["backups"]["0"]["where"].as_str(),
        Some("both"),
        "{list:?}"
    );
    assert_eq!(list["count"].as_str(), Some("1"), "{list:?}");
}

#[test]
fn two_units_of_one_cluster_in_the_same_second_both_upload() {
    let tmp = tempdir();
    let s3 = S3::start(tmp.path(), &[BUCKET]);
    let nodes = cluster(tmp.path(), "same", &v35());
    nodes[0].put("k", "v");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    // Every unit's timer fires at once: the same cluster, the same second, one folder.
    let snap = |node: &Node, dir: &str| {
        let target = tmp.path().join(dir);
        let r = s3
            .env(
                Agent::standalone(node, &["snapshot", "--target", target.to_str().unwrap()]),
                BUCKET,
                "",
            )
            .env("ETCD_ACTIONS_TEST_NOW", &now)
            .run()
            .success();
        (target, r)
    };
    let (_, first) = snap(&nodes[0], "u0");
    let (t1, second) = snap(&nodes[1], "u1");
    let p0 = PathBuf::from(first["snapshot"]["path"].as_str().unwrap());
    let p1 = PathBuf::from(second["snapshot"]["path"].as_str().unwrap());
    let (n0, n1) = (
        p0.file_name().unwrap().to_str().unwrap().to_string(),
        p1.file_name().unwrap().to_str().unwrap().to_string(),
    );
    assert_eq!(n1, n0.replace(".tar.gz", "-1.tar.gz"), "{second:?}");
    assert!(second["upload"]["url"].as_str().unwrap().ends_with(&n1));
    // The renamed archive is whole, with its own sidecars; nothing else is left.
    assert_sidecar_ok(&p1);
    assert_eq!(
        files_in(&t1),
        vec![
            n1.clone(),
            format!("{n1}.manifest.yaml"),
            format!("{n1}.sha256")
        ]
    );
    let record = fs::read_to_string(t1.join(format!("{n1}.manifest.yaml"))).unwrap();
    assert!(record.contains(&format!("archive: {n1}")), "{record}");
    let mut both = vec![format!("etcd/{n0}"), format!("etcd/{n1}")];
    both.sort();
    assert_eq!(s3.archives(BUCKET, ""), both);
    assert_eq!(
        sha256_file(&s3.dir.join(BUCKET).join("etcd").join(&n1)),
        sha256_file(&p1)
    );
}
