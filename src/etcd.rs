//! etcdctl and etcdutl behind typed methods.
//!
//! Online commands (`endpoint status`, `member list`, `get`, `snapshot save`) go
//! to this unit's client URL with the TLS files from etcd's config. Offline commands
//! (`snapshot status`, `snapshot restore`) use etcdutl where it exists (3.5+) and etcdctl
//! otherwise (3.4); etcd 3.6's etcdctl has neither.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::config::{EtcdConfig, Settings};
use crate::error::Error;
use crate::process::{display, etcd_tool, run_checked, spawn_logged, Running};

/// A `major.minor.patch` etcd version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim().trim_start_matches('v');
        let mut parts = s
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Version(major, minor, patch))
    }

    pub fn minor(self) -> (u32, u32) {
        (self.0, self.1)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// `endpoint status` of one member.
#[derive(Debug, Clone)]
pub struct Status {
    pub version: String,
    pub cluster_id: u64,
    pub member_id: u64,
    pub revision: i64,
    pub db_size: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Member {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
    #[serde(rename = "isLearner", default)]
    pub is_learner: bool,
}

/// Formats an etcd id the way etcdctl's table output does.
pub fn hex_id(id: u64) -> String {
    format!("{id:x}")
}

/// Online client for this unit's member.
#[derive(Debug, Clone)]
pub struct Etcdctl {
    pub bin: PathBuf,
    endpoint: String,
    tls: Vec<String>,
}

impl Etcdctl {
    pub fn new(settings: &Settings, config: &EtcdConfig) -> Result<Etcdctl, Error> {
        let bin = settings.etcdctl()?;
        let mut tls = Vec::new();
        let t = &config.tls;
        if let Some(ca) = &t.trusted_ca_file {
            tls.push(format!("--cacert={}", ca.display()));
        }
        if let Some(cert) = &t.cert_file {
            tls.push(format!("--cert={}", cert.display()));
        }
        if let Some(key) = &t.key_file {
            tls.push(format!("--key={}", key.display()));
        }
        Ok(Etcdctl {
            bin,
            endpoint: config.endpoint().to_string(),
            tls,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A client of another, plain-HTTP endpoint (a throwaway etcd on loopback).
    pub fn at(&self, endpoint: &str) -> Etcdctl {
        Etcdctl {
            bin: self.bin.clone(),
            endpoint: endpoint.to_string(),
            tls: Vec::new(),
        }
    }

    /// Whether something listens on the endpoint's port. `Ok(false)` only when every address
    /// refuses the connection, which means etcd is not running here; a timeout or any other
    /// failure is an error, because etcd may be running but unreachable. Fast: no gRPC
    /// retries against a closed port.
    pub fn listening(&self) -> Result<bool, Error> {
        use std::net::{TcpStream, ToSocketAddrs};
        let rest = self
            .endpoint
            .split_once("://")
            .map_or(self.endpoint.as_str(), |(_, r)| r);
        let hostport = rest.split('/').next().unwrap_or(rest);
        let hostport = if hostport.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
        }) {
            hostport.to_string()
        } else {
            format!("{hostport}:2379")
        };
        let fail = |detail: String| Error::EtcdUnreachable {
            endpoint: self.endpoint.clone(),
            detail,
        };
        let addrs: Vec<_> = hostport
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve `{hostport}`: {e}")))?
            .collect();
        let mut other = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, std::time::Duration::from_secs(3)) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => other = Some(format!("{addr}: {e}")),
            }
        }
        match other {
            None if !addrs.is_empty() => Ok(false),
            None => Err(fail(format!("`{hostport}` resolves to no address"))),
            Some(e) => Err(fail(format!(
                "{e}; neither running nor refusing connections, so the restore cannot tell \
                 whether etcd is stopped"
            ))),
        }
    }

    fn command(&self, dial_timeout: &str) -> Command {
        let mut cmd = etcd_tool(&self.bin);
        cmd.arg(format!("--endpoints={}", self.endpoint))
            .arg(format!("--dial-timeout={dial_timeout}"))
            .args(&self.tls);
        cmd
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, args: &[&str]) -> Result<T, Error> {
        let mut cmd = self.command("5s");
        cmd.arg("--command-timeout=30s")
            .args(args)
            .arg("-w")
            .arg("json");
        let out = run_checked(&mut cmd).map_err(|e| self.unreachable(e))?;
        serde_json::from_str(out.stdout.trim()).map_err(|e| Error::BadOutput {
            command: display(&cmd),
            problem: e.to_string(),
        })
    }

    /// Connection failures become `EtcdUnreachable`; anything else stays as it is.
    fn unreachable(&self, err: Error) -> Error {
        match err {
            Error::CommandFailed { stderr, .. }
                if [
                    "context deadline exceeded",
                    "connection refused",
                    "no such host",
                    "Unavailable",
                    "timed out",
                    "connection reset",
                    "transport: ",
                ]
                .iter()
                .any(|p| stderr.contains(p)) =>
            {
                Error::EtcdUnreachable {
                    endpoint: self.endpoint.clone(),
                    detail: last_line(&stderr),
                }
            }
            other => other,
        }
    }

    pub fn status(&self) -> Result<Status, Error> {
        #[derive(Deserialize)]
        struct Header {
            cluster_id: u64,
            member_id: u64,
            #[serde(default)]
            revision: i64,
        }
        #[derive(Deserialize)]
        struct Inner {
            header: Header,
            version: String,
            #[serde(rename = "dbSize", default)]
            db_size: u64,
        }
        #[derive(Deserialize)]
        struct Entry {
            #[serde(rename = "Status")]
            status: Inner,
        }
        let entries: Vec<Entry> = self.json(&["endpoint", "status"])?;
        let e = entries.into_iter().next().ok_or_else(|| Error::BadOutput {
            command: "etcdctl endpoint status".into(),
            problem: "no endpoint in the output".into(),
        })?;
        Ok(Status {
            version: e.status.version,
            cluster_id: e.status.header.cluster_id,
            member_id: e.status.header.member_id,
            revision: e.status.header.revision,
            db_size: e.status.db_size,
        })
    }

    pub fn members(&self) -> Result<Vec<Member>, Error> {
        #[derive(Deserialize)]
        struct List {
            #[serde(default)]
            members: Vec<Member>,
        }
        Ok(self.json::<List>(&["member", "list"])?.members)
    }

    /// Number of live keys at `revision`.
    pub fn key_count(&self, revision: i64) -> Result<u64, Error> {
        #[derive(Deserialize)]
        struct Count {
            #[serde(default)]
            count: u64,
        }
        let rev = format!("--rev={revision}");
        // `count` is the size of the whole range whatever the limit; etcdctl 3.4 has no
        // --count-only, so ask for one key name and read the count.
        let args = ["get", "", "--prefix", "--keys-only", "--limit=1", &rev];
        Ok(self.json::<Count>(&args)?.count)
    }

    /// Starts `etcdctl snapshot save`: a consistent copy through the snapshot API, written to
    /// `<path>.part` and renamed to `path` when complete. Finish with `finish_save`.
    pub fn snapshot_save_start(&self, path: &Path, log: &Path) -> Result<Running, Error> {
        let mut cmd = self.command("10s");
        cmd.arg("snapshot").arg("save").arg(path);
        spawn_logged(&mut cmd, log)
    }

    /// Waits for a save started by `snapshot_save_start`.
    pub fn finish_save(&self, save: &mut Running) -> Result<(), Error> {
        save.wait().map(drop).map_err(|e| self.unreachable(e))
    }
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim()
        .to_string()
}

/// What `snapshot status` reads from a db file.
#[derive(Debug, Clone, Copy)]
pub struct DbStatus {
    pub revision: i64,
}

/// The offline tool: etcdutl, or etcdctl on 3.4.
#[derive(Debug, Clone)]
pub struct OfflineTool {
    pub bin: PathBuf,
    pub name: &'static str,
    pub version: Version,
    /// `--bump-revision` and `--mark-compacted` are both available.
    pub supports_bump: bool,
}

impl OfflineTool {
    /// Picks etcdutl when present, else etcdctl, and reads its version and restore flags.
    pub fn detect(settings: &Settings) -> Result<OfflineTool, Error> {
        let (bin, name) = match settings.etcdutl()? {
            Some(bin) => (bin, "etcdutl"),
            None => (settings.etcdctl()?, "etcdctl"),
        };
        let out = run_checked(etcd_tool(&bin).arg("version"))?;
        let version = out
            .stdout
            .lines()
            .find_map(|l| {
                l.split_once("version:")
                    .and_then(|(_, v)| Version::parse(v))
            })
            .ok_or_else(|| Error::BadOutput {
                command: format!("{name} version"),
                problem: format!("no version in `{}`", out.stdout.trim()),
            })?;
        if name == "etcdctl" && version >= Version(3, 6, 0) {
            return Err(Error::ToolMissing {
                tool: "etcdutl".into(),
                hint: format!(
                    "etcdctl {version} cannot restore snapshots (removed in 3.6); install etcdutl \
                     or set ETCD_ACTIONS_ETCDUTL"
                ),
            });
        }
        let help = run_checked(etcd_tool(&bin).args(["snapshot", "restore", "--help"]))?;
        let text = format!("{}{}", help.stdout, help.stderr);
        let supports_bump = text.contains("--bump-revision") && text.contains("--mark-compacted");
        Ok(OfflineTool {
            bin,
            name,
            version,
            supports_bump,
        })
    }

    pub fn db_status(&self, db: &Path) -> Result<DbStatus, Error> {
        #[derive(Deserialize)]
        struct Raw {
            revision: i64,
        }
        let mut cmd = etcd_tool(&self.bin);
        cmd.args(["snapshot", "status", "-w", "json"]).arg(db);
        let out = run_checked(&mut cmd)?;
        let raw: Raw = serde_json::from_str(out.stdout.trim()).map_err(|e| Error::BadOutput {
            command: display(&cmd),
            problem: e.to_string(),
        })?;
        Ok(DbStatus {
            revision: raw.revision,
        })
    }

    /// Restores `db` into `data_dir` (which must not exist) as a new one-member cluster.
    pub fn restore(&self, req: &RestoreRequest<'_>) -> Result<(), Error> {
        let mut cmd = etcd_tool(&self.bin);
        let peers = req.peer_urls.join(",");
        let initial: Vec<String> = req
            .peer_urls
            .iter()
            .map(|u| format!("{}={u}", req.name))
            .collect();
        cmd.args(["snapshot", "restore"])
            .arg(req.db)
            .arg(format!("--data-dir={}", req.data_dir.display()))
            .arg(format!("--name={}", req.name))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-token={}", req.token))
            .arg(format!("--initial-advertise-peer-urls={peers}"));
        if req.skip_hash_check {
            cmd.arg("--skip-hash-check");
        }
        if req.bump > 0 {
            cmd.arg(format!("--bump-revision={}", req.bump))
                .arg("--mark-compacted");
        }
        run_checked(&mut cmd).map(drop)
    }
}

pub struct RestoreRequest<'a> {
    pub db: &'a Path,
    pub data_dir: &'a Path,
    pub name: &'a str,
    pub peer_urls: &'a [String],
    pub token: &'a str,
    pub skip_hash_check: bool,
    pub bump: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(Version::parse("3.4.23"), Some(Version(3, 4, 23)));
        assert_eq!(Version::parse(" v3.5.1\n"), Some(Version(3, 5, 1)));
        assert_eq!(Version::parse("3.6"), Some(Version(3, 6, 0)));
        assert_eq!(Version::parse("x"), None);
        assert!(Version(3, 5, 0) > Version(3, 4, 27));
    }
}
