//! Object storage (S3) for archives: where its settings come from (the Juju `s3` relation, or
//! `ETCD_ACTIONS_S3_*` with the standard `AWS_*` credentials standalone), and the operations
//! the actions need. The program stays synchronous: each operation runs on a small
//! current-thread tokio runtime at the edge.
//!
//! An upload is one more sink in the archive's streaming nest (`UploadTee`): parts go out
//! while the archive is written, straight to the archive's key. Only once the archive is
//! verified and published locally is the multipart upload completed. What is reported as
//! uploaded has been confirmed here, with nothing from the store but what every S3 store does:
//! - each part and each small object carries its `Content-MD5` (`guard`), and an MD5 ETag
//!   other than the body's sends the part again;
//! - before completing, the key is free (a HEAD) and claimed (`claim`): write-once holds on a
//!   store that ignores `If-None-Match`;
//! - after completing, the object is the archive: its size and multipart ETag (the MD5 of the
//!   parts' MD5s), or else its bytes read back and hashed.
//!
//! CRC64NVME checksums and `If-None-Match` are sent where the store takes them (`caps`).
//! Credentials never leave this module's memory: not in argv, not in a child's environment,
//! not in a message.

mod azure;
mod caps;
mod gcs;
mod guard;
pub use guard::percent_decode;
mod names;
mod s3;

pub use caps::{parse_checksum, take_notes, ChecksumMode};

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::AmazonS3;
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, RetryConfig,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use guard::{Connector, Watch, LIST_DEADLINE, LIST_KEYS_MAX};
use names::normalize_prefix;

use crate::error::{bounded, Error};

/// The standard credentials, taken out of the environment at start so that no child process
/// (etcdctl, etcdutl, service commands) ever inherits them.
#[derive(Clone, Default)]
pub struct Credentials {
    access_key: Option<String>,
    secret_key: Option<String>,
    session_token: Option<String>,
    /// `AZURE_STORAGE_ACCOUNT_KEY`.
    azure_key: Option<String>,
    /// The key file `GOOGLE_APPLICATION_CREDENTIALS` named, read at start (or why it could not
    /// be).
    gcs_key: Option<Result<String, String>>,
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
            azure_key: take("AZURE_STORAGE_ACCOUNT_KEY"),
            gcs_key: gcs::take_key_from_env().transpose(),
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
    /// `auto`, `crc64nvme` or `md5` (`--s3-checksum`).
    pub checksum: Option<String>,
    /// `ETCD_ACTIONS_AZURE_ENDPOINT`, `_ACCOUNT`, `_CONTAINER`, `_PATH`.
    pub azure_endpoint: Option<String>,
    pub azure_account: Option<String>,
    pub azure_container: Option<String>,
    pub azure_path: Option<String>,
    /// `ETCD_ACTIONS_GCS_BUCKET`, `_PATH`.
    pub gcs_bucket: Option<String>,
    pub gcs_path: Option<String>,
    pub credentials: Credentials,
}

/// Set in the follow service's environment under Juju: the unit whose `gcs-credentials`
/// relation holds the GCS key, read through `juju-exec` at start.
pub const GCS_KEY_FROM_UNIT: &str = "ETCD_ACTIONS_GCS_KEY_FROM_UNIT";

/// The kind of store, and what only that kind needs.
#[derive(Clone)]
pub enum Kind {
    S3(s3::S3Keys),
    Azure(azure::AzureKeys),
    Gcs(gcs::GcsKey),
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
    pub ca_pems: Vec<String>,
    pub storage_class: Option<String>,
    pub checksum: ChecksumMode,
    pub kind: Kind,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl StoreConfig {
    /// From the `s3` relation's provider bag (secret fields already merged in).
    pub fn from_relation_bag(bag: &BTreeMap<String, String>) -> Result<StoreConfig, Error> {
        Ok(StoreConfig::s3(s3::from_bag(bag)?))
    }

    /// From the standalone settings; `None` when no bucket is set.
    pub fn from_settings(s: &StoreSettings) -> Result<Option<StoreConfig>, Error> {
        let set = |v: &Option<String>| v.as_deref().is_some_and(|b| !b.trim().is_empty());
        let chosen: Vec<&str> = [
            (set(&s.bucket), "ETCD_ACTIONS_S3_BUCKET"),
            (set(&s.azure_container), "ETCD_ACTIONS_AZURE_CONTAINER"),
            (set(&s.gcs_bucket), "ETCD_ACTIONS_GCS_BUCKET"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if chosen.len() > 1 {
            return Err(Error::Usage(format!(
                "{} are all set: archives go to one store at a time; unset all but one",
                chosen.join(" and ")
            )));
        }
        if let Some(container) = s
            .azure_container
            .as_deref()
            .filter(|_| set(&s.azure_container))
        {
            let place = azure::from_settings(
                s.azure_endpoint.as_deref(),
                s.azure_account.as_deref(),
                container,
                s.azure_path.as_deref(),
                s.credentials.azure_key.as_deref(),
            )?;
            return Ok(Some(StoreConfig::azure(place, Vec::new())));
        }
        if let Some(bucket) = s.gcs_bucket.as_deref().filter(|_| set(&s.gcs_bucket)) {
            let fetched;
            let key = match &s.credentials.gcs_key {
                Some(Err(e)) => return Err(Error::Usage(e.clone())),
                Some(Ok(k)) => Some(k.as_str()),
                // The follow service under Juju: the key through `juju-exec`, into memory.
                None => match std::env::var(GCS_KEY_FROM_UNIT)
                    .ok()
                    .filter(|u| !u.is_empty())
                {
                    Some(unit) => {
                        let exe = std::env::current_exe()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|_| "etcd-actions".into());
                        fetched = crate::juju::gcs_key_via_exec(&unit, &exe)?;
                        Some(fetched.as_str())
                    }
                    None => None,
                },
            };
            let place = gcs::from_settings(bucket, s.gcs_path.as_deref(), key)?;
            return Ok(Some(StoreConfig::gcs(place)));
        }
        let Some(bucket) = s.bucket.as_deref().filter(|b| !b.trim().is_empty()) else {
            return Ok(None);
        };
        let place = s3::from_settings(&s3::S3Settings {
            endpoint: s.endpoint.as_deref(),
            bucket,
            path: s.path.as_deref(),
            region: s.region.as_deref(),
            uri_style: s.uri_style.as_deref(),
            ca_file: s.ca_file.as_deref(),
            checksum: s.checksum.as_deref(),
            access_key: s.credentials.access_key.as_deref(),
            secret_key: s.credentials.secret_key.as_deref(),
            session_token: s.credentials.session_token.as_deref(),
        })?;
        Ok(Some(StoreConfig::s3(place)))
    }

    fn s3(place: s3::S3Place) -> StoreConfig {
        StoreConfig {
            endpoint: place.endpoint,
            bucket: place.bucket,
            prefix: normalize_prefix(&place.path),
            ca_pems: place.ca_pems,
            storage_class: place.storage_class,
            checksum: place.checksum,
            kind: Kind::S3(place.keys),
        }
    }

    fn azure(place: azure::AzurePlace, ca_pems: Vec<String>) -> StoreConfig {
        StoreConfig {
            endpoint: Some(place.endpoint),
            bucket: place.container,
            prefix: normalize_prefix(&place.path),
            ca_pems,
            storage_class: None,
            checksum: ChecksumMode::Md5,
            kind: Kind::Azure(place.keys),
        }
    }

    fn gcs(place: gcs::GcsPlace) -> StoreConfig {
        StoreConfig {
            endpoint: place.key.base_url.clone(),
            bucket: place.bucket,
            prefix: normalize_prefix(&place.path),
            ca_pems: Vec::new(),
            storage_class: place.storage_class,
            checksum: ChecksumMode::Md5,
            kind: Kind::Gcs(place.key),
        }
    }

    /// From the `azure-storage-credentials` relation's provider bag (secret fields merged in).
    pub fn from_azure_bag(bag: &BTreeMap<String, String>) -> Result<StoreConfig, Error> {
        Ok(StoreConfig::azure(azure::from_bag(bag)?, Vec::new()))
    }

    /// From the `gcs-credentials` relation's provider bag (secret fields merged in).
    pub fn from_gcs_bag(bag: &BTreeMap<String, String>) -> Result<StoreConfig, Error> {
        Ok(StoreConfig::gcs(gcs::from_bag(bag)?))
    }

    /// From the provider bag of the store relation at `endpoint` (secret fields merged in).
    pub fn from_relation(
        endpoint: &str,
        bag: &BTreeMap<String, String>,
    ) -> Result<StoreConfig, Error> {
        match endpoint {
            crate::juju::AZURE_ENDPOINT => StoreConfig::from_azure_bag(bag),
            crate::juju::GCS_ENDPOINT => StoreConfig::from_gcs_bag(bag),
            _ => StoreConfig::from_relation_bag(bag),
        }
    }

    /// The location label of this kind of store: `store` (S3), `azure`, `gcs`.
    pub fn location(&self) -> &'static str {
        match self.kind {
            Kind::S3(_) => "store",
            Kind::Azure(_) => "azure",
            Kind::Gcs(_) => "gcs",
        }
    }

    /// The standalone settings that reach this store (for a service that runs outside a hook:
    /// `follow` under the charm): public settings, and the secrets apart. The CA chain, when
    /// there is one, is written by the caller to `ca_file`.
    pub fn env_pairs(&self, ca_file: Option<&std::path::Path>) -> (EnvPairs, EnvPairs) {
        match &self.kind {
            Kind::S3(keys) => s3::env_pairs(
                keys,
                (self.endpoint.as_deref(), &self.bucket, &self.prefix),
                self.checksum,
                ca_file.filter(|_| !self.ca_pems.is_empty()),
            ),
            Kind::Azure(keys) => {
                let endpoint = self.endpoint.clone().unwrap_or_default();
                azure::env_pairs(keys, &endpoint, &self.bucket, &self.prefix)
            }
            Kind::Gcs(_) => {
                // The key is never written to disk: the service reads it through `juju-exec`
                // into memory at start (`GCS_KEY_FROM_UNIT`, set by the caller).
                let mut public = vec![("ETCD_ACTIONS_GCS_BUCKET".to_string(), self.bucket.clone())];
                if !self.prefix.is_empty() {
                    public.push(("ETCD_ACTIONS_GCS_PATH".into(), self.prefix.clone()));
                }
                (public, Vec::new())
            }
        }
    }

    /// How the store is named in messages: endpoint and bucket, never a credential.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::S3(keys) => format!(
                "bucket `{}` at {}",
                self.bucket,
                self.endpoint
                    .clone()
                    .unwrap_or_else(|| format!("AWS S3 ({})", keys.region))
            ),
            Kind::Azure(keys) => format!(
                "Azure container `{}` of account `{}` at {}",
                self.bucket,
                keys.account,
                self.endpoint.clone().unwrap_or_default()
            ),
            Kind::Gcs(_) => format!(
                "GCS bucket `{}`{}",
                self.bucket,
                self.endpoint
                    .as_deref()
                    .map(|e| format!(" at {e}"))
                    .unwrap_or_default()
            ),
        }
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
        let scheme = match self.kind {
            Kind::S3(_) => "s3",
            Kind::Azure(_) => "azure",
            Kind::Gcs(_) => "gs",
        };
        format!("{scheme}://{}/{key}", self.bucket)
    }

    /// The HTTP client under object_store: ours, so that it never follows a redirect to
    /// another host and a listing page cannot be endless or huge. Building one loads the
    /// system's CA certificates (tens of milliseconds of CPU), and its connections belong to
    /// the runtime that uses it: each runtime (a `Store`, an upload's thread) builds one and
    /// shares it between its object_store clients.
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

    fn client(&self) -> Result<Arc<dyn Remote>, Error> {
        self.client_watched(&self.http()?, &Watch::default(), Vec::new(), false)
    }

    /// A client over `watch`'s HTTP layer whose requests carry `headers` where object_store
    /// adds its default headers (before signing: the completion of a multipart upload among
    /// them); with `checksums`, each part of an upload carries its CRC64NVME.
    fn client_watched(
        &self,
        http: &reqwest::Client,
        watch: &Watch,
        headers: Vec<(String, String)>,
        checksums: bool,
    ) -> Result<Arc<dyn Remote>, Error> {
        let connector = Connector {
            client: http.clone(),
            watch: watch.clone(),
        };
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 5,
            retry_timeout: Duration::from_secs(20),
        };
        let options = ClientOptions::new()
            .with_allow_http(
                self.endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            )
            .with_default_headers(header_map(headers)?);
        let fail = |e: object_store::Error| Error::Store {
            store: self.describe(),
            problem: e.to_string(),
        };
        match &self.kind {
            Kind::S3(keys) => Ok(Arc::new(
                s3::client(
                    keys,
                    (self.endpoint.as_deref(), &self.bucket),
                    options,
                    connector,
                    (retry, checksums),
                )
                .map_err(fail)?,
            )),
            Kind::Azure(keys) => {
                let endpoint = self.endpoint.clone().unwrap_or_default();
                Ok(Arc::new(
                    azure::client(keys, &endpoint, &self.bucket, options, connector, retry)
                        .map_err(fail)?,
                ))
            }
            Kind::Gcs(key) => Ok(Arc::new(
                gcs::client(key, &self.bucket, options, connector, retry).map_err(fail)?,
            )),
        }
    }

    /// The signer of single DELETEs on S3 (`None` elsewhere).
    fn signer(&self, http: &reqwest::Client) -> Result<Option<AmazonS3>, Error> {
        let Kind::S3(keys) = &self.kind else {
            return Ok(None);
        };
        let connector = Connector {
            client: http.clone(),
            watch: Watch::default(),
        };
        let options = ClientOptions::new().with_allow_http(
            self.endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://")),
        );
        s3::client(
            keys,
            (self.endpoint.as_deref(), &self.bucket),
            options,
            connector,
            (RetryConfig::default(), false),
        )
        .map(Some)
        .map_err(|e| Error::Store {
            store: self.describe(),
            problem: e.to_string(),
        })
    }
}

/// What the agent needs of a store client: object_store's calls and multipart uploads.
pub trait Remote: ObjectStore + MultipartStore {}

impl<T: ObjectStore + MultipartStore> Remote for T {}

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
    s3: Arc<dyn Remote>,
    /// S3 only: signs single DELETEs.
    signer: Option<AmazonS3>,
    /// For requests object_store makes otherwise (a single DELETE).
    http: reqwest::Client,
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

static LOCATION: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The location label of the store this process opened (`store`, `azure`, `gcs`), if any.
pub fn location_used() -> Option<&'static str> {
    LOCATION.get().copied()
}

impl Store {
    pub fn open(cfg: StoreConfig) -> Result<Store, Error> {
        let _ = LOCATION.set(cfg.location());
        let watch = Watch::default();
        let http = cfg.http()?;
        let s3 = cfg.client_watched(&http, &watch, Vec::new(), false)?;
        Ok(Store {
            rt: runtime()?,
            s3,
            signer: cfg.signer(&http)?,
            http,
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
        head_of(&self.rt, &*self.s3, &self.cfg, key)
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

    /// Deletes the object at `key` (gone already is fine).
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        delete_one(
            &self.rt,
            (&*self.s3, self.signer.as_ref()),
            &self.http,
            &self.cfg,
            key,
        )
    }

    /// Starts an upload into `folder`: a multipart upload to a temporary key there, fed by
    /// its `tee()`, and given its final key at `commit`.
    pub fn start_upload(&self, folder: &str) -> Upload {
        Upload::start(self.cfg.clone(), folder.to_string())
    }

    /// The record object beside the archive at `key` (`<key>.manifest.yaml`), when there is
    /// a readable one.
    pub fn record(&self, key: &str) -> Result<Option<crate::manifest::Record>, Error> {
        read_record(&self.rt, &*self.s3, &self.cfg, key)
    }

    /// Writes a small object (a change segment) once: an object already at `key` is fine
    /// only when it holds the same bytes. Confirmed by reading it back.
    pub fn put_once(&self, key: &str, bytes: Vec<u8>) -> Result<(), Error> {
        let same = bytes.clone();
        put_small_once(&self.rt, &*self.s3, &self.cfg, key, bytes, &|b| b == same)
    }

    /// The object at `key` when it is at most `max` bytes; `None` when absent or larger.
    pub fn get_bytes(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>, Error> {
        Ok(
            match get_limited(&self.rt, &*self.s3, &self.cfg, key, max)? {
                Small::Bytes(b) => Some(b),
                _ => None,
            },
        )
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
    /// The object's size, confirmed.
    pub size: u64,
    /// How the object was confirmed to be the archive.
    pub confirmed: Confirmed,
    /// The integrity header its parts carried: `crc64nvme` (and Content-MD5), or `md5`.
    pub checksum: &'static str,
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

/// The upload's thread: a multipart upload straight to the archive's final key, parts sent as
/// the archive is written (two in flight), completed only once the archive is verified and
/// published locally; then confirmed, and its record written once. Stages: `start` (create and
/// send), the decision, `claim` (the key is free and ours to write), `complete`, `confirm`, the
/// record. Any failure before completion aborts the upload; no copy is ever made.
fn upload_thread(
    cfg: StoreConfig,
    folder: String,
    mut data_rx: tokio::sync::mpsc::Receiver<Msg>,
    decide_rx: Receiver<Decision>,
) -> Result<Uploaded, Error> {
    let up = Uploader::new(cfg)?;
    let mut received = Received {
        crc64: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme),
        bytes: 0,
    };
    let Some(started) = up.start(&folder, &mut data_rx, &mut received)? else {
        return Err(up.problem("the upload was aborted before it began".into()));
    };
    // All data is in; wait for the archive to be verified and published.
    let decision = decide_rx.recv().unwrap_or(Decision::Abort);
    let Decision::Commit(record) = decision else {
        up.abort(&started);
        return Err(up.problem("the upload was aborted".into()));
    };
    let key = &started.key;
    if !key.ends_with(&format!("/{}", record.archive)) || received.bytes != record.size {
        up.abort(&started);
        return Err(up.problem(format!(
            "the upload of `{key}` received {} bytes, not the archive `{}` ({} bytes); it was \
             aborted",
            received.bytes, record.archive, record.size
        )));
    }
    let expected = up
        .watch
        .part_digests(&started.id, started.parts.len())
        .map(|d| multipart_etag(&d));
    let mine = match up.claim(key, &record, expected.as_deref())? {
        Claim::Free(mine) => mine,
        Claim::Ours(confirmed, etag) => {
            // Ours already (an upload retried after its record was lost or never written).
            up.abort(&started);
            write_record(&up.rt, &*up.plain, &up.cfg, key, &record)?;
            return Ok(up.uploaded(key, &record, confirmed, etag, started.crc));
        }
        Claim::Taken => {
            up.abort(&started);
            return Err(Error::StoreConflict {
                store: up.cfg.describe(),
                key: key.clone(),
            });
        }
    };
    let done = up.complete_and_confirm(&started, &record, &received, expected.as_deref());
    up.release(&mine);
    let (confirmed, etag) = done?;
    crate::points::crash_point("upload-before-record");
    write_record(&up.rt, &*up.plain, &up.cfg, key, &record)?;
    Ok(up.uploaded(key, &record, confirmed, etag, started.crc))
}

/// How an object was confirmed to be the archive sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmed {
    /// Its size, and its multipart ETag: the MD5 of the MD5s of the parts as sent.
    ETag,
    /// Its bytes read back: their size and sha256.
    ReadBack,
}

impl Confirmed {
    pub fn as_str(self) -> &'static str {
        match self {
            Confirmed::ETag => "size and multipart etag",
            Confirmed::ReadBack => "size and sha256 read back",
        }
    }
}

/// The ETag S3 stores give a multipart object: the MD5 of the parts' MD5s, and their number.
fn multipart_etag(parts: &[[u8; 16]]) -> String {
    use md5::Digest;
    let mut h = md5::Md5::new();
    for p in parts {
        h.update(p);
    }
    format!("{}-{}", hex::encode(h.finalize()), parts.len())
}

fn plain_etag(etag: &str) -> String {
    etag.trim().trim_matches('"').to_ascii_lowercase()
}

/// An upload begun: its key, its id, its parts sent, and whether it carries CRC64NVME.
struct Started {
    key: String,
    id: String,
    parts: Vec<object_store::multipart::PartId>,
    crc: bool,
}

/// What `confirm` found at a key.
enum Found {
    Absent,
    /// This archive, confirmed so, with its ETag.
    Archive(Confirmed, String),
    /// Another object (its ETag).
    Other(String),
}

/// What `claim` found.
enum Claim {
    /// The key is free and claimed by this upload (the claim object's key).
    Free(String),
    /// The key already holds this very archive.
    Ours(Confirmed, String),
    /// The key holds, or is being written with, another archive.
    Taken,
}

/// Claim rounds before a key held by another writer's claim counts as taken, and the pause
/// between them.
const CLAIM_ROUNDS: u32 = 8;

/// The upload thread's clients: one without checksum headers, one with (used while the store
/// takes them), both over one HTTP layer that keeps the MD5s of the parts.
struct Uploader {
    cfg: StoreConfig,
    rt: tokio::runtime::Runtime,
    watch: Watch,
    plain: Arc<dyn Remote>,
    crc: Arc<dyn Remote>,
    signer: Option<AmazonS3>,
    http: reqwest::Client,
}

impl Uploader {
    fn new(cfg: StoreConfig) -> Result<Uploader, Error> {
        let watch = Watch::default();
        let http = cfg.http()?;
        Ok(Uploader {
            rt: runtime()?,
            plain: cfg.client_watched(&http, &watch, Vec::new(), false)?,
            crc: cfg.client_watched(&http, &watch, Vec::new(), true)?,
            signer: cfg.signer(&http)?,
            http,
            watch,
            cfg,
        })
    }

    fn client(&self, u: caps::Using) -> Arc<dyn Remote> {
        if u.checksums {
            self.crc.clone()
        } else {
            self.plain.clone()
        }
    }

    fn problem(&self, problem: String) -> Error {
        Error::Store {
            store: self.cfg.describe(),
            problem,
        }
    }

    fn fail(&self, what: String, e: impl std::fmt::Display) -> Error {
        self.problem(bounded(&format!("{what}: {e}"), 2048))
    }

    fn abort(&self, st: &Started) {
        let path = ObjectPath::from(st.key.as_str());
        let _ = self.rt.block_on(self.plain.abort_multipart(&path, &st.id));
        self.watch.forget(&st.id);
    }

    fn uploaded(
        &self,
        key: &str,
        record: &crate::manifest::Record,
        confirmed: Confirmed,
        etag: String,
        crc: bool,
    ) -> Uploaded {
        Uploaded {
            url: self.cfg.url(key),
            etag,
            size: record.size,
            confirmed,
            checksum: if crc { "crc64nvme" } else { "md5" },
        }
    }

    /// Creates the multipart upload once the archive is named, and sends its parts as they
    /// come. `None`: the writer stopped before naming its archive.
    fn start(
        &self,
        folder: &str,
        data_rx: &mut tokio::sync::mpsc::Receiver<Msg>,
        received: &mut Received,
    ) -> Result<Option<Started>, Error> {
        let mode = self.cfg.checksum;
        self.rt.block_on(async {
            // The bucket must exist (some servers would create it on the first write).
            self.plain
                .list_with_delimiter(Some(&ObjectPath::from(folder)))
                .await
                .map_err(|e| self.fail("cannot list the bucket".into(), e))?;
            let key = match data_rx.recv().await {
                Some(Msg::Begin(name)) => format!("{folder}/{name}"),
                _ => return Ok(None),
            };
            let path = ObjectPath::from(key.as_str());
            let mut opts = PutMultipartOptions::default();
            if let Some(class) = &self.cfg.storage_class {
                opts.attributes
                    .insert(Attribute::StorageClass, class.clone().into());
            }
            let (id, crc) = loop {
                let u = caps::using(mode);
                match self
                    .client(u)
                    .create_multipart_opts(&path, opts.clone())
                    .await
                {
                    Err(_) if caps::using(mode) != u => continue,
                    Err(e) => {
                        return Err(self.fail(
                            format!("cannot start the upload of `{key}`{}", pinned_hint(mode)),
                            e,
                        ))
                    }
                    Ok(id) => break (id, u.checksums),
                }
            };
            let clients = (self.plain.clone(), self.crc.clone(), mode);
            let sent = send_parts(clients, &path, &id, data_rx, received).await;
            match sent {
                Ok(parts) => Ok(Some(Started {
                    key,
                    id,
                    parts,
                    crc,
                })),
                Err(e) => {
                    let _ = self.plain.abort_multipart(&path, &id).await;
                    Err(self.fail(
                        format!("uploading a part of `{key}` failed{}", pinned_hint(mode)),
                        e,
                    ))
                }
            }
        })
    }

    /// Whether `key` is free, and this upload's to write: free by a HEAD, then claimed by an
    /// object of its own under `<folder>/.claims/<name>/` that turned out to be the only
    /// claim there. Two writers cannot both see only their own claim on a store that lists
    /// what was written (S3's strong consistency); when both see two, both withdraw and try
    /// again after a random pause, until one is alone or the key holds an archive.
    fn claim(
        &self,
        key: &str,
        record: &crate::manifest::Record,
        expected: Option<&str>,
    ) -> Result<Claim, Error> {
        let (dir, name) = key.rsplit_once('/').unwrap_or(("", key));
        let claims = format!("{dir}/.claims/{name}");
        let mine = format!("{claims}/{}", claim_token());
        for round in 0..CLAIM_ROUNDS {
            match self.confirm(key, record, expected)? {
                Found::Absent => {}
                Found::Archive(c, etag) => return Ok(Claim::Ours(c, etag)),
                Found::Other(_) => return Ok(Claim::Taken),
            }
            let body = format!("{}\n", record.sha256).into_bytes();
            self.rt
                .block_on(
                    self.plain
                        .put(&ObjectPath::from(mine.as_str()), body.into()),
                )
                .map_err(|e| self.fail(format!("cannot write the claim `{mine}`"), e))?;
            let others = self.rt.block_on(async {
                let mut out = Vec::new();
                let mut stream = self.plain.list(Some(&ObjectPath::from(claims.as_str())));
                while let Some(item) = stream.next().await {
                    let k = item?.location.to_string();
                    if k != mine {
                        out.push(k);
                    }
                }
                Ok::<_, object_store::Error>(out)
            });
            let others = others.map_err(|e| self.fail(format!("cannot list `{claims}/`"), e))?;
            if others.is_empty() {
                return Ok(Claim::Free(mine));
            }
            self.release(&mine);
            std::thread::sleep(jitter(round));
        }
        Ok(Claim::Taken)
    }

    fn release(&self, claim: &str) {
        let _ = self.delete(claim);
    }

    fn delete(&self, key: &str) -> Result<(), Error> {
        delete_one(
            &self.rt,
            (&*self.plain, self.signer.as_ref()),
            &self.http,
            &self.cfg,
            key,
        )
    }

    /// Completes the upload (with `If-None-Match: *` and the whole object's CRC64NVME where
    /// the store takes them), then confirms what the key holds. An object that is not the
    /// archive but is the one this completion made (bytes changed on the way and not caught
    /// before) is removed.
    fn complete_and_confirm(
        &self,
        st: &Started,
        record: &crate::manifest::Record,
        received: &Received,
        expected: Option<&str>,
    ) -> Result<(Confirmed, String), Error> {
        let key = &st.key;
        let path = ObjectPath::from(key.as_str());
        let crc = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .encode(received.crc64.clone().finalize().to_be_bytes())
        };
        let completed = loop {
            let u = caps::using(self.cfg.checksum);
            let mut headers = Vec::new();
            if u.conditional {
                headers.push(match self.cfg.kind {
                    // GCS's XML API: create only if no live object is there.
                    Kind::Gcs(_) => ("x-goog-if-generation-match".to_string(), "0".to_string()),
                    // S3's CompleteMultipartUpload, Azure's Put Block List.
                    _ => ("if-none-match".to_string(), "*".to_string()),
                });
            }
            if st.crc && u.checksums {
                headers.push(("x-amz-checksum-crc64nvme".into(), crc.clone()));
                headers.push(("x-amz-checksum-type".into(), "FULL_OBJECT".into()));
            }
            let completer =
                self.cfg
                    .client_watched(&self.http, &self.watch, headers, st.crc && u.checksums)?;
            let r = self
                .rt
                .block_on(completer.complete_multipart(&path, &st.id, st.parts.clone()));
            match r {
                Err(_) if caps::using(self.cfg.checksum) != u => continue,
                r => break r,
            }
        };
        let made = match completed {
            Ok(put) => put.e_tag.map(|e| plain_etag(&e)),
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => {
                self.abort(st);
                return match self.confirm(key, record, expected)? {
                    Found::Archive(c, etag) => Ok((c, etag)),
                    _ => Err(Error::StoreConflict {
                        store: self.cfg.describe(),
                        key: key.clone(),
                    }),
                };
            }
            Err(e) => {
                self.abort(st);
                return Err(self.fail(format!("completing the upload of `{key}` failed"), e));
            }
        };
        self.watch.forget(&st.id);
        let now_etag = match self.confirm(key, record, expected)? {
            Found::Archive(c, etag) => return Ok((c, etag)),
            Found::Other(etag) => Some(etag).filter(|e| !e.is_empty()),
            Found::Absent => None,
        };
        if now_etag.is_some() && now_etag == made {
            self.delete(key)?;
            return Err(Error::StoreUnconfirmed {
                store: self.cfg.describe(),
                key: key.clone(),
                problem: format!(
                    "its size or sha256 differs from the archive's ({} bytes, sha256 {})",
                    record.size, record.sha256
                ),
            });
        }
        Err(Error::StoreConflict {
            store: self.cfg.describe(),
            key: key.clone(),
        })
    }

    /// Whether the object at `key` is the archive `record` describes: its size and the
    /// multipart ETag expected from the parts sent, or else its bytes read back. One HEAD.
    fn confirm(
        &self,
        key: &str,
        record: &crate::manifest::Record,
        expected: Option<&str>,
    ) -> Result<Found, Error> {
        use sha2::Digest;
        let Some(head) = head_of(&self.rt, &*self.plain, &self.cfg, key)? else {
            return Ok(Found::Absent);
        };
        let etag = head.etag.as_deref().map(plain_etag).unwrap_or_default();
        if head.size == record.size && expected.is_some_and(|e| e == etag) {
            return Ok(Found::Archive(Confirmed::ETag, etag));
        }
        if head.size != record.size && head.size != 0 {
            return Ok(Found::Other(etag));
        }
        let fail = |e: object_store::Error| self.fail(format!("cannot read back `{key}`"), e);
        let (sha, size) = self.rt.block_on(async {
            let got = self.plain.get(&ObjectPath::from(key)).await.map_err(fail)?;
            let mut stream = got.into_stream();
            let mut h = sha2::Sha256::new();
            let mut size = 0u64;
            while let Some(piece) = stream.next().await {
                let piece = piece.map_err(fail)?;
                size += piece.len() as u64;
                h.update(&piece);
            }
            Ok::<_, Error>((hex::encode(h.finalize()), size))
        })?;
        Ok(if sha == record.sha256 && size == record.size {
            Found::Archive(Confirmed::ReadBack, etag)
        } else {
            Found::Other(etag)
        })
    }
}

/// With `--s3-checksum crc64nvme` on a store that refused the checksum headers: what to set.
fn pinned_hint(mode: ChecksumMode) -> &'static str {
    if mode == ChecksumMode::Crc64nvme && caps::checksums_refused() {
        " (the store refuses CRC64NVME checksum headers and --s3-checksum is crc64nvme: set it \
         to `auto` or `md5`; in Juju, the charm's `s3-checksum` option)"
    } else {
        ""
    }
}

/// A claim's name: unique to this process and moment.
fn claim_token() -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{host}-{}-{nanos}", std::process::id())
}

/// A pause of 100 to 600 ms, different in each process.
fn jitter(round: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let mix = (nanos ^ std::process::id().wrapping_mul(2_654_435_761) ^ round.wrapping_mul(40_503))
        .wrapping_mul(2_246_822_519);
    Duration::from_millis(100 + u64::from(mix % 500))
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
    (plain, crc, mode): (Arc<dyn Remote>, Arc<dyn Remote>, ChecksumMode),
    path: &ObjectPath,
    id: &str,
    data_rx: &mut tokio::sync::mpsc::Receiver<Msg>,
    received: &mut Received,
) -> Result<Vec<object_store::multipart::PartId>, object_store::Error> {
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
        let (plain, crc, path, id) = (plain.clone(), crc.clone(), path.clone(), id.to_string());
        let payload = bytes::Bytes::from_owner(PartBuf {
            data,
            home: home.clone(),
        });
        in_flight.spawn(async move {
            // Sent again without the checksum header when the store refuses it.
            loop {
                let u = caps::using(mode);
                let s3 = if u.checksums { &crc } else { &plain };
                match s3.put_part(&path, &id, idx, payload.clone().into()).await {
                    Err(_) if caps::using(mode) != u => continue,
                    r => return Ok((idx, r?)),
                }
            }
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

/// Deletes one object with a plain `DELETE`, which every S3 store has. (object_store's own
/// delete is a multi-object `POST ?delete`, which GCS's S3 interop and Alibaba OSS lack, and
/// which carries a checksum header that stores refusing them refuse.) The request is signed
/// in its URL, for five minutes.
fn delete_one(
    rt: &tokio::runtime::Runtime,
    (remote, signer): (&dyn Remote, Option<&AmazonS3>),
    http: &reqwest::Client,
    cfg: &StoreConfig,
    key: &str,
) -> Result<(), Error> {
    use object_store::signer::Signer;
    let fail = |e: String| Error::Store {
        store: cfg.describe(),
        problem: bounded(&format!("cannot delete `{key}`: {e}"), 2048),
    };
    let Some(s3) = signer else {
        // Azure's and GCS's own deletes are one request.
        return match rt.block_on(remote.delete(&ObjectPath::from(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(fail(e.to_string())),
        };
    };
    rt.block_on(async {
        let url = s3
            .signed_url(
                http::Method::DELETE,
                &ObjectPath::from(key),
                Duration::from_secs(300),
            )
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut tries = 0;
        loop {
            tries += 1;
            let answer = http.delete(url.clone()).send().await;
            match answer {
                Ok(r) if r.status().is_success() || r.status().as_u16() == 404 => return Ok(()),
                Ok(r) if r.status().is_server_error() && tries < 4 => {}
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    return Err(fail(format!("{status}: {}", bounded(&body, 500))));
                }
                Err(e) if tries < 4 => {
                    let _ = e;
                }
                Err(e) => return Err(fail(e.to_string())),
            }
            tokio::time::sleep(Duration::from_millis(200 * tries)).await;
        }
    })
}

/// The object at `key` (size, ETag, metadata); `None` when there is none.
fn head_of(
    rt: &tokio::runtime::Runtime,
    s3: &dyn Remote,
    cfg: &StoreConfig,
    key: &str,
) -> Result<Option<ObjectInfo>, Error> {
    let opts = GetOptions {
        head: true,
        ..Default::default()
    };
    match rt.block_on(s3.get_opts(&ObjectPath::from(key), opts)) {
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
        Err(e) => Err(Error::Store {
            store: cfg.describe(),
            problem: bounded(&format!("cannot read `{key}`: {e}"), 2048),
        }),
    }
}

/// Reads the record beside `key`, if there is one (bounded; an unreadable one is none).
fn read_record(
    rt: &tokio::runtime::Runtime,
    s3: &dyn Remote,
    cfg: &StoreConfig,
    key: &str,
) -> Result<Option<crate::manifest::Record>, Error> {
    let name = key.rsplit('/').next().unwrap_or(key);
    Ok(
        match get_limited(rt, s3, cfg, &record_key(key), crate::manifest::RECORD_MAX)? {
            Small::Bytes(b) => String::from_utf8(b)
                .ok()
                .and_then(|text| crate::manifest::Record::from_yaml(&text, name).ok()),
            _ => None,
        },
    )
}

/// A small object, read whole.
enum Small {
    Absent,
    /// Larger than asked for.
    Large,
    Bytes(Vec<u8>),
}

fn get_limited(
    rt: &tokio::runtime::Runtime,
    s3: &dyn Remote,
    cfg: &StoreConfig,
    key: &str,
    max: u64,
) -> Result<Small, Error> {
    let fail = |e: object_store::Error| Error::Store {
        store: cfg.describe(),
        problem: bounded(&format!("cannot read `{key}`: {e}"), 2048),
    };
    rt.block_on(async {
        let got = match s3.get(&ObjectPath::from(key)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(Small::Absent),
            Err(e) => return Err(fail(e)),
        };
        if got.meta.size > max {
            return Ok(Small::Large);
        }
        let mut stream = got.into_stream();
        let mut out = Vec::with_capacity(got_size(max));
        while let Some(piece) = stream.next().await {
            out.extend_from_slice(&piece.map_err(fail)?);
            if out.len() as u64 > max {
                return Ok(Small::Large);
            }
        }
        Ok(Small::Bytes(out))
    })
}

/// Writes a small object once, and confirms it: an object already at `key` is fine only when
/// `same` takes its bytes. A HEAD-like read first (write-once on a store that ignores
/// `If-None-Match`), `If-None-Match: *` where the store takes it, and the bytes read back
/// after. `Content-MD5` is checked by the store on the way in.
fn put_small_once(
    rt: &tokio::runtime::Runtime,
    s3: &dyn Remote,
    cfg: &StoreConfig,
    key: &str,
    bytes: Vec<u8>,
    same: &dyn Fn(&[u8]) -> bool,
) -> Result<(), Error> {
    let max = (bytes.len() as u64).max(crate::manifest::RECORD_MAX);
    let conflict = || Error::StoreConflict {
        store: cfg.describe(),
        key: key.to_string(),
    };
    let there = |rt| match get_limited(rt, s3, cfg, key, max)? {
        Small::Absent => Ok(None),
        Small::Large => Ok(Some(false)),
        Small::Bytes(b) => Ok(Some(same(&b))),
    };
    if let Some(ok) = there(rt)? {
        return if ok { Ok(()) } else { Err(conflict()) };
    }
    let path = ObjectPath::from(key);
    let conditional = loop {
        let u = caps::using(cfg.checksum);
        let opts = object_store::PutOptions {
            mode: if u.conditional {
                object_store::PutMode::Create
            } else {
                object_store::PutMode::Overwrite
            },
            ..Default::default()
        };
        match rt.block_on(s3.put_opts(&path, bytes.clone().into(), opts)) {
            Ok(_) => break u.conditional,
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {
                return match there(rt)? {
                    Some(true) => Ok(()),
                    _ => Err(conflict()),
                }
            }
            Err(_) if caps::using(cfg.checksum) != u => continue,
            Err(e) => {
                return Err(Error::Store {
                    store: cfg.describe(),
                    problem: bounded(&format!("cannot write `{key}`: {e}"), 2048),
                })
            }
        }
    };
    match get_limited(rt, s3, cfg, key, max)? {
        Small::Bytes(b) if b == bytes => Ok(()),
        Small::Bytes(b) if same(&b) => Ok(()),
        _ => {
            if conditional {
                caps::conditional_ignored();
            }
            Err(conflict())
        }
    }
}

/// Writes the record of the archive at `key`, once: a record already there is fine only when
/// it describes the same bytes.
fn write_record(
    rt: &tokio::runtime::Runtime,
    s3: &dyn Remote,
    cfg: &StoreConfig,
    key: &str,
    record: &crate::manifest::Record,
) -> Result<(), Error> {
    let rkey = record_key(key);
    let name = key.rsplit('/').next().unwrap_or(key);
    let same = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|t| crate::manifest::Record::from_yaml(t, name).ok())
            .is_some_and(|r| r.sha256 == record.sha256 && r.size == record.size)
    };
    put_small_once(rt, s3, cfg, &rkey, record.to_yaml().into_bytes(), &same).map_err(|e| match e {
        Error::Store { store, problem } => Error::Store {
            store,
            problem: bounded(
                &format!(
                    "the archive `{key}` is complete but its record `{rkey}` could not be \
                     written ({problem}); until it is, the archive is listed as incomplete. The \
                     next `snapshot --if-changed` (or `backup`) writes it"
                ),
                2048,
            ),
        },
        other => other,
    })
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
        let Kind::S3(keys) = &c.kind else {
            panic!("not S3")
        };
        assert!(keys.host_style);
        assert_eq!(c.ca_pems, vec![pem.to_string()]);
        assert_eq!(keys.region, "us-east-1");
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
