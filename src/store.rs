//! Object storage (S3) for archives: where its settings come from (the Juju `s3` relation, or
//! `ETCD_ACTIONS_S3_*` with the standard `AWS_*` credentials standalone), and the operations
//! the actions need. The program stays synchronous: each operation runs on a small
//! current-thread tokio runtime at the edge.
//!
//! An upload is one more sink in the archive's streaming nest (`UploadTee`): parts go out
//! while the archive is written, to a temporary key. Only once the archive is verified and
//! published locally is the multipart upload completed, and the object copied server-side to
//! its final key with its user metadata (sha256, revision, ...), which S3 can only take when an
//! object is created. Any failure aborts the upload: no partial or unverified object is ever
//! visible under a final key. Credentials never leave this module's memory: not in argv, not in
//! a child's environment, not in a message.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, BackoffConfig, Certificate, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, RetryConfig, WriteMultipart,
};

use crate::error::{bounded, Error};

/// The standard credentials, taken out of the environment at start so that no child process
/// (etcdctl, etcdutl, service commands) ever inherits them.
#[derive(Clone, Default)]
pub struct Credentials {
    access_key: Option<String>,
    secret_key: Option<String>,
    session_token: Option<String>,
}

impl Credentials {
    pub fn take_from_env() -> Credentials {
        let take = |k: &str| {
            let v = std::env::var(k).ok().filter(|v| !v.is_empty());
            std::env::remove_var(k);
            v
        };
        Credentials {
            access_key: take("AWS_ACCESS_KEY_ID"),
            secret_key: take("AWS_SECRET_ACCESS_KEY"),
            session_token: take("AWS_SESSION_TOKEN"),
        }
    }
}

impl Credentials {
    /// The credentials as `AWS_*` environment lines, for a 0600 environment file only.
    pub fn env_pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if let Some(k) = &self.access_key {
            v.push(("AWS_ACCESS_KEY_ID", k.clone()));
        }
        if let Some(k) = &self.secret_key {
            v.push(("AWS_SECRET_ACCESS_KEY", k.clone()));
        }
        if let Some(k) = &self.session_token {
            v.push(("AWS_SESSION_TOKEN", k.clone()));
        }
        v
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// Standalone settings of the store (everything but the credentials).
#[derive(Debug, Clone, Default)]
pub struct StoreSettings {
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    pub path: Option<String>,
    pub region: Option<String>,
    pub uri_style: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub credentials: Credentials,
}

/// Where archives go: a bucket, a key prefix, and how to reach it.
#[derive(Clone)]
pub struct StoreConfig {
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Key prefix without leading or trailing `/` ("" for none).
    pub prefix: String,
    pub region: String,
    pub host_style: bool,
    pub ca_pems: Vec<String>,
    pub storage_class: Option<String>,
    access_key: String,
    secret_key: String,
    session_token: Option<String>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("host_style", &self.host_style)
            .finish_non_exhaustive()
    }
}

fn not_ready(detail: impl Into<String>) -> Error {
    Error::StoreNotReady(detail.into())
}

fn normalize_prefix(p: &str) -> String {
    p.split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

fn with_scheme(endpoint: &str) -> String {
    let e = endpoint.trim().trim_end_matches('/');
    if e.contains("://") {
        e.to_string()
    } else {
        format!("https://{e}")
    }
}

/// A JSON list of strings, or failing that the raw text as one item.
fn json_list(text: &str) -> Vec<String> {
    match serde_json::from_str::<Vec<String>>(text) {
        Ok(v) => v,
        Err(_) if text.trim().is_empty() => Vec::new(),
        Err(_) => vec![text.to_string()],
    }
}

impl StoreConfig {
    /// From the provider's application databag (secret fields already merged in).
    pub fn from_relation_bag(bag: &BTreeMap<String, String>) -> Result<StoreConfig, Error> {
        let get = |k: &str| {
            bag.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if let Some(v) = get("s3-api-version") {
            if v.trim_start_matches('v').starts_with('2') {
                return Err(Error::Refused(format!(
                    "the s3 provider asks for S3 API version {v} (signature v2), which this agent \
                     does not speak; configure the provider for version 4 (the default)"
                )));
            }
        }
        let missing: Vec<&str> = ["bucket", "access-key", "secret-key"]
            .into_iter()
            .filter(|k| get(k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(not_ready(format!(
                "the relation has no {} yet",
                missing
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let host_style = match get("s3-uri-style").as_deref() {
            None | Some("path") => false,
            Some("host") | Some("virtual") => true,
            Some(other) => {
                return Err(Error::ConfigInvalid {
                    path: "s3 relation".into(),
                    problem: format!(
                        "`s3-uri-style` is `{other}`; expected `path` or `host`: fix the s3 provider's config"
                    ),
                })
            }
        };
        Ok(StoreConfig {
            endpoint: get("endpoint").map(|e| with_scheme(&e)),
            bucket: get("bucket")
                .expect("checked")
                .trim_matches('/')
                .to_string(),
            prefix: normalize_prefix(&get("path").unwrap_or_default()),
            region: get("region").unwrap_or_else(|| "us-east-1".into()),
            host_style,
            ca_pems: get("tls-ca-chain")
                .map(|t| json_list(&t))
                .unwrap_or_default(),
            storage_class: get("storage-class"),
            access_key: get("access-key").expect("checked"),
            secret_key: get("secret-key").expect("checked"),
            session_token: None,
        })
    }

    /// From the standalone settings; `None` when no bucket is set.
    pub fn from_settings(s: &StoreSettings) -> Result<Option<StoreConfig>, Error> {
        let Some(bucket) = s.bucket.clone().filter(|b| !b.trim().is_empty()) else {
            return Ok(None);
        };
        let bad = |problem: String| Error::Usage(problem);
        let (Some(access_key), Some(secret_key)) = (
            s.credentials.access_key.clone(),
            s.credentials.secret_key.clone(),
        ) else {
            return Err(bad(
                "ETCD_ACTIONS_S3_BUCKET is set but AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                 are not; export both (they are never taken from a flag: argv is visible in ps)"
                    .into(),
            ));
        };
        let host_style = match s.uri_style.as_deref().map(str::trim) {
            None | Some("") | Some("path") => false,
            Some("host") => true,
            Some(other) => {
                return Err(bad(format!(
                    "--s3-uri-style `{other}`: expected `path` or `host`"
                )))
            }
        };
        let ca_pems = match &s.ca_file {
            Some(p) => vec![std::fs::read_to_string(p)
                .map_err(|e| bad(format!("cannot read the S3 CA file `{}`: {e}", p.display())))?],
            None => Vec::new(),
        };
        Ok(Some(StoreConfig {
            endpoint: s.endpoint.as_deref().map(with_scheme),
            bucket: bucket.trim().trim_matches('/').to_string(),
            prefix: normalize_prefix(s.path.as_deref().unwrap_or("")),
            region: s.region.clone().unwrap_or_else(|| "us-east-1".into()),
            host_style,
            ca_pems,
            storage_class: None,
            access_key,
            secret_key,
            session_token: s.credentials.session_token.clone(),
        }))
    }

    /// How the store is named in messages: endpoint and bucket, never a credential.
    pub fn describe(&self) -> String {
        format!(
            "bucket `{}` at {}",
            self.bucket,
            self.endpoint
                .clone()
                .unwrap_or_else(|| format!("AWS S3 ({})", self.region))
        )
    }

    /// The folder of an application's archives.
    pub fn folder(&self, app: &str) -> String {
        if self.prefix.is_empty() {
            app.to_string()
        } else {
            format!("{}/{app}", self.prefix)
        }
    }

    pub fn key(&self, app: &str, name: &str) -> String {
        format!("{}/{name}", self.folder(app))
    }

    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn client(&self, headers: Vec<(String, String)>) -> Result<AmazonS3, Error> {
        let mut options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(120));
        for pem in &self.ca_pems {
            for cert in
                Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| Error::ConfigInvalid {
                    path: "s3 CA".into(),
                    problem: format!("a CA certificate is not valid PEM: {e}"),
                })?
            {
                options = options.with_root_certificate(cert);
            }
        }
        if let Some(e) = &self.endpoint {
            options = options.with_allow_http(e.starts_with("http://"));
        }
        if !headers.is_empty() {
            let mut map = http::HeaderMap::new();
            for (k, v) in headers {
                let name = http::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|e| Error::usage(format!("invalid S3 header `{k}`: {e}")))?;
                let value = http::HeaderValue::from_str(&v)
                    .map_err(|e| Error::usage(format!("invalid S3 header value: {e}")))?;
                map.insert(name, value);
            }
            options = options.with_default_headers(map);
        }
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 5,
            retry_timeout: Duration::from_secs(20),
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_virtual_hosted_style_request(self.host_style)
            .with_client_options(options)
            .with_retry(retry)
            // The body is not hashed a second time for the signature: its sha256 is computed in
            // the archive pass, recorded in the (signed) metadata, and checked at restore.
            .with_unsigned_payload(true);
        if let Some(t) = &self.session_token {
            b = b.with_token(t);
        }
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e);
        }
        b.build().map_err(|e| Error::Store {
            store: self.describe(),
            problem: e.to_string(),
        })
    }
}

/// One object of the store.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub modified: String,
    pub etag: Option<String>,
    pub meta: BTreeMap<String, String>,
}

impl ObjectInfo {
    /// The last part of the key: the archive's name, which is its backup id.
    pub fn name(&self) -> &str {
        self.key.rsplit('/').next().unwrap_or(&self.key)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the S3 client runtime", e))
}

/// The store, with a runtime to run its requests on.
pub struct Store {
    pub cfg: StoreConfig,
    s3: AmazonS3,
    rt: tokio::runtime::Runtime,
}

/// Prefix of user metadata keys written by this tool.
pub const META: &str = "x-amz-meta-";

impl Store {
    pub fn open(cfg: StoreConfig) -> Result<Store, Error> {
        let s3 = cfg.client(Vec::new())?;
        Ok(Store {
            rt: runtime()?,
            s3,
            cfg,
        })
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Store {
            store: self.cfg.describe(),
            problem: bounded(&format!("{what}: {e}"), 2048),
        }
    }

    /// The object at `key` with its user metadata; `None` when there is none.
    pub fn head(&self, key: &str) -> Result<Option<ObjectInfo>, Error> {
        let path = ObjectPath::from(key);
        let opts = GetOptions {
            head: true,
            ..Default::default()
        };
        match self.rt.block_on(self.s3.get_opts(&path, opts)) {
            Ok(r) => {
                let meta = r
                    .attributes
                    .iter()
                    .filter_map(|(k, v)| match k {
                        Attribute::Metadata(name) => Some((name.to_string(), v.to_string())),
                        _ => None,
                    })
                    .collect();
                Ok(Some(ObjectInfo {
                    key: key.to_string(),
                    size: r.meta.size,
                    modified: r.meta.last_modified.to_rfc3339(),
                    etag: r.meta.e_tag.clone(),
                    meta,
                }))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail(&format!("cannot read `{key}`"), e)),
        }
    }

    /// Every object directly in `folder`, with its metadata.
    pub fn list(&self, folder: &str) -> Result<Vec<ObjectInfo>, Error> {
        let prefix = ObjectPath::from(folder);
        let listed = self.rt.block_on(async {
            let mut out = Vec::new();
            let mut stream = self.s3.list(Some(&prefix));
            while let Some(item) = stream.next().await {
                out.push(item?);
            }
            Ok::<_, object_store::Error>(out)
        });
        let listed = listed.map_err(|e| self.fail(&format!("cannot list `{folder}/`"), e))?;
        let mut out = Vec::new();
        for m in listed {
            let key = m.location.to_string();
            if key.rsplit_once('/').map(|(d, _)| d) != Some(folder) {
                continue;
            }
            if let Some(info) = self.head(&key)? {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    pub fn delete(&self, key: &str) -> Result<(), Error> {
        self.rt
            .block_on(self.s3.delete(&ObjectPath::from(key)))
            .map_err(|e| self.fail(&format!("cannot delete `{key}`"), e))
    }

    /// Starts an upload into `folder`: a multipart upload to a temporary key there, fed by
    /// its `tee()`, and given its final key at `commit`.
    pub fn start_upload(&self, folder: &str) -> Upload {
        Upload::start(self.cfg.clone(), folder.to_string())
    }

    /// A reader of the object at `key`, streamed with bounded memory.
    pub fn reader(&self, key: &str) -> ObjectReader {
        ObjectReader::start(self.cfg.clone(), key.to_string())
    }
}

/// What a completed upload left in the store.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub url: String,
    pub etag: String,
    pub size: u64,
}

enum Decision {
    Commit(String, Vec<(String, String)>),
    Abort,
}

/// An upload in progress on a thread of its own.
pub struct Upload {
    data: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    decide: Option<SyncSender<Decision>>,
    handle: Option<JoinHandle<Result<Uploaded, Error>>>,
    cfg: StoreConfig,
}

/// Part size of uploads; with two parts in flight the upload holds about 3 parts in memory.
const PART: usize = 8 << 20;

impl Upload {
    fn start(cfg: StoreConfig, folder: String) -> Upload {
        let (data_tx, mut data_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let (decide_tx, decide_rx) = sync_channel::<Decision>(1);
        let thread_cfg = cfg.clone();
        let handle = std::thread::spawn(move || -> Result<Uploaded, Error> {
            let cfg = thread_cfg;
            let store_err = |what: String, e: object_store::Error| Error::Store {
                store: cfg.describe(),
                problem: bounded(&format!("{what}: {e}"), 2048),
            };
            let rt = runtime()?;
            let s3 = cfg.client(Vec::new())?;
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let tmp =
                ObjectPath::from(format!("{folder}/.incoming/{}-{nanos}", std::process::id()));
            let streamed = rt.block_on(async {
                // The bucket must exist (some servers would create it on the first write).
                s3.list_with_delimiter(Some(&ObjectPath::from(folder.as_str())))
                    .await
                    .map_err(|e| store_err("cannot list the bucket".into(), e))?;
                let mut opts = PutMultipartOptions::default();
                if let Some(class) = &cfg.storage_class {
                    opts.attributes
                        .insert(Attribute::StorageClass, class.clone().into());
                }
                let up = s3
                    .put_multipart_opts(&tmp, opts)
                    .await
                    .map_err(|e| store_err("cannot start the upload".into(), e))?;
                let mut w = WriteMultipart::new_with_chunk_size(up, PART);
                while let Some(chunk) = data_rx.recv().await {
                    if let Err(e) = w.wait_for_capacity(2).await {
                        let _ = w.abort().await;
                        return Err(store_err("uploading a part failed".into(), e));
                    }
                    w.write(&chunk);
                }
                Ok(w)
            });
            let w = streamed?;
            // All data is in; wait for the archive to be verified and published.
            let decision = decide_rx.recv().unwrap_or(Decision::Abort);
            let Decision::Commit(final_key, meta) = decision else {
                let _ = rt.block_on(w.abort());
                return Err(Error::Store {
                    store: cfg.describe(),
                    problem: "the upload was aborted".into(),
                });
            };
            rt.block_on(w.finish())
                .map_err(|e| store_err("completing the upload failed".into(), e))?;
            // The final key gets the object with its metadata in one server-side copy.
            let mut headers = vec![("x-amz-metadata-directive".to_string(), "REPLACE".into())];
            headers.extend(meta.into_iter().map(|(k, v)| (format!("{META}{k}"), v)));
            if let Some(class) = &cfg.storage_class {
                headers.push(("x-amz-storage-class".into(), class.clone()));
            }
            let copier = cfg.client(headers)?;
            let dest = ObjectPath::from(final_key.as_str());
            let copied = rt.block_on(copier.copy(&tmp, &dest));
            let _ = rt.block_on(s3.delete(&tmp));
            copied.map_err(|e| store_err(format!("cannot publish `{final_key}`"), e))?;
            let head = rt
                .block_on(s3.head(&dest))
                .map_err(|e| store_err(format!("cannot read back `{final_key}`"), e))?;
            Ok(Uploaded {
                url: cfg.url(&final_key),
                etag: head.e_tag.unwrap_or_default().trim_matches('"').to_string(),
                size: head.size,
            })
        });
        Upload {
            data: Some(data_tx),
            decide: Some(decide_tx),
            handle: Some(handle),
            cfg,
        }
    }

    /// A sink for the archive's bytes, to nest below the archive file's writer.
    pub fn tee(&self) -> UploadTee {
        UploadTee {
            tx: self.data.clone(),
        }
    }

    /// Completes the upload as `key` with `meta` as the object's user metadata.
    pub fn commit(mut self, key: &str, meta: Vec<(String, String)>) -> Result<Uploaded, Error> {
        self.data = None;
        if let Some(d) = self.decide.take() {
            let _ = d.send(Decision::Commit(key.to_string(), meta));
        }
        self.join()
    }

    fn join(&mut self) -> Result<Uploaded, Error> {
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(Error::Store {
                    store: self.cfg.describe(),
                    problem: "the upload thread panicked".into(),
                })
            }),
            None => Err(Error::Store {
                store: self.cfg.describe(),
                problem: "the upload already ended".into(),
            }),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.data = None;
        if let Some(d) = self.decide.take() {
            let _ = d.send(Decision::Abort);
        }
        if self.handle.is_some() {
            let _ = self.join();
        }
    }
}

/// Hands every byte written to the upload. Never fails the archive: when the upload stopped
/// (an error it reports itself at commit), the bytes are dropped.
pub struct UploadTee {
    tx: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
}

impl UploadTee {
    pub fn send(&mut self, chunk: &[u8]) {
        if let Some(tx) = &self.tx {
            if tx.blocking_send(chunk.to_vec()).is_err() {
                self.tx = None;
            }
        }
    }
}

/// Reads an object as a stream on a thread of its own: bounded memory whatever its size.
pub struct ObjectReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
    _handle: JoinHandle<()>,
}

impl ObjectReader {
    fn start(cfg: StoreConfig, key: String) -> ObjectReader {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(8);
        let handle = std::thread::spawn(move || {
            let run = || -> Result<(), io::Error> {
                let rt = runtime().map_err(|e| io::Error::other(e.to_string()))?;
                let s3 = cfg
                    .client(Vec::new())
                    .map_err(|e| io::Error::other(e.to_string()))?;
                rt.block_on(async {
                    let got = s3.get(&ObjectPath::from(key.as_str())).await.map_err(|e| {
                        io::Error::other(format!("download of `{key}` failed: {e}"))
                    })?;
                    let mut stream = got.into_stream();
                    while let Some(piece) = stream.next().await {
                        let piece = piece.map_err(|e| {
                            io::Error::other(format!("download of `{key}` broke off: {e}"))
                        })?;
                        if tx.send(Ok(piece.to_vec())).is_err() {
                            return Ok(());
                        }
                    }
                    Ok(())
                })
            };
            if let Err(e) = run() {
                let _ = tx.send(Err(e));
            }
        });
        ObjectReader {
            rx,
            buf: Vec::new(),
            pos: 0,
            done: false,
            _handle: handle,
        }
    }
}

impl Read for ObjectReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(piece)) => {
                    self.buf = piece;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Ok(0);
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A file writer that also feeds an upload: the archive file and the object get the same
/// bytes from one pass.
pub struct TeeFile {
    pub file: std::fs::File,
    pub upload: Option<UploadTee>,
}

impl Write for TeeFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.file.write(data)?;
        if let Some(u) = &mut self.upload {
            u.send(&data[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl From<std::fs::File> for TeeFile {
    fn from(file: std::fs::File) -> TeeFile {
        TeeFile { file, upload: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bag(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_the_relation_bag() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let chain = serde_json::to_string(&vec![pem]).unwrap();
        let c = StoreConfig::from_relation_bag(&bag(&[
            ("bucket", "/b/"),
            ("access-key", "AK"),
            ("secret-key", "SK"),
            ("endpoint", "s3.example.com/"),
            ("path", "/test/path_1/"),
            ("s3-uri-style", "host"),
            ("tls-ca-chain", &chain),
        ]))
        .unwrap();
        assert_eq!(c.bucket, "b");
        assert_eq!(c.endpoint.as_deref(), Some("https://s3.example.com"));
        assert_eq!(c.prefix, "test/path_1");
        assert!(c.host_style);
        assert_eq!(c.ca_pems, vec![pem.to_string()]);
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.key("etcd", "x.tar.gz"), "test/path_1/etcd/x.tar.gz");
        assert!(!format!("{c:?}").contains("SK"), "no secret in Debug");
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        let err = StoreConfig::from_relation_bag(&bag(&[("bucket", "b")])).unwrap_err();
        assert!(matches!(err, Error::StoreNotReady(_)), "{err}");
        assert!(
            err.to_string().contains("`access-key`, `secret-key`"),
            "{err}"
        );
        let err = StoreConfig::from_relation_bag(&bag(&[
            ("bucket", "b"),
            ("access-key", "AK"),
            ("secret-key", "SK"),
            ("s3-api-version", "2"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        let err = StoreConfig::from_relation_bag(&bag(&[
            ("bucket", "b"),
            ("access-key", "AK"),
            ("secret-key", "SK"),
            ("s3-uri-style", "sideways"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("sideways"), "{err}");
    }
}
