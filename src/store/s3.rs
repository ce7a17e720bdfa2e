//! S3 and the stores that speak its protocol: the `s3` relation (s3-integrator) or
//! `ETCD_ACTIONS_S3_*` with the standard `AWS_*` credentials standalone, through object_store's
//! S3 client. Its quirks: CRC64NVME checksums where the store takes them (`caps`), payloads
//! unsigned (their sha256 is the archive's, checked at restore), single DELETEs signed in the
//! URL (the store module).

use std::collections::BTreeMap;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{ClientOptions, RetryConfig};

use super::caps::{parse_checksum, ChecksumMode};
use super::guard::Connector;
use super::names::{check_bucket, check_endpoint, check_prefix, json_list, with_scheme};
use crate::error::Error;

/// Environment settings: names and values.
type EnvPairs = Vec<(String, String)>;

/// How to reach and sign for the store. The keys are never printed.
#[derive(Clone)]
pub struct S3Keys {
    pub region: String,
    pub host_style: bool,
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
}

/// Where the archives go, as the relation or the settings say.
pub struct S3Place {
    pub endpoint: Option<String>,
    pub bucket: String,
    pub path: String,
    pub ca_pems: Vec<String>,
    pub storage_class: Option<String>,
    pub checksum: ChecksumMode,
    pub keys: S3Keys,
}

/// The standalone settings, as given.
pub struct S3Settings<'a> {
    pub endpoint: Option<&'a str>,
    pub bucket: &'a str,
    pub path: Option<&'a str>,
    pub region: Option<&'a str>,
    pub uri_style: Option<&'a str>,
    pub ca_file: Option<&'a std::path::Path>,
    pub checksum: Option<&'a str>,
    pub access_key: Option<&'a str>,
    pub secret_key: Option<&'a str>,
    pub session_token: Option<&'a str>,
}

/// From the provider's application databag (secret fields already merged in).
pub fn from_bag(bag: &BTreeMap<String, String>) -> Result<S3Place, Error> {
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
        return Err(Error::StoreNotReady(format!(
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
    Ok(S3Place {
        endpoint,
        bucket,
        path,
        ca_pems: get("tls-ca-chain")
            .map(|t| json_list(&t))
            .unwrap_or_default(),
        storage_class: get("storage-class"),
        checksum: ChecksumMode::Auto,
        keys: S3Keys {
            region: get("region").unwrap_or_else(|| "us-east-1".into()),
            host_style,
            access_key: get("access-key").expect("checked"),
            secret_key: get("secret-key").expect("checked"),
            session_token: None,
        },
    })
}

/// From the standalone settings.
pub fn from_settings(s: &S3Settings<'_>) -> Result<S3Place, Error> {
    let bad = |problem: String| Error::Usage(problem);
    let (Some(access_key), Some(secret_key)) = (s.access_key, s.secret_key) else {
        return Err(bad(
            "ETCD_ACTIONS_S3_BUCKET is set but AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             are not; export both (they are never taken from a flag: argv is visible in ps)"
                .into(),
        ));
    };
    let host_style = match s.uri_style.map(str::trim) {
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
    let endpoint = s.endpoint.map(with_scheme);
    if let Some(e) = &endpoint {
        check_endpoint(e, "fix --s3-endpoint (ETCD_ACTIONS_S3_ENDPOINT)").map_err(bad)?;
    }
    let bucket = s.bucket.trim().trim_matches('/').to_string();
    check_bucket(&bucket, "fix --s3-bucket (ETCD_ACTIONS_S3_BUCKET)").map_err(bad)?;
    let path = s.path.unwrap_or("");
    check_prefix(path, "fix --s3-path (ETCD_ACTIONS_S3_PATH)").map_err(bad)?;
    let checksum = parse_checksum(s.checksum.unwrap_or(""))?;
    Ok(S3Place {
        endpoint,
        bucket,
        path: path.to_string(),
        ca_pems,
        storage_class: None,
        checksum,
        keys: S3Keys {
            region: s.region.unwrap_or("us-east-1").to_string(),
            host_style,
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            session_token: s.session_token.map(str::to_string),
        },
    })
}

/// object_store's S3 client over our HTTP layer; with `checksums`, each part of an upload
/// carries its CRC64NVME.
pub fn client(
    keys: &S3Keys,
    (endpoint, bucket): (Option<&str>, &str),
    options: ClientOptions,
    connector: Connector,
    (retry, checksums): (RetryConfig, bool),
) -> object_store::Result<AmazonS3> {
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(&keys.region)
        .with_access_key_id(&keys.access_key)
        .with_secret_access_key(&keys.secret_key)
        .with_virtual_hosted_style_request(keys.host_style)
        .with_client_options(options)
        .with_http_connector(connector)
        .with_retry(retry)
        // The body is not hashed a second time for the signature: its sha256 is computed in
        // the archive pass, recorded in the record object, and checked at restore.
        .with_unsigned_payload(true);
    if checksums {
        b = b.with_checksum_algorithm(object_store::aws::Checksum::CRC64NVME);
    }
    if let Some(t) = &keys.session_token {
        b = b.with_token(t);
    }
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    b.build()
}

/// The standalone settings that reach this store (for the `follow` service): public ones, and
/// the keys apart. `ca_file` is where the caller wrote the CA chain, when there is one.
pub fn env_pairs(
    keys: &S3Keys,
    (endpoint, bucket, prefix): (Option<&str>, &str, &str),
    checksum: ChecksumMode,
    ca_file: Option<&std::path::Path>,
) -> (EnvPairs, EnvPairs) {
    let mut public = vec![("ETCD_ACTIONS_S3_BUCKET".to_string(), bucket.to_string())];
    if let Some(e) = endpoint {
        public.push(("ETCD_ACTIONS_S3_ENDPOINT".into(), e.to_string()));
    }
    if !prefix.is_empty() {
        public.push(("ETCD_ACTIONS_S3_PATH".into(), prefix.to_string()));
    }
    public.push(("ETCD_ACTIONS_S3_REGION".into(), keys.region.clone()));
    public.push((
        "ETCD_ACTIONS_S3_URI_STYLE".into(),
        if keys.host_style { "host" } else { "path" }.into(),
    ));
    if checksum != ChecksumMode::Auto {
        public.push(("ETCD_ACTIONS_S3_CHECKSUM".into(), checksum.as_str().into()));
    }
    if let Some(f) = ca_file {
        public.push(("ETCD_ACTIONS_S3_CA_FILE".into(), f.display().to_string()));
    }
    let mut secret = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), keys.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), keys.secret_key.clone()),
    ];
    if let Some(t) = &keys.session_token {
        secret.push(("AWS_SESSION_TOKEN".into(), t.clone()));
    }
    (public, secret)
}
