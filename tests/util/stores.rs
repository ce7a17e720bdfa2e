//! The S3 stores the store suite runs on: s3s-fs (`S3`), moto's S3 server (`Moto`), and a strict
//! front of our own over s3s-fs (`Front`) that behaves like the old stores in the field: it
//! refuses checksum headers, ignores `If-None-Match`, changes a byte of a part on the way, and
//! has no multi-object delete.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{cache_dir, free_port, Agent, S3};

/// A store the tests can point the agent at, and look into.
pub trait TestStore {
    fn endpoint(&self) -> String;
    fn keys(&self) -> (String, String);
    /// Every key of `bucket` below `prefix`.
    fn objects(&self, bucket: &str, prefix: &str) -> Vec<String>;
    /// The bytes of an object.
    fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>>;

    /// The scheme of the urls the agent reports: `s3`, `azure`, `gs`.
    fn scheme(&self) -> &'static str {
        "s3"
    }

    /// The location label of its metrics: `store` (S3), `azure`, `gcs`.
    fn location(&self) -> &'static str {
        match self.scheme() {
            "azure" => "azure",
            "gs" => "gcs",
            _ => "store",
        }
    }

    /// Settings for a standalone agent using this store.
    fn env(&self, agent: Agent, bucket: &str, path: &str) -> Agent {
        let (access, secret) = self.keys();
        agent
            .env("ETCD_ACTIONS_S3_ENDPOINT", self.endpoint())
            .env("ETCD_ACTIONS_S3_BUCKET", bucket)
            .env("ETCD_ACTIONS_S3_PATH", path)
            .env("AWS_ACCESS_KEY_ID", access)
            .env("AWS_SECRET_ACCESS_KEY", secret)
    }

    /// The archives (records and claims aside).
    fn archives(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.objects(bucket, prefix)
            .into_iter()
            .filter(|k| !k.ends_with(".manifest.yaml") && !k.contains("/.claims/"))
            .collect()
    }
}

impl TestStore for S3 {
    fn endpoint(&self) -> String {
        S3::endpoint(self)
    }
    fn keys(&self) -> (String, String) {
        (self.access.clone(), self.secret.clone())
    }
    fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        S3::objects(self, bucket, prefix)
    }
    fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        fs::read(self.dir.join(bucket).join(key)).ok()
    }
}

/// An HTTP answer.
#[derive(Debug, Default)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a message's head: the first line and the headers.
fn read_head(r: &mut impl BufRead) -> Option<(String, Vec<(String, String)>)> {
    let mut first = String::new();
    if r.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Some((first.trim_end().to_string(), headers))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads a body: by Content-Length, chunked, or (`to_end`) until the peer closes.
fn read_body(r: &mut impl BufRead, headers: &[(String, String)], to_end: bool) -> Vec<u8> {
    let mut body = Vec::new();
    if header(headers, "transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = header(headers, "content-length") {
        body.resize(n.parse().unwrap(), 0);
        r.read_exact(&mut body).unwrap();
    } else if to_end {
        r.read_to_end(&mut body).unwrap();
    }
    body
}

/// Sends one request on a new connection and reads the answer.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Answer {
    let mut all = vec![("Host".to_string(), format!("127.0.0.1:{port}"))];
    all.extend(headers.iter().cloned());
    forward(
        port,
        &format!("{method} {path} HTTP/1.1"),
        &all,
        body,
        method == "HEAD",
    )
}

fn xml_keys(text: &str) -> Vec<String> {
    text.split("<Key>")
        .skip(1)
        .filter_map(|p| p.split_once("</Key>").map(|(k, _)| k.replace("&amp;", "&")))
        .collect()
}

/// moto's S3 server (PyPI `moto[server]`, installed by scripts/install-deps), a second
/// implementation of S3 written apart from s3s. It takes any keys. Killed by pid on drop.
pub struct Moto {
    pub port: u16,
    child: std::process::Child,
}

impl Moto {
    pub fn start(buckets: &[&str]) -> Moto {
        let lib = cache_dir().join("moto");
        assert!(
            lib.join("moto").is_dir(),
            "moto is not installed in {}: run scripts/install-deps",
            lib.display()
        );
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", &lib)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(port, "moto");
        let m = Moto { port, child };
        for b in buckets {
            let a = http(port, "PUT", &format!("/{b}"), &[], b"");
            assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        }
        m
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something listens on `port` (a server this helper started), at most a minute.
fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// moto takes any signature, but answers an unsigned GET with 403.
fn moto_auth() -> Vec<(String, String)> {
    vec![(
        "Authorization".into(),
        "AWS4-HMAC-SHA256 Credential=AKMOTOETCDACTIONS/20261204/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature=00"
            .into(),
    )]
}

impl TestStore for Moto {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn keys(&self) -> (String, String) {
        (
            "AKMOTOETCDACTIONS".into(),
            "moto-secret-do-not-print".into(),
        )
    }
    fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let a = http(
            self.port,
            "GET",
            &format!("/{bucket}?list-type=2&max-keys=1000&prefix={prefix}"),
            &moto_auth(),
            b"",
        );
        assert_eq!(a.status, 200);
        let mut keys = xml_keys(&String::from_utf8_lossy(&a.body));
        keys.sort();
        keys
    }
    fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let a = http(
            self.port,
            "GET",
            &format!("/{bucket}/{key}"),
            &moto_auth(),
            b"",
        );
        (a.status == 200).then_some(a.body)
    }
}

/// How the strict front changes a part on its way to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    /// One byte of the first part flipped, then caught by the front's own Content-MD5 check
    /// (`400 BadDigest`), as every S3 store does.
    Checked,
    /// One byte of the first part flipped and stored (the store under it does not check parts'
    /// Content-MD5), and the answer's ETag made the MD5 of what was sent: only a confirmation
    /// of the whole object can see it.
    Hidden,
}

/// What the strict front does.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// Any `x-amz-checksum-*` header: `400 InvalidRequestParameter` (MinIO before 2025-01-20).
    pub refuse_checksums: bool,
    /// `If-None-Match`: the write goes over what is there (Ceph RGW before Tentacle).
    pub ignore_conditional: bool,
    pub flip: Option<Flip>,
    /// `POST ?delete`: `501 NotImplemented` (GCS's S3 interop, Alibaba OSS).
    pub refuse_multi_delete: bool,
    /// Drops the `Authorization` header (GCS's client with `disable_oauth` sends an empty
    /// `Bearer`; the s3s-fs under it takes no keys).
    pub drop_authorization: bool,
}

impl Rules {
    /// Everything the old stores do.
    pub fn strict() -> Rules {
        Rules {
            refuse_checksums: true,
            ignore_conditional: true,
            flip: Some(Flip::Checked),
            refuse_multi_delete: true,
            drop_authorization: false,
        }
    }
}

/// What the front saw and did: one line per request (`METHOD path -> status [note]`).
#[derive(Debug, Default)]
pub struct Seen {
    pub lines: Mutex<Vec<String>>,
    pub flipped: AtomicUsize,
}

impl Seen {
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
    pub fn count(&self, what: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(what)).count()
    }
}

/// A strict front over s3s-fs (SigV4 still checked there: nothing signed is changed).
pub struct Front {
    pub s3: S3,
    pub port: u16,
    pub seen: Arc<Seen>,
}

impl Front {
    pub fn start(base: &Path, buckets: &[&str], rules: Rules) -> Front {
        let s3 = if rules.drop_authorization {
            S3::start_anonymous(base, buckets)
        } else {
            S3::start(base, buckets)
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let (upstream, dir, shared) = (s3.port, s3.dir.clone(), seen.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (dir, seen) = (dir.clone(), shared.clone());
                std::thread::spawn(move || serve(client, upstream, &dir, rules, &seen));
            }
        });
        Front { s3, port, seen }
    }
}

impl TestStore for Front {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn keys(&self) -> (String, String) {
        (self.s3.access.clone(), self.s3.secret.clone())
    }
    fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.s3.objects(bucket, prefix)
    }
    fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        TestStore::get(&self.s3, bucket, key)
    }
}

fn error_answer(status: u16, code: &str) -> Answer {
    Answer {
        status,
        headers: vec![("Content-Type".into(), "application/xml".into())],
        body: format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
             <Message>refused by the strict front</Message></Error>"
        )
        .into_bytes(),
    }
}

/// Serves one client connection, request after request.
fn serve(client: TcpStream, upstream: u16, dir: &Path, rules: Rules, seen: &Seen) {
    let mut out = client.try_clone().unwrap();
    let mut r = BufReader::new(client);
    while let Some((line, mut headers)) = read_head(&mut r) {
        let mut body = read_body(&mut r, &headers, false);
        if rules.drop_authorization {
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let mut note = String::new();
        let has = |name: &str| header(&headers, name).is_some();
        let checksum = headers.iter().any(|(k, _)| {
            let k = k.to_ascii_lowercase();
            k.starts_with("x-amz-checksum-") || k == "x-amz-sdk-checksum-algorithm"
        });
        let is_part = method == "PUT" && query.contains("partNumber=");
        let answer = if rules.refuse_checksums && checksum {
            note.push_str("refused checksum");
            error_answer(400, "InvalidRequestParameter")
        } else if rules.refuse_multi_delete
            && method == "POST"
            && query.split('&').any(|p| p == "delete" || p == "delete=")
        {
            note.push_str("refused multi-delete");
            error_answer(501, "NotImplemented")
        } else {
            if rules.ignore_conditional && has("if-none-match") {
                let _ = fs::remove_file(dir.join(etcd_actions::store::percent_decode(
                    path.trim_start_matches('/'),
                )));
                note.push_str("ignored if-none-match ");
            }
            let mut lie = None;
            if is_part
                && !body.is_empty()
                && rules.flip.is_some()
                && seen.flipped.fetch_add(1, Ordering::SeqCst) == 0
            {
                let sent = md5_hex(&body);
                let i = body.len() / 2;
                body[i] ^= 0x20;
                note.push_str("flipped a byte ");
                if rules.flip == Some(Flip::Hidden) {
                    lie = Some(sent);
                }
            }
            let md5_ok = header(&headers, "content-md5").is_none_or(|m| m == md5_b64(&body));
            if rules.flip == Some(Flip::Checked) && !md5_ok {
                note.push_str("bad digest");
                error_answer(400, "BadDigest")
            } else {
                let mut a = forward(upstream, &line, &headers, &body, method == "HEAD");
                if let (Some(sent), true) = (lie, a.status == 200) {
                    a.headers.retain(|(k, _)| !k.eq_ignore_ascii_case("etag"));
                    a.headers.push(("ETag".into(), format!("\"{sent}\"")));
                    note.push_str("etag lied");
                }
                a
            }
        };
        seen.lines.lock().unwrap().push(
            format!("{method} {path} {query} -> {} {note}", answer.status)
                .trim()
                .to_string(),
        );
        if write_answer(&mut out, &answer, method == "HEAD").is_err() {
            return;
        }
    }
}

fn md5_digest(b: &[u8]) -> [u8; 16] {
    use md5::Digest;
    md5::Md5::digest(b).into()
}

fn md5_hex(b: &[u8]) -> String {
    hex::encode(md5_digest(b))
}

fn md5_b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(md5_digest(b))
}

fn forward(port: u16, line: &str, headers: &[(String, String)], body: &[u8], head: bool) -> Answer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut text = format!("{line}\r\n");
    for (k, v) in headers {
        if !["connection", "content-length", "transfer-encoding"]
            .contains(&k.to_ascii_lowercase().as_str())
        {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    text.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    s.write_all(text.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r).expect("s3s-fs answers");
    let status = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head {
        Vec::new()
    } else {
        read_body(&mut r, &headers, true)
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn write_answer(out: &mut TcpStream, a: &Answer, head: bool) -> std::io::Result<()> {
    let mut text = format!("HTTP/1.1 {} X\r\n", a.status);
    for (k, v) in &a.headers {
        let l = k.to_ascii_lowercase();
        if l == "connection" || l == "transfer-encoding" || (l == "content-length" && !head) {
            continue;
        }
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    if !head {
        text.push_str(&format!("Content-Length: {}\r\n", a.body.len()));
    }
    text.push_str("\r\n");
    out.write_all(text.as_bytes())?;
    if !head {
        out.write_all(&a.body)?;
    }
    out.flush()
}

/// The moto install directory (for scripts and messages).
pub fn moto_dir() -> PathBuf {
    cache_dir().join("moto")
}

/// GCS through its XML API: s3s-fs without keys behind a front that drops the empty `Bearer`,
/// with a service-account key that names the front (`gcs_base_url`) and turns OAuth off.
pub struct Gcs {
    pub front: Front,
    pub key_file: PathBuf,
}

impl Gcs {
    pub fn start(base: &Path, buckets: &[&str], mut rules: Rules) -> Gcs {
        rules.drop_authorization = true;
        let front = Front::start(base, buckets, rules);
        let key_file = base.join("gcs-key.json");
        let key = serde_json::json!({
            "type": "service_account",
            "gcs_base_url": format!("http://127.0.0.1:{}", front.port),
            "disable_oauth": true,
            "client_email": "etcd-backups@example.iam.gserviceaccount.com",
            "private_key_id": "",
            "private_key": "",
        });
        fs::write(&key_file, key.to_string()).unwrap();
        Gcs { front, key_file }
    }
}

impl TestStore for Gcs {
    fn endpoint(&self) -> String {
        self.front.endpoint()
    }
    fn keys(&self) -> (String, String) {
        (String::new(), String::new())
    }
    fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.front.s3.objects(bucket, prefix)
    }
    fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        TestStore::get(&self.front.s3, bucket, key)
    }
    fn scheme(&self) -> &'static str {
        "gs"
    }
    fn env(&self, agent: Agent, bucket: &str, path: &str) -> Agent {
        agent
            .env("ETCD_ACTIONS_GCS_BUCKET", bucket)
            .env("ETCD_ACTIONS_GCS_PATH", path)
            .env("GOOGLE_APPLICATION_CREDENTIALS", &self.key_file)
    }
}

/// Azurite's well-known account and key (its README).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite (npm `azurite`, installed by scripts/install-deps), Microsoft's Blob emulator,
/// SharedKey checked. Killed by pid on drop.
pub struct Azurite {
    pub port: u16,
    child: std::process::Child,
}

impl Azurite {
    pub fn start(base: &Path, containers: &[&str]) -> Azurite {
        let bin = cache_dir().join("azurite/node_modules/.bin/azurite-blob");
        assert!(
            bin.exists(),
            "azurite is not installed in {}: run scripts/install-deps",
            bin.display()
        );
        let port = free_port();
        let dir = base.join("azurite");
        fs::create_dir_all(&dir).unwrap();
        let child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(&dir)
            .args(["--silent", "--skipApiVersionCheck", "--loose"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(port, "azurite");
        let a = Azurite { port, child };
        for c in containers {
            let r = a.request("PUT", &format!("/{c}"), &[("restype", "container")]);
            assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        }
        a
    }

    /// One SharedKey-signed request (path-style, as the emulator serves it).
    pub fn request(&self, method: &str, path: &str, query: &[(&str, &str)]) -> Answer {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let date = rfc1123(std::time::SystemTime::now());
        let version = "2021-08-06";
        let mut q: Vec<(&str, &str)> = query.to_vec();
        q.sort();
        let mut resource = format!("/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}{path}");
        for (k, v) in &q {
            resource.push_str(&format!("\n{k}:{v}"));
        }
        let to_sign = format!(
            "{method}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{resource}"
        );
        let key = b64.decode(AZURITE_KEY).unwrap();
        let sig = b64.encode(hmac_sha256(&key, to_sign.as_bytes()));
        let query: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let target = if query.is_empty() {
            format!("/{AZURITE_ACCOUNT}{path}")
        } else {
            format!("/{AZURITE_ACCOUNT}{path}?{}", query.join("&"))
        };
        http(
            self.port,
            method,
            &target,
            &[
                ("x-ms-date".into(), date),
                ("x-ms-version".into(), version.into()),
                (
                    "Authorization".into(),
                    format!("SharedKey {AZURITE_ACCOUNT}:{sig}"),
                ),
            ],
            b"",
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestStore for Azurite {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }
    fn keys(&self) -> (String, String) {
        (AZURITE_ACCOUNT.into(), AZURITE_KEY.into())
    }
    fn objects(&self, container: &str, prefix: &str) -> Vec<String> {
        let a = self.request(
            "GET",
            &format!("/{container}"),
            &[
                ("comp", "list"),
                ("prefix", prefix),
                ("restype", "container"),
            ],
        );
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let text = String::from_utf8_lossy(&a.body);
        let mut keys: Vec<String> = text
            .split("<Name>")
            .skip(1)
            .filter_map(|p| {
                p.split_once("</Name>")
                    .map(|(k, _)| k.replace("&amp;", "&"))
            })
            .collect();
        keys.sort();
        keys
    }
    fn get(&self, container: &str, key: &str) -> Option<Vec<u8>> {
        let a = self.request("GET", &format!("/{container}/{key}"), &[]);
        (a.status == 200).then_some(a.body)
    }
    fn scheme(&self) -> &'static str {
        "azure"
    }
    fn env(&self, agent: Agent, container: &str, path: &str) -> Agent {
        agent
            .env("ETCD_ACTIONS_AZURE_ENDPOINT", self.endpoint())
            .env("ETCD_ACTIONS_AZURE_ACCOUNT", AZURITE_ACCOUNT)
            .env("ETCD_ACTIONS_AZURE_CONTAINER", container)
            .env("ETCD_ACTIONS_AZURE_PATH", path)
            .env("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY)
    }
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha2::Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = sha2::Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = sha2::Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// `Fri, 04 Dec 2026 01:58:38 GMT`.
fn rfc1123(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{wd}, {d:02} {mon} {y} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
