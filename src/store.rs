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
use object_store::aws::S3CopyIfNotExists;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, RetryConfig, WriteMultipart,
};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

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

/// Checks an endpoint URL: `http` or `https` with a host, and no user name or password in
/// it (they would be echoed in every message that names the store). `from` says where it
/// came from.
fn check_endpoint(endpoint: &str, from: &str) -> Result<(), String> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| format!("the endpoint is not a URL; {from}"))?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "the endpoint's scheme is `{}`; only http:// and https:// endpoints are used: {from}",
            bounded(scheme, 40)
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!(
            "the endpoint has a user name or password in it; credentials go in the access and              secret keys, never in the URL: {from}"
        ));
    }
    if authority.is_empty()
        || endpoint
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "the endpoint has no host, or has spaces or control characters in it: {from}"
        ));
    }
    Ok(())
}

/// Checks a bucket name: S3's characters (letters, digits, `.`, `-`, `_`), no `..`, nothing
/// a client would read as a path.
fn check_bucket(bucket: &str, from: &str) -> Result<(), String> {
    let ok = !bucket.is_empty()
        && bucket.len() <= 63
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        && !bucket.contains("..")
        && !bucket.starts_with('.')
        && !bucket.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the bucket `{}` is not a bucket name (letters, digits, `.`, `-` and `_`, at most              63, no `/` or `..`): {from}",
            bounded(bucket, 100)
        ))
    }
}

/// Checks a key prefix: no `.` or `..` segments and no control characters.
fn check_prefix(prefix: &str, from: &str) -> Result<(), String> {
    let bad_segment = prefix.split('/').any(|s| s == "." || s == "..");
    if bad_segment || prefix.chars().any(|c| c.is_control()) {
        return Err(format!(
            "the path `{}` has a `.` or `..` segment or control characters: {from}",
            bounded(prefix, 100)
        ));
    }
    Ok(())
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
                return Err(Error::Declined(format!(
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
        let from = "fix the s3 provider's config (s3-integrator)";
        let invalid = |problem: String| Error::ConfigInvalid {
            path: "s3 relation".into(),
            problem,
        };
        let endpoint = get("endpoint").map(|e| with_scheme(&e));
        if let Some(e) = &endpoint {
            check_endpoint(e, from).map_err(invalid)?;
        }
        let bucket = get("bucket")
            .expect("checked")
            .trim_matches('/')
            .to_string();
        check_bucket(&bucket, from).map_err(invalid)?;
        let path = get("path").unwrap_or_default();
        check_prefix(&path, from).map_err(invalid)?;
        Ok(StoreConfig {
            endpoint,
            bucket,
            prefix: normalize_prefix(&path),
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
        let endpoint = s.endpoint.as_deref().map(with_scheme);
        if let Some(e) = &endpoint {
            check_endpoint(e, "fix --s3-endpoint (ETCD_ACTIONS_S3_ENDPOINT)").map_err(bad)?;
        }
        let bucket = bucket.trim().trim_matches('/').to_string();
        check_bucket(&bucket, "fix --s3-bucket (ETCD_ACTIONS_S3_BUCKET)").map_err(bad)?;
        let path = s.path.as_deref().unwrap_or("");
        check_prefix(path, "fix --s3-path (ETCD_ACTIONS_S3_PATH)").map_err(bad)?;
        Ok(Some(StoreConfig {
            endpoint,
            bucket,
            prefix: normalize_prefix(path),
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

    /// The HTTP client under object_store: ours, so that it never follows a redirect to
    /// another host and a listing page cannot be endless or huge.
    fn http(&self, headers: Vec<(String, String)>) -> Result<reqwest::Client, Error> {
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("etcd-actions/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .no_zstd()
            .redirect(reqwest::redirect::Policy::custom(|a| {
                let origin = |u: &reqwest::Url| {
                    (
                        u.scheme().to_string(),
                        u.host_str().map(str::to_string),
                        u.port_or_known_default(),
                    )
                };
                let first = a.previous().first().map(origin);
                if first == Some(origin(a.url())) && a.previous().len() < 5 {
                    a.follow()
                } else {
                    a.stop()
                }
            }))
            .https_only(
                !self
                    .endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            );
        let mut certs = Vec::new();
        for pem in &self.ca_pems {
            certs.extend(
                reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                    Error::ConfigInvalid {
                        path: "s3 CA".into(),
                        problem: format!("a CA certificate is not valid PEM: {e}"),
                    }
                })?,
            );
        }
        if !certs.is_empty() {
            b = b.tls_certs_merge(certs);
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
            b = b.default_headers(map);
        }
        b.build().map_err(|e| Error::Store {
            store: self.describe(),
            problem: format!("cannot set up the HTTP client: {e}"),
        })
    }

    fn client(&self, headers: Vec<(String, String)>) -> Result<AmazonS3, Error> {
        self.client_watched(headers, &Watch::default())
    }

    fn client_watched(
        &self,
        headers: Vec<(String, String)>,
        watch: &Watch,
    ) -> Result<AmazonS3, Error> {
        let connector = Connector {
            client: self.http(headers)?,
            pages: watch.pages.clone(),
            skipped: watch.skipped.clone(),
        };
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
            .with_client_options(
                ClientOptions::new().with_allow_http(
                    self.endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://")),
                ),
            )
            .with_http_connector(connector)
            .with_retry(retry)
            // Final keys are written once: the copy to one is a multipart upload completed
            // with `If-None-Match: *`, which the server refuses when the key exists.
            .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
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

/// Bounds on a listing: pages (S3 gives up to 1000 keys a page), one page's XML, keys kept,
/// and the time it may take. A store past any of them gets a clear error, not our memory.
const LIST_PAGES_MAX: u32 = 1000;
const LIST_PAGE_BYTES_MAX: usize = 16 << 20;
const LIST_KEYS_MAX: usize = 100_000;
const LIST_DEADLINE: Duration = Duration::from_secs(120);

/// What the HTTP layer saw of listings: pages requested, keys taken out.
#[derive(Debug, Default, Clone)]
struct Watch {
    pages: Arc<AtomicU32>,
    skipped: Arc<Mutex<Vec<String>>>,
}

#[derive(Debug)]
struct Connector {
    client: reqwest::Client,
    pages: Arc<AtomicU32>,
    skipped: Arc<Mutex<Vec<String>>>,
}

impl HttpConnector for Connector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(Guarded {
            client: self.client.clone(),
            pages: self.pages.clone(),
            skipped: self.skipped.clone(),
        }))
    }
}

/// Counts listing pages and reads each one with a size cap before object_store parses it.
#[derive(Debug)]
struct Guarded {
    client: reqwest::Client,
    pages: Arc<AtomicU32>,
    skipped: Arc<Mutex<Vec<String>>>,
}

fn refused(what: String) -> HttpError {
    // `Decode` is never retried.
    HttpError::new(HttpErrorKind::Decode, io::Error::other(what))
}

#[async_trait::async_trait]
impl HttpService for Guarded {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let listing = req.method() == http::Method::GET
            && req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "list-type=2"));
        if listing && self.pages.fetch_add(1, Ordering::SeqCst) >= LIST_PAGES_MAX {
            return Err(refused(format!(
                "the listing did not end after {LIST_PAGES_MAX} pages; the store keeps saying \
                 there is more"
            )));
        }
        let response = self.client.call(req).await?;
        if !listing {
            return Ok(response);
        }
        let (parts, body) = response.into_parts();
        let mut stream = body.bytes_stream();
        let mut page = Vec::new();
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            if page.len() + piece.len() > LIST_PAGE_BYTES_MAX {
                return Err(refused(format!(
                    "a listing page is larger than {} MiB; no S3 server sends that",
                    LIST_PAGE_BYTES_MAX >> 20
                )));
            }
            page.extend_from_slice(&piece);
        }
        let page = match String::from_utf8(page) {
            Ok(text) => {
                let (kept, skipped) = drop_unusable_keys(&text);
                if let Ok(mut s) = self.skipped.lock() {
                    s.extend(skipped);
                }
                kept.into_bytes()
            }
            Err(e) => e.into_bytes(),
        };
        Ok(HttpResponse::from_parts(parts, page.into()))
    }
}

/// Takes out of a ListObjectsV2 page the `<Contents>` entries whose key the client could not
/// take as a path (`a//b`, `..`): one such key would fail the whole listing. Returns the page
/// and the keys taken out, for the operator to see.
fn drop_unusable_keys(page: &str) -> (String, Vec<String>) {
    let mut out = String::with_capacity(page.len());
    let mut skipped = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find("<Contents>") {
        let Some(len) = rest[start..].find("</Contents>") else {
            break;
        };
        let end = start + len + "</Contents>".len();
        let entry = &rest[start..end];
        out.push_str(&rest[..start]);
        let key = entry
            .split_once("<Key>")
            .and_then(|(_, k)| k.split_once("</Key>"))
            .map(|(k, _)| xml_unescape(k));
        match key {
            Some(k) if ObjectPath::parse(&k).is_err() => skipped.push(bounded(&k, 300)),
            _ => out.push_str(entry),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    (out, skipped)
}

fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(semi) = tail.find(';').filter(|&n| n <= 10) else {
            out.push('&');
            rest = &tail[1..];
            continue;
        };
        let entity = &tail[1..semi];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &tail[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
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
    watch: Watch,
}

/// What a listing found directly in a folder: the objects (key, size and time from the
/// listing; no metadata), and the keys it had to pass over.
#[derive(Debug, Default)]
pub struct Listing {
    pub objects: Vec<ObjectInfo>,
    pub skipped: Vec<String>,
}

/// Prefix of user metadata keys written by this tool.
pub const META: &str = "x-amz-meta-";

impl Store {
    pub fn open(cfg: StoreConfig) -> Result<Store, Error> {
        let watch = Watch::default();
        let s3 = cfg.client_watched(Vec::new(), &watch)?;
        Ok(Store {
            rt: runtime()?,
            s3,
            cfg,
            watch,
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

    /// Every object directly in `folder`, as the listing gives it (no metadata: `head` reads
    /// that where it is needed). Bounded: at most `LIST_KEYS_MAX` objects kept, pages and
    /// page sizes capped by the HTTP layer, and the whole listing within `LIST_DEADLINE`.
    /// Keys the client cannot use are passed over and named in `skipped`.
    pub fn list(&self, folder: &str) -> Result<Listing, Error> {
        self.watch.pages.store(0, Ordering::SeqCst);
        if let Ok(mut s) = self.watch.skipped.lock() {
            s.clear();
        }
        let prefix = ObjectPath::from(folder);
        let listed = self.rt.block_on(async {
            let walk = async {
                let mut out = Vec::new();
                let mut stream = self.s3.list(Some(&prefix));
                while let Some(item) = stream.next().await {
                    let m = item.map_err(|e| e.to_string())?;
                    let key = m.location.to_string();
                    if key.rsplit_once('/').map(|(d, _)| d) != Some(folder) {
                        continue;
                    }
                    if out.len() >= LIST_KEYS_MAX {
                        return Err(format!(
                            "the folder holds more than {LIST_KEYS_MAX} objects; prune it, or \
                             give this cluster a folder of its own (the s3 `path`)"
                        ));
                    }
                    out.push(ObjectInfo {
                        key,
                        size: m.size,
                        modified: m.last_modified.to_rfc3339(),
                        etag: m.e_tag,
                        meta: BTreeMap::new(),
                    });
                }
                Ok(out)
            };
            match tokio::time::timeout(LIST_DEADLINE, walk).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "the listing did not finish within {}s",
                    LIST_DEADLINE.as_secs()
                )),
            }
        });
        let mut objects = listed.map_err(|e| self.fail(&format!("cannot list `{folder}/`"), e))?;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        let skipped = self
            .watch
            .skipped
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        Ok(Listing { objects, skipped })
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
            // The final key gets the object with its metadata in one server-side copy, which
            // never replaces an object already there (another cluster's, or one of ours).
            let ours = meta
                .iter()
                .find(|(k, _)| k == "sha256")
                .map(|(_, v)| v.clone());
            let mut headers: Vec<(String, String)> = meta
                .into_iter()
                .map(|(k, v)| (format!("{META}{k}"), v))
                .collect();
            if let Some(class) = &cfg.storage_class {
                headers.push(("x-amz-storage-class".into(), class.clone()));
            }
            let copier = cfg.client(headers)?;
            let dest = ObjectPath::from(final_key.as_str());
            let copied = rt.block_on(copier.copy_if_not_exists(&tmp, &dest));
            let _ = rt.block_on(s3.delete(&tmp));
            match copied {
                Ok(()) => {}
                Err(object_store::Error::AlreadyExists { .. }) => {
                    // The same archive uploaded before (a retried upload) is no conflict.
                    let there = rt
                        .block_on(s3.get_opts(
                            &dest,
                            GetOptions {
                                head: true,
                                ..Default::default()
                            },
                        ))
                        .ok()
                        .and_then(|r| {
                            r.attributes.iter().find_map(|(k, v)| match k {
                                Attribute::Metadata(n) if n == "sha256" => Some(v.to_string()),
                                _ => None,
                            })
                        });
                    if there.is_none() || there != ours {
                        return Err(Error::StoreConflict {
                            store: cfg.describe(),
                            key: final_key,
                        });
                    }
                }
                Err(e) => return Err(store_err(format!("cannot publish `{final_key}`"), e)),
            }
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
/// bytes from one pass. As the file grows, the free space of its filesystem is checked every
/// `SPACE_EVERY` bytes: writing stops while `SPACE_RESERVE` is still free, whatever size the
/// source announced, so a runaway source cannot fill the disk.
pub struct TeeFile {
    pub file: std::fs::File,
    pub upload: Option<UploadTee>,
    unchecked: u64,
}

const SPACE_EVERY: u64 = 16 << 20;
pub const SPACE_RESERVE: u64 = 64 << 20;

impl TeeFile {
    pub fn new(file: std::fs::File, upload: Option<UploadTee>) -> TeeFile {
        TeeFile {
            file,
            upload,
            unchecked: SPACE_EVERY,
        }
    }

    fn check_space(&mut self, adding: usize) -> io::Result<()> {
        self.unchecked += adding as u64;
        if self.unchecked < SPACE_EVERY {
            return Ok(());
        }
        self.unchecked = 0;
        let st = nix::sys::statvfs::fstatvfs(&self.file).map_err(io::Error::from)?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        if free < SPACE_RESERVE + SPACE_EVERY {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "the archive's filesystem is down to {} free; writing stopped to leave {} \
                     for everything else on it",
                    crate::error::human_size(free),
                    crate::error::human_size(SPACE_RESERVE)
                ),
            ));
        }
        Ok(())
    }
}

impl Write for TeeFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check_space(data.len())?;
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
        TeeFile::new(file, None)
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
