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
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, RetryConfig,
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

/// Environment settings: names and values.
pub type EnvPairs = Vec<(String, String)>;

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
            "the endpoint has a user name or password in it; credentials go in the access and secret keys, never in the URL: {from}"
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
            "the bucket `{}` is not a bucket name (letters, digits, `.`, `-` and `_`, at most 63, no `/` or `..`): {from}",
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

    /// The standalone settings that reach this store (for a service that runs outside a hook:
    /// `follow` under the charm): public settings, and the secrets apart. The CA chain, when
    /// there is one, is written by the caller to `ca_file`.
    pub fn env_pairs(&self, ca_file: Option<&std::path::Path>) -> (EnvPairs, EnvPairs) {
        let mut public = vec![("ETCD_ACTIONS_S3_BUCKET".to_string(), self.bucket.clone())];
        if let Some(e) = &self.endpoint {
            public.push(("ETCD_ACTIONS_S3_ENDPOINT".into(), e.clone()));
        }
        if !self.prefix.is_empty() {
            public.push(("ETCD_ACTIONS_S3_PATH".into(), self.prefix.clone()));
        }
        public.push(("ETCD_ACTIONS_S3_REGION".into(), self.region.clone()));
        public.push((
            "ETCD_ACTIONS_S3_URI_STYLE".into(),
            if self.host_style { "host" } else { "path" }.into(),
        ));
        if let Some(f) = ca_file.filter(|_| !self.ca_pems.is_empty()) {
            public.push(("ETCD_ACTIONS_S3_CA_FILE".into(), f.display().to_string()));
        }
        let mut secret = vec![
            ("AWS_ACCESS_KEY_ID".to_string(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), self.secret_key.clone()),
        ];
        if let Some(t) = &self.session_token {
            secret.push(("AWS_SESSION_TOKEN".into(), t.clone()));
        }
        (public, secret)
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
    fn http(&self) -> Result<reqwest::Client, Error> {
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
        b.build().map_err(|e| Error::Store {
            store: self.describe(),
            problem: format!("cannot set up the HTTP client: {e}"),
        })
    }

    fn client(&self) -> Result<AmazonS3, Error> {
        self.client_watched(&Watch::default(), Vec::new(), false)
    }

    /// A client whose requests carry `headers` where object_store adds its default headers
    /// (before signing: the completion of a multipart upload among them); with `checksums`,
    /// each part of an upload carries its CRC64NVME.
    fn client_with(
        &self,
        headers: Vec<(String, String)>,
        checksums: bool,
    ) -> Result<AmazonS3, Error> {
        self.client_watched(&Watch::default(), headers, checksums)
    }

    fn client_watched(
        &self,
        watch: &Watch,
        headers: Vec<(String, String)>,
        checksums: bool,
    ) -> Result<AmazonS3, Error> {
        let connector = Connector {
            client: self.http()?,
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
                ClientOptions::new()
                    .with_allow_http(
                        self.endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    )
                    .with_default_headers(header_map(headers)?),
            )
            .with_http_connector(connector)
            .with_retry(retry)
            // The body is not hashed a second time for the signature: its sha256 is computed in
            // the archive pass, recorded in the record object, and checked at restore.
            .with_unsigned_payload(true);
        if checksums {
            b = b.with_checksum_algorithm(object_store::aws::Checksum::CRC64NVME);
        }
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

fn header_map(headers: Vec<(String, String)>) -> Result<http::HeaderMap, Error> {
    let mut map = http::HeaderMap::new();
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|e| Error::Internal(format!("invalid S3 header `{k}`: {e}")))?;
        let value = http::HeaderValue::from_str(&v)
            .map_err(|e| Error::Internal(format!("invalid S3 header value: {e}")))?;
        map.insert(name, value);
    }
    Ok(map)
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
        let s3 = cfg.client_watched(&watch, Vec::new(), false)?;
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

    /// The record object beside the archive at `key` (`<key>.manifest.yaml`), when there is
    /// a readable one.
    pub fn record(&self, key: &str) -> Result<Option<crate::manifest::Record>, Error> {
        read_record(&self.rt, &self.s3, &self.cfg, key)
    }

    /// Writes a small object (a change segment) once: an object already at `key` is fine
    /// only when it holds the same bytes.
    pub fn put_once(&self, key: &str, bytes: Vec<u8>) -> Result<(), Error> {
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        let same = bytes.clone();
        let put = self
            .rt
            .block_on(self.s3.put_opts(&ObjectPath::from(key), bytes.into(), opts));
        match put {
            Ok(_) => Ok(()),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => match self.get_bytes(key, same.len() as u64)? {
                Some(there) if there == same => Ok(()),
                _ => Err(Error::StoreConflict {
                    store: self.cfg.describe(),
                    key: key.to_string(),
                }),
            },
            Err(e) => Err(self.fail(&format!("cannot write `{key}`"), e)),
        }
    }

    /// The object at `key` when it is at most `max` bytes; `None` when absent or larger.
    pub fn get_bytes(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>, Error> {
        self.rt.block_on(async {
            let got = match self.s3.get(&ObjectPath::from(key)).await {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.fail(&format!("cannot read `{key}`"), e)),
            };
            if got.meta.size > max {
                return Ok(None);
            }
            let mut stream = got.into_stream();
            let mut out = Vec::with_capacity(got_size(max));
            while let Some(piece) = stream.next().await {
                out.extend_from_slice(
                    &piece.map_err(|e| self.fail(&format!("cannot read `{key}`"), e))?,
                );
                if out.len() as u64 > max {
                    return Ok(None);
                }
            }
            Ok(Some(out))
        })
    }

    /// Every key under `prefix` (recursively), bounded by `LIST_KEYS_MAX`.
    pub fn keys_under(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let path = ObjectPath::from(prefix);
        let listed = self.rt.block_on(async {
            let mut out = Vec::new();
            let mut stream = self.s3.list(Some(&path));
            while let Some(item) = stream.next().await {
                out.push(item.map_err(|e| e.to_string())?.location.to_string());
                if out.len() >= LIST_KEYS_MAX {
                    break;
                }
            }
            Ok::<_, String>(out)
        });
        listed.map_err(|e| self.fail(&format!("cannot list `{prefix}/`"), e))
    }

    /// The names of the objects directly in `folder` (keys and sizes), for folders of
    /// small objects such as the change history.
    pub fn names(&self, folder: &str) -> Result<Vec<(String, u64)>, Error> {
        Ok(self
            .list(folder)?
            .objects
            .into_iter()
            .map(|o| (o.name().to_string(), o.size))
            .collect())
    }

    /// A reader of the object at `key`, streamed with bounded memory.
    pub fn reader(&self, key: &str) -> ObjectReader {
        ObjectReader::start(self.cfg.clone(), key.to_string())
    }
}

fn got_size(max: u64) -> usize {
    usize::try_from(max.min(1 << 20)).unwrap_or(1 << 20)
}

/// What a completed upload left in the store.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub url: String,
    pub etag: String,
    pub size: u64,
}

enum Decision {
    /// Complete the upload as the archive `Record` describes it (its sha256 is checked
    /// against the bytes the upload received), then write the record beside it.
    Commit(Box<crate::manifest::Record>),
    Abort,
}

/// What the archive writer sends an upload.
enum Msg {
    /// The archive's name: the upload goes straight to `<folder>/<name>`.
    Begin(String),
    Data(Vec<u8>),
}

/// An upload in progress on a thread of its own.
pub struct Upload {
    data: Option<tokio::sync::mpsc::Sender<Msg>>,
    decide: Option<SyncSender<Decision>>,
    handle: Option<JoinHandle<Result<Uploaded, Error>>>,
    cfg: StoreConfig,
}

/// Part size of uploads: S3's smallest. With two parts in flight (each also held once more by
/// the HTTP layer while it is sent) and one filling, the upload holds about 5 parts: 25 MiB.
/// 10,000 parts of 5 MiB: archives up to 48.8 GiB (etcd's own recommended limit is 8 GiB).
const PART: usize = 5 << 20;

/// The key of the record of the archive at `key`.
pub fn record_key(key: &str) -> String {
    format!("{key}{}", crate::manifest::RECORD_SUFFIX)
}

/// What the upload thread counted of the bytes it was given: their number, and their
/// CRC64NVME for the server to check the whole object against. (Their sha256 is the
/// archive's, computed once in the archive pass from the same buffers.)
struct Received {
    crc64: crc_fast::Digest,
    bytes: u64,
}

impl Upload {
    fn start(cfg: StoreConfig, folder: String) -> Upload {
        let (data_tx, data_rx) = tokio::sync::mpsc::channel::<Msg>(4);
        let (decide_tx, decide_rx) = sync_channel::<Decision>(1);
        let thread_cfg = cfg.clone();
        let handle =
            std::thread::spawn(move || upload_thread(thread_cfg, folder, data_rx, decide_rx));
        Upload {
            data: Some(data_tx),
            decide: Some(decide_tx),
            handle: Some(handle),
            cfg,
        }
    }

    /// A sink for the archive's bytes, to nest below the archive file's writer. It must be
    /// told the archive's name (`UploadTee::begin`) before the first byte.
    pub fn tee(&self) -> UploadTee {
        UploadTee {
            tx: self.data.clone(),
        }
    }

    /// Completes the upload of the archive `record` describes, and writes the record beside
    /// it. `key` must be the key the upload began with.
    pub fn commit(
        mut self,
        key: &str,
        record: &crate::manifest::Record,
    ) -> Result<Uploaded, Error> {
        self.data = None;
        if let Some(d) = self.decide.take() {
            let _ = d.send(Decision::Commit(Box::new(record.clone())));
        }
        let done = self.join()?;
        if !done.url.ends_with(key) {
            return Err(Error::Internal(format!(
                "the upload went to {} instead of `{key}`",
                done.url
            )));
        }
        Ok(done)
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

/// The upload's thread: a multipart upload straight to the archive's final key, parts sent
/// as the archive is written (two in flight), completed only once the archive is verified
/// and published locally, with `If-None-Match: *` (never over an object already there) and
/// the whole object's CRC64NVME (`x-amz-checksum-type: FULL_OBJECT`), for servers that check
/// it. Then the record object, written once: the archive counts as complete only with it.
/// Any failure before completion aborts the upload; no copy is ever made.
fn upload_thread(
    cfg: StoreConfig,
    folder: String,
    mut data_rx: tokio::sync::mpsc::Receiver<Msg>,
    decide_rx: Receiver<Decision>,
) -> Result<Uploaded, Error> {
    use object_store::multipart::MultipartStore;
    let store_err = |what: String, e: object_store::Error| Error::Store {
        store: cfg.describe(),
        problem: bounded(&format!("{what}: {e}"), 2048),
    };
    let rt = runtime()?;
    let s3 = Arc::new(cfg.client_with(Vec::new(), true)?);
    let mut received = Received {
        crc64: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme),
        bytes: 0,
    };
    let started = rt.block_on(async {
        // The bucket must exist (some servers would create it on the first write).
        s3.list_with_delimiter(Some(&ObjectPath::from(folder.as_str())))
            .await
            .map_err(|e| store_err("cannot list the bucket".into(), e))?;
        let key = match data_rx.recv().await {
            Some(Msg::Begin(name)) => format!("{folder}/{name}"),
            // The writer stopped before naming its archive.
            _ => return Ok(None),
        };
        let path = ObjectPath::from(key.as_str());
        let mut opts = PutMultipartOptions::default();
        if let Some(class) = &cfg.storage_class {
            opts.attributes
                .insert(Attribute::StorageClass, class.clone().into());
        }
        let id = s3
            .create_multipart_opts(&path, opts)
            .await
            .map_err(|e| store_err(format!("cannot start the upload of `{key}`"), e))?;
        let sent = send_parts(&s3, &path, &id, &mut data_rx, &mut received).await;
        match sent {
            Ok(parts) => Ok(Some((key, id, parts))),
            Err(e) => {
                let _ = s3.abort_multipart(&path, &id).await;
                Err(store_err(format!("uploading a part of `{key}` failed"), e))
            }
        }
    });
    let Some((key, id, parts)) = started? else {
        return Err(Error::Store {
            store: cfg.describe(),
            problem: "the upload was aborted before it began".into(),
        });
    };
    let path = ObjectPath::from(key.as_str());
    // All data is in; wait for the archive to be verified and published.
    let decision = decide_rx.recv().unwrap_or(Decision::Abort);
    let Decision::Commit(record) = decision else {
        let _ = rt.block_on(s3.abort_multipart(&path, &id));
        return Err(Error::Store {
            store: cfg.describe(),
            problem: "the upload was aborted".into(),
        });
    };
    if !key.ends_with(&format!("/{}", record.archive)) || received.bytes != record.size {
        let _ = rt.block_on(s3.abort_multipart(&path, &id));
        return Err(Error::Store {
            store: cfg.describe(),
            problem: format!(
                "the upload of `{key}` received {} bytes, not the archive `{}` ({} bytes); it \
                 was aborted",
                received.bytes, record.archive, record.size
            ),
        });
    }
    let crc = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(received.crc64.finalize().to_be_bytes())
    };
    let completer = cfg.client_with(
        vec![
            ("if-none-match".into(), "*".into()),
            ("x-amz-checksum-crc64nvme".into(), crc),
            ("x-amz-checksum-type".into(), "FULL_OBJECT".into()),
        ],
        true,
    )?;
    let completed = rt.block_on(completer.complete_multipart(&path, &id, parts));
    match completed {
        Ok(_) => {}
        Err(
            object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. },
        ) => {
            let _ = rt.block_on(s3.abort_multipart(&path, &id));
            // Ours already (an upload retried after its record was lost or never written)?
            if !object_is(&rt, &s3, &cfg, &key, &record)? {
                return Err(Error::StoreConflict {
                    store: cfg.describe(),
                    key,
                });
            }
        }
        Err(e) => {
            let _ = rt.block_on(s3.abort_multipart(&path, &id));
            return Err(store_err(
                format!("completing the upload of `{key}` failed"),
                e,
            ));
        }
    }
    crate::points::crash_point("upload-before-record");
    write_record(&rt, &s3, &cfg, &key, &record)?;
    let head = rt
        .block_on(s3.head(&path))
        .map_err(|e| store_err(format!("cannot read back `{key}`"), e))?;
    Ok(Uploaded {
        url: cfg.url(&key),
        etag: head.e_tag.unwrap_or_default().trim_matches('"').to_string(),
        size: head.size,
    })
}

/// A part's buffer, lent to the request that sends it: when the request is done with it (the
/// last `Bytes` of it dropped), it goes back to the upload for the next part. An upload
/// allocates three buffers in all (one filling, two in flight), not one per part.
struct PartBuf {
    data: Vec<u8>,
    home: std::sync::mpsc::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for PartBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for PartBuf {
    fn drop(&mut self) {
        let mut data = std::mem::take(&mut self.data);
        data.clear();
        let _ = self.home.send(data);
    }
}

/// Sends the archive's bytes as parts of `PART`, two in flight, counting and checksumming them
/// as they pass.
async fn send_parts(
    s3: &Arc<AmazonS3>,
    path: &ObjectPath,
    id: &str,
    data_rx: &mut tokio::sync::mpsc::Receiver<Msg>,
    received: &mut Received,
) -> Result<Vec<object_store::multipart::PartId>, object_store::Error> {
    use object_store::multipart::MultipartStore;
    let mut in_flight = tokio::task::JoinSet::new();
    let mut parts = BTreeMap::new();
    let mut buf: Vec<u8> = Vec::with_capacity(PART);
    let mut next = 0usize;
    type Parts =
        tokio::task::JoinSet<Result<(usize, object_store::multipart::PartId), object_store::Error>>;
    let (home, returned) = std::sync::mpsc::channel::<Vec<u8>>();
    let fresh = || {
        returned
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(PART))
    };
    let send = |data: Vec<u8>, idx: usize, in_flight: &mut Parts| {
        let (s3, path, id) = (s3.clone(), path.clone(), id.to_string());
        let payload = bytes::Bytes::from_owner(PartBuf {
            data,
            home: home.clone(),
        });
        in_flight.spawn(async move {
            let part = s3.put_part(&path, &id, idx, payload.into()).await?;
            Ok((idx, part))
        });
    };
    let joined = |r: Result<_, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| {
            Err(object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })
        })
    };
    while let Some(msg) = data_rx.recv().await {
        let Msg::Data(chunk) = msg else { continue };
        received.crc64.update(&chunk);
        received.bytes += chunk.len() as u64;
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let n = rest.len().min(PART - buf.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if buf.len() == PART {
                while in_flight.len() >= 2 {
                    if let Some(r) = in_flight.join_next().await {
                        let (idx, part) = joined(r)?;
                        parts.insert(idx, part);
                    }
                }
                send(std::mem::replace(&mut buf, fresh()), next, &mut in_flight);
                next += 1;
            }
        }
    }
    if !buf.is_empty() || next == 0 {
        send(buf, next, &mut in_flight);
    }
    while let Some(r) = in_flight.join_next().await {
        let (idx, part) = joined(r)?;
        parts.insert(idx, part);
    }
    Ok(parts.into_values().collect())
}

/// Whether the object at `key` is the archive `record` describes: its record says so, or,
/// with no record, its bytes hash to the record's sha256 (then the record is written).
fn object_is(
    rt: &tokio::runtime::Runtime,
    s3: &AmazonS3,
    cfg: &StoreConfig,
    key: &str,
    record: &crate::manifest::Record,
) -> Result<bool, Error> {
    use sha2::Digest;
    if let Some(there) = read_record(rt, s3, cfg, key)? {
        return Ok(there.sha256 == record.sha256 && there.size == record.size);
    }
    let fail = |e: object_store::Error| Error::Store {
        store: cfg.describe(),
        problem: bounded(&format!("cannot read `{key}`: {e}"), 2048),
    };
    rt.block_on(async {
        let got = s3.get(&ObjectPath::from(key)).await.map_err(fail)?;
        if got.meta.size != record.size {
            return Ok(false);
        }
        let mut stream = got.into_stream();
        let mut h = sha2::Sha256::new();
        while let Some(piece) = stream.next().await {
            h.update(&piece.map_err(fail)?);
        }
        Ok(hex::encode(h.finalize()) == record.sha256)
    })
}

/// Reads the record beside `key`, if there is one (bounded; an unreadable one is none).
fn read_record(
    rt: &tokio::runtime::Runtime,
    s3: &AmazonS3,
    cfg: &StoreConfig,
    key: &str,
) -> Result<Option<crate::manifest::Record>, Error> {
    let name = key.rsplit('/').next().unwrap_or(key);
    Ok(get_small(rt, s3, cfg, &record_key(key))?
        .and_then(|text| crate::manifest::Record::from_yaml(&text, name).ok()))
}

/// The object at `key` as text when it is at most `RECORD_MAX` bytes; `None` when absent,
/// larger or not UTF-8.
fn get_small(
    rt: &tokio::runtime::Runtime,
    s3: &AmazonS3,
    cfg: &StoreConfig,
    key: &str,
) -> Result<Option<String>, Error> {
    let fail = |e: object_store::Error| Error::Store {
        store: cfg.describe(),
        problem: bounded(&format!("cannot read `{key}`: {e}"), 2048),
    };
    rt.block_on(async {
        let got = match s3.get(&ObjectPath::from(key)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(fail(e)),
        };
        if got.meta.size > crate::manifest::RECORD_MAX {
            return Ok(None);
        }
        let mut stream = got.into_stream();
        let mut out = Vec::new();
        while let Some(piece) = stream.next().await {
            out.extend_from_slice(&piece.map_err(fail)?);
            if out.len() as u64 > crate::manifest::RECORD_MAX {
                return Ok(None);
            }
        }
        Ok(String::from_utf8(out).ok())
    })
}

/// Writes the record of the archive at `key`, once: a record already there is fine only when
/// it describes the same bytes.
fn write_record(
    rt: &tokio::runtime::Runtime,
    s3: &AmazonS3,
    cfg: &StoreConfig,
    key: &str,
    record: &crate::manifest::Record,
) -> Result<(), Error> {
    let rkey = record_key(key);
    let opts = object_store::PutOptions {
        mode: object_store::PutMode::Create,
        ..Default::default()
    };
    let put = rt.block_on(s3.put_opts(
        &ObjectPath::from(rkey.as_str()),
        record.to_yaml().into_bytes().into(),
        opts,
    ));
    match put {
        Ok(_) => Ok(()),
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => match read_record(rt, s3, cfg, key)? {
            Some(r) if r.sha256 == record.sha256 && r.size == record.size => Ok(()),
            _ => Err(Error::StoreConflict {
                store: cfg.describe(),
                key: rkey,
            }),
        },
        Err(e) => Err(Error::Store {
            store: cfg.describe(),
            problem: bounded(
                &format!(
                    "the archive `{key}` is complete but its record `{rkey}` could not be \
                     written ({e}); until it is, the archive is listed as incomplete. The next \
                     `snapshot --if-changed` (or `backup`) writes it"
                ),
                2048,
            ),
        }),
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
    tx: Option<tokio::sync::mpsc::Sender<Msg>>,
}

impl UploadTee {
    /// Names the archive: the upload goes to `<folder>/<name>`.
    pub fn begin(&mut self, name: &str) {
        self.put(Msg::Begin(name.to_string()));
    }

    pub fn send(&mut self, chunk: &[u8]) {
        self.put(Msg::Data(chunk.to_vec()));
    }

    fn put(&mut self, msg: Msg) {
        if let Some(tx) = &self.tx {
            if tx.blocking_send(msg).is_err() {
                self.tx = None;
            }
        }
    }
}

/// Reads an object as a stream on a thread of its own: bounded memory whatever its size.
pub struct ObjectReader {
    pieces: crate::pipe::PieceReader,
    _handle: JoinHandle<()>,
}

impl ObjectReader {
    fn start(cfg: StoreConfig, key: String) -> ObjectReader {
        let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(8);
        let handle = std::thread::spawn(move || {
            let run = || -> Result<(), io::Error> {
                let rt = runtime().map_err(|e| io::Error::other(e.to_string()))?;
                let s3 = cfg.client().map_err(|e| io::Error::other(e.to_string()))?;
                rt.block_on(async {
                    let got = s3.get(&ObjectPath::from(key.as_str())).await.map_err(|e| {
                        io::Error::other(format!("download of `{key}` failed: {e}"))
                    })?;
                    let mut stream = got.into_stream();
                    while let Some(piece) = stream.next().await {
                        let piece = piece.map_err(|e| {
                            io::Error::other(format!("download of `{key}` broke off: {e}"))
                        })?;
                        // (An empty piece would say the stream ended.)
                        if !piece.is_empty() && tx.send(Ok(piece.to_vec())).is_err() {
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
            // The download thread ends when the object has all been sent.
            pieces: crate::pipe::PieceReader::new(rx, true, "download"),
            _handle: handle,
        }
    }
}

impl Read for ObjectReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.pieces.read(out)
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
