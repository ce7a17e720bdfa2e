//! Google Cloud Storage: the `gcs-credentials` relation (gcs-integrator, interface `gcs`) or
//! `ETCD_ACTIONS_GCS_*` standalone, through object_store's GCS client (GCS's XML API). The
//! service-account key is used as given, from memory only: never written to disk, never in
//! argv or a child's environment. Write-once is `x-goog-if-generation-match: 0` where GCS
//! enforces it, and the agent's own claim and confirmation as everywhere.

use std::collections::BTreeMap;

use object_store::gcp::{GoogleCloudStorage, GoogleCloudStorageBuilder};
use object_store::{ClientOptions, RetryConfig};

use super::guard::Connector;
use super::names::{check_bucket, check_endpoint, check_prefix, field, missing};
use crate::error::{bounded, Error};

/// A service-account JSON key, as given. Never printed.
#[derive(Clone)]
pub struct GcsKey {
    pub json: String,
    /// The key's `gcs_base_url`, when it names one (an emulator, a private endpoint).
    pub base_url: Option<String>,
}

pub struct GcsPlace {
    pub bucket: String,
    pub path: String,
    pub storage_class: Option<String>,
    pub key: GcsKey,
}

/// Reads a service-account key: a JSON object of `type` `service_account` with a
/// `client_email`. `from` says where it came from.
pub fn parse_key(json: &str, from: &str) -> Result<GcsKey, String> {
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .map_err(|e| format!("the GCS key is not JSON ({e}): {from}"))?;
    let kind = v.get("type").and_then(|t| t.as_str()).unwrap_or("");
    if kind != "service_account" || v.get("client_email").and_then(|e| e.as_str()).is_none() {
        return Err(format!(
            "the GCS key is not a service-account key (`type: service_account` with a \
             `client_email`): {from}"
        ));
    }
    let base_url = v
        .get("gcs_base_url")
        .and_then(|u| u.as_str())
        .map(|u| u.trim_end_matches('/').to_string());
    if let Some(u) = &base_url {
        check_endpoint(u, from)?;
    }
    Ok(GcsKey {
        json: json.trim().to_string(),
        base_url,
    })
}

/// From the provider's application bag (the `secret-extra` secret merged in).
pub fn from_bag(bag: &BTreeMap<String, String>) -> Result<GcsPlace, Error> {
    let get = |k: &str| field(bag, k);
    let missing = missing(bag, &["bucket", "secret-key"]);
    if !missing.is_empty() {
        return Err(Error::ProviderNotReady {
            provider: "gcs-integrator".into(),
            detail: format!("the gcs-credentials relation has no {missing} yet"),
        });
    }
    let from = "fix the gcs-integrator's config (its service-account key)";
    let invalid = |problem: String| Error::ConfigInvalid {
        path: "gcs-credentials relation".into(),
        problem,
    };
    let bucket = get("bucket").expect("checked");
    check_bucket(&bucket, from).map_err(invalid)?;
    let path = get("path").unwrap_or_default();
    check_prefix(&path, from).map_err(invalid)?;
    let key = parse_key(&get("secret-key").expect("checked"), from).map_err(invalid)?;
    Ok(GcsPlace {
        bucket,
        path,
        storage_class: get("storage-class"),
        key,
    })
}

/// From the standalone settings: `ETCD_ACTIONS_GCS_BUCKET`, `_PATH`, and the key read from
/// the file `GOOGLE_APPLICATION_CREDENTIALS` named (read at start, the variable then removed).
pub fn from_settings(
    bucket: &str,
    path: Option<&str>,
    key: Option<&str>,
) -> Result<GcsPlace, Error> {
    let Some(key) = key else {
        return Err(Error::Usage(
            "ETCD_ACTIONS_GCS_BUCKET is set but GOOGLE_APPLICATION_CREDENTIALS is not: export \
             the path of the service-account key file"
                .into(),
        ));
    };
    let from = "fix the file GOOGLE_APPLICATION_CREDENTIALS names";
    let key = parse_key(key, from).map_err(Error::Usage)?;
    let bucket = bucket.trim().trim_matches('/').to_string();
    check_bucket(&bucket, "fix ETCD_ACTIONS_GCS_BUCKET").map_err(Error::Usage)?;
    let path = path.unwrap_or("").to_string();
    check_prefix(&path, "fix ETCD_ACTIONS_GCS_PATH").map_err(Error::Usage)?;
    Ok(GcsPlace {
        bucket,
        path,
        storage_class: None,
        key,
    })
}

/// Reads the key file `GOOGLE_APPLICATION_CREDENTIALS` names, and takes the variable out of
/// the environment (no child inherits it). `None` when it is unset.
pub fn take_key_from_env() -> Result<Option<String>, String> {
    let Some(path) = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") else {
        return Ok(None);
    };
    std::env::remove_var("GOOGLE_APPLICATION_CREDENTIALS");
    if path.is_empty() {
        return Ok(None);
    }
    let p = std::path::Path::new(&path);
    let meta = std::fs::metadata(p).map_err(|e| {
        format!(
            "GOOGLE_APPLICATION_CREDENTIALS names `{}`, which cannot be read: {e}",
            p.display()
        )
    })?;
    if !meta.is_file() || meta.len() > 64 << 10 {
        return Err(format!(
            "GOOGLE_APPLICATION_CREDENTIALS names `{}`, which is not a key file (a regular file \
             of at most 64 KiB)",
            bounded(&p.display().to_string(), 200)
        ));
    }
    std::fs::read_to_string(p)
        .map(Some)
        .map_err(|e| format!("cannot read `{}`: {e}", p.display()))
}

/// object_store's GCS client over our HTTP layer, with the key from memory.
pub fn client(
    key: &GcsKey,
    bucket: &str,
    options: ClientOptions,
    connector: Connector,
    retry: RetryConfig,
) -> object_store::Result<GoogleCloudStorage> {
    GoogleCloudStorageBuilder::new()
        .with_service_account_key(&key.json)
        .with_bucket_name(bucket)
        .with_client_options(options)
        .with_http_connector(connector)
        .with_retry(retry)
        .build()
}
