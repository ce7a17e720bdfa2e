//! The offline tools (etcdutl, or etcdctl on 3.4) and a throwaway etcd on loopback.

use super::*;

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

    /// The etcd server that goes with this tool: ETCD_ACTIONS_ETCD, else the `etcd` beside
    /// it (as a unit's bin dir holds them), else `etcd` on PATH.
    pub fn server_binary(&self) -> Result<PathBuf, Error> {
        if let Some(p) = std::env::var_os("ETCD_ACTIONS_ETCD").filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        if let Some(beside) = self.bin.parent().map(|d| d.join("etcd")) {
            if beside.is_file() {
                return Ok(beside);
            }
        }
        which::which("etcd").map_err(|_| Error::ToolMissing {
            tool: "etcd".into(),
            hint: "set ETCD_ACTIONS_ETCD to the etcd server binary".into(),
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
        // The db's trailer, when it has one, was checked by us on these very bytes as they
        // were unpacked (a db without one has nothing to check).
        cmd.arg("--skip-hash-check");
        if req.bump > 0 {
            cmd.arg(format!("--bump-revision={}", req.bump))
                .arg("--mark-compacted");
        }
        run_checked(&mut cmd).map(drop)
    }
}

/// A free loopback port (the kernel's choice), for a throwaway etcd.
pub(super) fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ctx(|| "cannot find a free loopback port".to_string())
}

/// The command line of a throwaway etcd (a drill, a replay): member `name` serving
/// `data_dir` alone on free loopback ports.
pub struct Throwaway {
    pub client_url: String,
    pub peer_url: String,
    /// `--data-dir=…`: also the marker that finds the process again.
    pub data_arg: String,
    pub args: Vec<String>,
}

impl Throwaway {
    pub fn new(name: &str, data_dir: &Path) -> Result<Throwaway, Error> {
        let client_url = format!("http://127.0.0.1:{}", free_port()?);
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let data_arg = format!("--data-dir={}", data_dir.display());
        let args = vec![
            format!("--name={name}"),
            data_arg.clone(),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={name}={peer_url}"),
            "--log-level=error".to_string(),
        ];
        Ok(Throwaway {
            client_url,
            peer_url,
            data_arg,
            args,
        })
    }
}

/// A fresh `--initial-cluster-token`: a restored cluster never shares one with another.
pub fn random_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut bytes);
    }
    let salt = u64::from(std::process::id()) ^ crate::manifest::now_secs();
    format!("etcd-actions-{}-{salt:x}", hex::encode(bytes))
}

pub struct RestoreRequest<'a> {
    pub db: &'a Path,
    pub data_dir: &'a Path,
    pub name: &'a str,
    pub peer_urls: &'a [String],
    pub token: &'a str,
    pub bump: u64,
}
