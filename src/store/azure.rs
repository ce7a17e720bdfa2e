//! Azure Blob Storage: the `azure-storage-credentials` relation (azure-storage-integrator,
//! interface `azure_storage`) or `ETCD_ACTIONS_AZURE_*` standalone, through object_store's
//! Azure client. Write-once is `If-None-Match: *` on Put Block List where Azure enforces it,
//! and the agent's own claim and confirmation as everywhere.

use std::collections::BTreeMap;

use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::{ClientOptions, RetryConfig};

use super::guard::Connector;
use super::names::{check_bucket, check_endpoint, check_prefix, field, missing, with_scheme};
use crate::error::Error;

/// Environment settings: names and values.
type EnvPairs = Vec<(String, String)>;

/// The storage account and its key (the relation's `secret-key`, or
/// `AZURE_STORAGE_ACCOUNT_KEY`). Never printed.
#[derive(Clone)]
pub struct AzureKeys {
    pub account: String,
    pub key: String,
}

/// Where the archives go, as the relation or the settings say.
pub struct AzurePlace {
    pub endpoint: String,
    pub container: String,
    pub path: String,
    pub keys: AzureKeys,
}

fn invalid(path: &str, problem: String) -> Error {
    Error::ConfigInvalid {
        path: path.into(),
        problem,
    }
}

/// The endpoint an account has when none is given: `https://<account>.blob.core.windows.net`
/// (`http://` for the plain protocols `http`, `wasb`, `abfs`).
fn default_endpoint(account: &str, https: bool) -> String {
    let scheme = if https { "https" } else { "http" };
    format!("{scheme}://{account}.blob.core.windows.net")
}

/// From the provider's application bag (the `secret-extra` secret merged in).
pub fn from_bag(bag: &BTreeMap<String, String>) -> Result<AzurePlace, Error> {
    let get = |k: &str| field(bag, k);
    let missing = missing(bag, &["container", "storage-account", "secret-key"]);
    if !missing.is_empty() {
        return Err(Error::ProviderNotReady {
            provider: "azure-storage-integrator".into(),
            detail: format!("the azure-storage-credentials relation has no {missing} yet"),
        });
    }
    let from = "fix the azure-storage-integrator's config";
    let rel = "azure-storage-credentials relation";
    let https = match get("connection-protocol").as_deref() {
        None => true,
        Some(p) => match p.to_ascii_lowercase().as_str() {
            "abfss" | "wasbs" | "https" => true,
            "abfs" | "wasb" | "http" => false,
            other => {
                return Err(invalid(
                    rel,
                    format!(
                        "`connection-protocol` is `{other}`; expected abfss, wasbs, https, abfs, \
                         wasb or http: {from}"
                    ),
                ))
            }
        },
    };
    let account = get("storage-account").expect("checked");
    if !account.bytes().all(|b| b.is_ascii_alphanumeric()) || account.len() > 63 {
        return Err(invalid(
            rel,
            format!("`storage-account` `{account}` is not an account name: {from}"),
        ));
    }
    let endpoint = get("endpoint")
        .map(|e| with_scheme(&e))
        .unwrap_or_else(|| default_endpoint(&account, https));
    check_endpoint(&endpoint, from).map_err(|p| invalid(rel, p))?;
    let container = get("container").expect("checked");
    check_bucket(&container, from).map_err(|p| invalid(rel, p))?;
    let path = get("path").unwrap_or_default();
    check_prefix(&path, from).map_err(|p| invalid(rel, p))?;
    Ok(AzurePlace {
        endpoint,
        container,
        path,
        keys: AzureKeys {
            account,
            key: get("secret-key").expect("checked"),
        },
    })
}

/// From the standalone settings: `ETCD_ACTIONS_AZURE_ENDPOINT`, `_ACCOUNT`, `_CONTAINER`,
/// `_PATH`, and the key in `AZURE_STORAGE_ACCOUNT_KEY`.
pub fn from_settings(
    endpoint: Option<&str>,
    account: Option<&str>,
    container: &str,
    path: Option<&str>,
    key: Option<&str>,
) -> Result<AzurePlace, Error> {
    let bad = Error::Usage;
    let Some(account) = account.map(str::trim).filter(|a| !a.is_empty()) else {
        return Err(bad(
            "ETCD_ACTIONS_AZURE_CONTAINER is set but ETCD_ACTIONS_AZURE_ACCOUNT is not: set the \
             storage account"
                .into(),
        ));
    };
    let Some(key) = key.filter(|k| !k.trim().is_empty()) else {
        return Err(bad(
            "ETCD_ACTIONS_AZURE_CONTAINER is set but AZURE_STORAGE_ACCOUNT_KEY is not; export \
             the storage account key (it is never taken from a flag: argv is visible in ps)"
                .into(),
        ));
    };
    let endpoint = endpoint
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(with_scheme)
        .unwrap_or_else(|| default_endpoint(account, true));
    check_endpoint(&endpoint, "fix ETCD_ACTIONS_AZURE_ENDPOINT").map_err(bad)?;
    let container = container.trim().trim_matches('/').to_string();
    check_bucket(&container, "fix ETCD_ACTIONS_AZURE_CONTAINER").map_err(bad)?;
    let path = path.unwrap_or("").to_string();
    check_prefix(&path, "fix ETCD_ACTIONS_AZURE_PATH").map_err(bad)?;
    Ok(AzurePlace {
        endpoint,
        container,
        path,
        keys: AzureKeys {
            account: account.to_string(),
            key: key.trim().to_string(),
        },
    })
}

/// object_store's Azure client over our HTTP layer. An endpoint other than Azure's own
/// (`*.blob.core.windows.net`) is taken as it is, path-style (`<endpoint>/<container>`), as
/// Azurite and Azure Stack serve it.
pub fn client(
    keys: &AzureKeys,
    endpoint: &str,
    container: &str,
    options: ClientOptions,
    connector: Connector,
    retry: RetryConfig,
) -> object_store::Result<MicrosoftAzure> {
    let mut b = MicrosoftAzureBuilder::new()
        .with_account(&keys.account)
        .with_access_key(&keys.key)
        .with_container_name(container)
        .with_client_options(options)
        .with_http_connector(connector)
        .with_retry(retry);
    if !endpoint.to_ascii_lowercase().ends_with(&format!(
        "{}.blob.core.windows.net",
        keys.account.to_ascii_lowercase()
    )) {
        b = b.with_endpoint(endpoint.to_string());
    }
    b.build()
}

/// The standalone settings that reach this store (for the `follow` service): public ones, and
/// the key apart.
pub fn env_pairs(
    keys: &AzureKeys,
    endpoint: &str,
    container: &str,
    prefix: &str,
) -> (EnvPairs, EnvPairs) {
    let mut public = vec![
        (
            "ETCD_ACTIONS_AZURE_ENDPOINT".to_string(),
            endpoint.to_string(),
        ),
        (
            "ETCD_ACTIONS_AZURE_ACCOUNT".to_string(),
            keys.account.clone(),
        ),
        (
            "ETCD_ACTIONS_AZURE_CONTAINER".to_string(),
            container.to_string(),
        ),
    ];
    if !prefix.is_empty() {
        public.push(("ETCD_ACTIONS_AZURE_PATH".into(), prefix.to_string()));
    }
    let secret = vec![("AZURE_STORAGE_ACCOUNT_KEY".to_string(), keys.key.clone())];
    (public, secret)
}
