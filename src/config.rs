//! Validated settings: the CLI/env settings plus what is read from etcd's own config file.
//!
//! Everything here is resolved before any side effect: binaries are looked up with `which`
//! and paths are made absolute, so a missing tool fails the action before it touches data.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::{
    from_env, ArchiveArgs, Given, KeyArgs, ServiceArgs, SettingArgs, StoreArgs, ToolArgs,
};
use crate::error::{Error, IoContext};

/// The settings every action uses.
#[derive(Debug, Clone)]
pub struct Settings {
    pub etcd_config: PathBuf,
    pub etcdctl: Option<PathBuf>,
    pub etcdutl: Option<PathBuf>,
    pub stop_command: String,
    pub start_command: String,
    pub start_timeout: Duration,
    pub service_timeout: Duration,
    pub lock_timeout: Duration,
    pub snapshot_timeout: Duration,
    pub bump_revision: u64,
    pub compression_level: u32,
    pub s3: crate::store::StoreSettings,
    /// etcdctl-style connection settings, over the config's.
    pub client: ClientSettings,
    /// age recipients and identity file (see `crypt`).
    pub keys: crate::crypt::KeySettings,
    /// Where the Prometheus textfile goes (see `health`).
    pub metrics_dir: Option<PathBuf>,
}

/// `--endpoints`, `--cacert`, `--cert`, `--key` (or `ETCDCTL_*`), as etcdctl takes them.
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    pub endpoints: Option<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Settings {
    /// The settings in force: the global ones, and each group as the command gave it or, for
    /// a group it does not take, as the environment and the defaults give it.
    pub fn from_args(
        args: SettingArgs,
        given: Given<'_>,
        credentials: crate::store::Credentials,
    ) -> Result<Settings, clap::Error> {
        let service = given
            .service
            .cloned()
            .map_or_else(from_env::<ServiceArgs>, Ok)?;
        let tools = given.tools.cloned().map_or_else(from_env::<ToolArgs>, Ok)?;
        let store = given
            .store
            .cloned()
            .map_or_else(from_env::<StoreArgs>, Ok)?;
        let archive = given
            .archive
            .cloned()
            .map_or_else(from_env::<ArchiveArgs>, Ok)?;
        let keys = given.keys.cloned().map_or_else(from_env::<KeyArgs>, Ok)?;
        Ok(Settings {
            etcd_config: args.etcd_config,
            etcdctl: tools.etcdctl.filter(|p| !p.as_os_str().is_empty()),
            etcdutl: tools.etcdutl.filter(|p| !p.as_os_str().is_empty()),
            stop_command: service.stop_command,
            start_command: service.start_command,
            start_timeout: Duration::from_secs(service.start_timeout),
            service_timeout: Duration::from_secs(service.service_timeout),
            lock_timeout: Duration::from_secs(args.lock_timeout),
            snapshot_timeout: Duration::from_secs(archive.snapshot_timeout),
            bump_revision: tools.bump_revision,
            compression_level: archive.compression_level,
            s3: crate::store::StoreSettings {
                endpoint: store.s3_endpoint.filter(|v| !v.is_empty()),
                bucket: store.s3_bucket.filter(|v| !v.is_empty()),
                path: store.s3_path.filter(|v| !v.is_empty()),
                region: store.s3_region.filter(|v| !v.is_empty()),
                uri_style: store.s3_uri_style.filter(|v| !v.is_empty()),
                ca_file: store.s3_ca_file.filter(|p| !p.as_os_str().is_empty()),
                checksum: Some(store.s3_checksum),
                azure_endpoint: store.azure_endpoint.filter(|v| !v.is_empty()),
                azure_account: store.azure_account.filter(|v| !v.is_empty()),
                azure_container: store.azure_container.filter(|v| !v.is_empty()),
                azure_path: store.azure_path.filter(|v| !v.is_empty()),
                gcs_bucket: store.gcs_bucket.filter(|v| !v.is_empty()),
                gcs_path: store.gcs_path.filter(|v| !v.is_empty()),
                credentials,
            },
            metrics_dir: args.metrics_dir.filter(|p| !p.as_os_str().is_empty()),
            keys: crate::crypt::KeySettings {
                recipients: keys
                    .encrypt_to
                    .into_iter()
                    .filter(|v| !v.trim().is_empty())
                    .collect(),
                identity_file: keys.identity_file.filter(|p| !p.as_os_str().is_empty()),
            },
            client: ClientSettings {
                endpoints: args.endpoints.filter(|v| !v.trim().is_empty()),
                cacert: args.cacert.filter(|p| !p.as_os_str().is_empty()),
                cert: args.cert.filter(|p| !p.as_os_str().is_empty()),
                key: args.key.filter(|p| !p.as_os_str().is_empty()),
            },
        })
    }

    /// Every setting in force, as the environment variables that give it (credentials
    /// aside): what a scheduled run needs to do what this run would. Paths are absolute.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        let abs = |p: &Path| {
            if p.is_absolute() || p.components().count() == 1 {
                p.display().to_string()
            } else {
                std::env::current_dir()
                    .map(|d| d.join(p))
                    .unwrap_or_else(|_| p.to_path_buf())
                    .display()
                    .to_string()
            }
        };
        let mut v: Vec<(&str, Option<String>)> = vec![
            ("ETCD_ACTIONS_ETCD_CONFIG", Some(abs(&self.etcd_config))),
            ("ETCD_ACTIONS_ETCDCTL", self.etcdctl.as_deref().map(abs)),
            ("ETCD_ACTIONS_ETCDUTL", self.etcdutl.as_deref().map(abs)),
            ("ETCD_ACTIONS_STOP_COMMAND", Some(self.stop_command.clone())),
            (
                "ETCD_ACTIONS_START_COMMAND",
                Some(self.start_command.clone()),
            ),
        ];
        let secs = |d: Duration| Some(d.as_secs().to_string());
        v.extend([
            ("ETCD_ACTIONS_START_TIMEOUT", secs(self.start_timeout)),
            ("ETCD_ACTIONS_SERVICE_TIMEOUT", secs(self.service_timeout)),
            ("ETCD_ACTIONS_LOCK_TIMEOUT", secs(self.lock_timeout)),
            ("ETCD_ACTIONS_SNAPSHOT_TIMEOUT", secs(self.snapshot_timeout)),
            (
                "ETCD_ACTIONS_BUMP_REVISION",
                Some(self.bump_revision.to_string()),
            ),
            (
                "ETCD_ACTIONS_COMPRESSION_LEVEL",
                Some(self.compression_level.to_string()),
            ),
            ("ETCD_ACTIONS_S3_ENDPOINT", self.s3.endpoint.clone()),
            ("ETCD_ACTIONS_S3_BUCKET", self.s3.bucket.clone()),
            ("ETCD_ACTIONS_S3_PATH", self.s3.path.clone()),
            ("ETCD_ACTIONS_S3_REGION", self.s3.region.clone()),
            ("ETCD_ACTIONS_S3_URI_STYLE", self.s3.uri_style.clone()),
            (
                "ETCD_ACTIONS_S3_CA_FILE",
                self.s3.ca_file.as_deref().map(abs),
            ),
            ("ETCDCTL_ENDPOINTS", self.client.endpoints.clone()),
            ("ETCDCTL_CACERT", self.client.cacert.as_deref().map(abs)),
            ("ETCDCTL_CERT", self.client.cert.as_deref().map(abs)),
            ("ETCDCTL_KEY", self.client.key.as_deref().map(abs)),
            (
                "ETCD_ACTIONS_ENCRYPT_TO",
                Some(
                    self.keys
                        .recipients
                        .iter()
                        .flat_map(|r| crate::crypt::split_recipients(r).collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                        .join(","),
                )
                .filter(|r| !r.is_empty()),
            ),
            (
                "ETCD_ACTIONS_IDENTITY_FILE",
                self.keys.identity_file.as_deref().map(abs),
            ),
            (
                "ETCD_ACTIONS_METRICS_DIR",
                self.metrics_dir.as_deref().map(abs),
            ),
        ]);
        v.into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect()
    }

    /// The etcdctl binary: the setting, or `etcdctl` on PATH.
    pub fn etcdctl(&self) -> Result<PathBuf, Error> {
        resolve_tool("etcdctl", self.etcdctl.as_deref(), "ETCD_ACTIONS_ETCDCTL")
    }

    /// The etcdutl binary if there is one (etcd >= 3.5).
    pub fn etcdutl(&self) -> Result<Option<PathBuf>, Error> {
        match &self.etcdutl {
            Some(p) => resolve_tool("etcdutl", Some(p), "ETCD_ACTIONS_ETCDUTL").map(Some),
            None => Ok(which::which("etcdutl").ok()),
        }
    }
}

fn resolve_tool(name: &str, configured: Option<&Path>, var: &str) -> Result<PathBuf, Error> {
    match configured {
        Some(path) => {
            let found = if path.components().count() > 1 {
                path.is_file().then(|| path.to_path_buf())
            } else {
                which::which(path).ok()
            };
            found.ok_or_else(|| Error::ToolMissing {
                tool: path.display().to_string(),
                hint: format!("{var} names a {name} binary that does not exist; fix the setting"),
            })
        }
        None => which::which(name).map_err(|_| Error::ToolMissing {
            tool: name.to_string(),
            hint: format!(
                "it is not on PATH; install etcd's client tools or set {var} to the binary"
            ),
        }),
    }
}

/// Client TLS from etcd's `client-transport-security` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClientTls {
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub trusted_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_cert_auth: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawConfig {
    name: Option<String>,
    data_dir: Option<PathBuf>,
    wal_dir: Option<PathBuf>,
    listen_client_urls: Option<String>,
    advertise_client_urls: Option<String>,
    listen_peer_urls: Option<String>,
    initial_advertise_peer_urls: Option<String>,
    initial_cluster: Option<String>,
    client_transport_security: Option<ClientTls>,
}

/// What the agent needs from etcd's config file.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub path: PathBuf,
    /// Whether etcd's data is on this machine. `false` when only etcdctl-style connection
    /// settings were given: a snapshot works, a restore does not; `data_dir` is then only
    /// where this tool keeps its lock.
    pub local: bool,
    pub name: String,
    pub data_dir: PathBuf,
    pub wal_dir: Option<PathBuf>,
    /// Client URLs, advertised ones first.
    pub client_urls: Vec<String>,
    /// Peer URLs this member advertises.
    pub peer_urls: Vec<String>,
    /// Member names in `initial-cluster` (each once).
    pub initial_members: Vec<String>,
    pub tls: ClientTls,
}

fn split_urls(s: Option<&str>) -> Vec<String> {
    s.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// Turns a listen URL on a wildcard address into one a client can dial.
fn dialable(url: &str) -> String {
    url.replace("://0.0.0.0", "://127.0.0.1")
        .replace("://[::]", "://[::1]")
}

impl EtcdConfig {
    pub fn load(path: &Path) -> Result<EtcdConfig, Error> {
        let text = fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// The config the settings point at, with etcdctl-style connection settings over it.
    /// With no config file but `--endpoints` (or `ETCDCTL_ENDPOINTS`), a config of the
    /// connection alone.
    pub fn resolve(settings: &Settings) -> Result<EtcdConfig, Error> {
        let over = &settings.client;
        let mut config = match (&over.endpoints, settings.etcd_config.exists()) {
            (Some(_), false) => EtcdConfig::remote(),
            _ => EtcdConfig::load(&settings.etcd_config)?,
        };
        let tls_given = over.cacert.is_some() || over.cert.is_some() || over.key.is_some();
        if let Some(eps) = &over.endpoints {
            let urls = split_urls(Some(eps));
            let [url] = urls.as_slice() else {
                return Err(Error::Usage(format!(
                    "--endpoints (ETCDCTL_ENDPOINTS) `{eps}`: give exactly one endpoint; a \
                     snapshot is taken from one member"
                )));
            };
            let scheme = if tls_given { "https" } else { "http" };
            config.client_urls = vec![if url.contains("://") {
                url.clone()
            } else {
                format!("{scheme}://{url}")
            }];
        }
        if tls_given {
            let t = &mut config.tls;
            t.trusted_ca_file = over.cacert.clone().or(t.trusted_ca_file.take());
            t.cert_file = over.cert.clone().or(t.cert_file.take());
            t.key_file = over.key.clone().or(t.key_file.take());
        }
        Ok(config)
    }

    /// A config of a connection alone: no data dir on this machine.
    fn remote() -> EtcdConfig {
        // Only the lock lives there: root's under /run, a user's in their runtime dir.
        let uid = nix::unistd::getuid();
        let state = if uid.is_root() {
            PathBuf::from("/run/etcd-actions")
        } else {
            std::env::var_os("XDG_RUNTIME_DIR")
                .map(|d| PathBuf::from(d).join("etcd-actions"))
                .unwrap_or_else(|| std::env::temp_dir().join(format!("etcd-actions-{uid}")))
        };
        EtcdConfig {
            path: PathBuf::new(),
            local: false,
            name: "default".into(),
            data_dir: state,
            wal_dir: None,
            client_urls: Vec::new(),
            peer_urls: Vec::new(),
            initial_members: Vec::new(),
            tls: ClientTls::default(),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<EtcdConfig, Error> {
        let invalid = |problem: String| Error::ConfigInvalid {
            path: path.to_path_buf(),
            problem,
        };
        let value: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| invalid(format!("it is not valid YAML: {e}")))?;
        let raw: RawConfig = if value.get("kind").and_then(|k| k.as_str()) == Some("Pod") {
            raw_from_pod(&value).map_err(invalid)?
        } else {
            serde_yaml::from_value(value)
                .map_err(|e| invalid(format!("it is not an etcd config: {e}")))?
        };
        let data_dir = raw
            .data_dir
            .ok_or_else(|| invalid("it has no `data-dir`".into()))?;
        if !data_dir.is_absolute() {
            return Err(invalid(format!(
                "`data-dir` `{}` is not absolute",
                data_dir.display()
            )));
        }
        let mut client_urls = split_urls(raw.advertise_client_urls.as_deref());
        for url in split_urls(raw.listen_client_urls.as_deref()) {
            let url = dialable(&url);
            if !client_urls.contains(&url) {
                client_urls.push(url);
            }
        }
        client_urls.retain(|u| u.starts_with("http://") || u.starts_with("https://"));
        if client_urls.is_empty() {
            client_urls.push("http://127.0.0.1:2379".to_string());
        }
        let mut peer_urls = split_urls(raw.initial_advertise_peer_urls.as_deref());
        if peer_urls.is_empty() {
            peer_urls = split_urls(raw.listen_peer_urls.as_deref());
        }
        if peer_urls.is_empty() {
            peer_urls.push("http://localhost:2380".to_string());
        }
        Ok(EtcdConfig {
            path: path.to_path_buf(),
            local: true,
            name: raw
                .name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            data_dir,
            wal_dir: raw.wal_dir.filter(|p| !p.as_os_str().is_empty()),
            client_urls,
            peer_urls,
            initial_members: {
                let mut names: Vec<String> = split_urls(raw.initial_cluster.as_deref())
                    .iter()
                    .filter_map(|e| e.split_once('=').map(|(n, _)| n.trim().to_string()))
                    .collect();
                names.sort();
                names.dedup();
                names
            },
            tls: raw.client_transport_security.unwrap_or_default(),
        })
    }

    /// The endpoint etcdctl dials: the first advertised client URL.
    pub fn endpoint(&self) -> &str {
        &self.client_urls[0]
    }

    /// The directory etcd keeps its member data in: the unit of the atomic swap.
    pub fn member_dir(&self) -> PathBuf {
        self.data_dir.join("member")
    }
}

/// The etcd flags of a kubeadm static-pod manifest (a Pod whose etcd container's command
/// carries `--data-dir=...` and the rest), as a config.
fn raw_from_pod(pod: &serde_yaml::Value) -> Result<RawConfig, String> {
    let containers = pod["spec"]["containers"]
        .as_sequence()
        .ok_or("it is a Pod without `spec.containers`")?;
    let words = |c: &serde_yaml::Value| -> Vec<String> {
        ["command", "args"]
            .iter()
            .filter_map(|k| c[*k].as_sequence())
            .flatten()
            .filter_map(|w| w.as_str().map(str::to_string))
            .collect()
    };
    let words = containers
        .iter()
        .map(words)
        .find(|w| w.iter().any(|a| a.starts_with("--data-dir")))
        .ok_or(
            "it is a Pod, but no container runs etcd with `--data-dir` (is it the etcd manifest?)",
        )?;
    let mut flags = std::collections::HashMap::new();
    let mut it = words.iter().peekable();
    while let Some(w) = it.next() {
        let Some(flag) = w.strip_prefix("--") else {
            continue;
        };
        match flag.split_once('=') {
            Some((k, v)) => {
                flags.insert(k.to_string(), v.to_string());
            }
            None => {
                let v = match it.peek() {
                    Some(n) if !n.starts_with("--") => it.next().cloned().unwrap_or_default(),
                    _ => "true".to_string(),
                };
                flags.insert(flag.to_string(), v);
            }
        }
    }
    let get = |k: &str| flags.get(k).cloned().filter(|v| !v.is_empty());
    Ok(RawConfig {
        name: get("name"),
        data_dir: get("data-dir").map(PathBuf::from),
        wal_dir: get("wal-dir").map(PathBuf::from),
        listen_client_urls: get("listen-client-urls"),
        advertise_client_urls: get("advertise-client-urls"),
        listen_peer_urls: get("listen-peer-urls"),
        initial_advertise_peer_urls: get("initial-advertise-peer-urls"),
        initial_cluster: get("initial-cluster"),
        client_transport_security: Some(ClientTls {
            cert_file: get("cert-file").map(PathBuf::from),
            key_file: get("key-file").map(PathBuf::from),
            trusted_ca_file: get("trusted-ca-file").map(PathBuf::from),
            client_cert_auth: get("client-cert-auth").as_deref() == Some("true"),
        }),
    })
}

/// Reads a file that must exist, naming it in the error.
pub fn metadata(path: &Path) -> Result<fs::Metadata, Error> {
    fs::metadata(path).ctx(|| format!("cannot read `{}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_charm_layout() {
        let text = "name: etcd0\ndata-dir: /var/snap/etcd/current/etcd0.etcd\n\
            listen-client-urls: https://0.0.0.0:2379\n\
            advertise-client-urls: https://10.0.0.5:2379\n\
            initial-advertise-peer-urls: https://10.0.0.5:2380\n\
            client-transport-security:\n  cert-file: /c.crt\n  key-file: /c.key\n  trusted-ca-file: /ca.crt\n  client-cert-auth: true\n";
        let c = EtcdConfig::parse(Path::new("/x"), text).unwrap();
        assert_eq!(c.name, "etcd0");
        assert_eq!(c.endpoint(), "https://10.0.0.5:2379");
        assert_eq!(c.client_urls[1], "https://127.0.0.1:2379");
        assert_eq!(c.peer_urls, vec!["https://10.0.0.5:2380"]);
        assert_eq!(c.tls.key_file.as_deref(), Some(Path::new("/c.key")));
    }

    #[test]
    fn data_dir_is_required() {
        let err = EtcdConfig::parse(Path::new("/x"), "name: a\n").unwrap_err();
        assert!(err.to_string().contains("no `data-dir`"), "{err}");
    }
}
