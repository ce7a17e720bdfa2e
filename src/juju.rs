//! The two ways an action talks to the world: Juju hook tools, or a terminal.
//!
//! Juju mode follows `shared/juju-contract.md`: params from `action-get --format=json`,
//! results through one `action-set` call, progress through `action-log` (optional: older Juju
//! has none), and failure as `action-fail "<message>"` followed by exit 0, because a non-zero
//! exit would replace our message with `exit status N`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::error::{bounded, Error, MESSAGE_MAX};
use crate::process::run_checked;

/// Results as ordered dotted keys (`snapshot.path`), exactly what `action-set` takes.
#[derive(Debug, Default, Clone)]
pub struct Results {
    entries: BTreeMap<String, String>,
}

impl Results {
    pub fn set(&mut self, key: &str, value: impl ToString) {
        debug_assert!(valid_key(key), "invalid action-set key {key}");
        self.entries
            .insert(key.to_string(), bounded(&value.to_string(), MESSAGE_MAX));
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Nested YAML mapping, as `juju show-action-output` prints results.
    pub fn to_yaml(&self) -> serde_yaml::Value {
        let mut root = serde_yaml::Mapping::new();
        for (key, value) in &self.entries {
            let mut node = &mut root;
            let mut parts = key.split('.').peekable();
            while let Some(part) = parts.next() {
                let k = serde_yaml::Value::String(part.to_string());
                if parts.peek().is_none() {
                    node.insert(k, serde_yaml::Value::String(value.clone()));
                    break;
                }
                let entry = node
                    .entry(k)
                    .or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
                if !entry.is_mapping() {
                    *entry = serde_yaml::Value::Mapping(Default::default());
                }
                node = entry.as_mapping_mut().expect("just made a mapping");
            }
        }
        serde_yaml::Value::Mapping(root)
    }

    fn action_set_args(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }
}

/// The key rule of `action-set`: dot-separated segments of lowercase letters, digits and
/// inner hyphens, none of them reserved.
pub fn valid_key(key: &str) -> bool {
    key.split('.').all(|seg| {
        let b = seg.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
            && !matches!(
                seg,
                "stdout" | "stdout-encoding" | "stderr" | "stderr-encoding"
            )
    })
}

/// How an action reports: to Juju, or to a terminal.
#[derive(Debug)]
pub enum Reporter {
    Juju { unit: String, app: String },
    Standalone { host: String },
}

impl Reporter {
    /// Juju mode is on when `JUJU_ACTION_NAME` is set.
    pub fn from_env() -> Reporter {
        if std::env::var_os("JUJU_ACTION_NAME").is_some() {
            let unit = std::env::var("JUJU_UNIT_NAME").unwrap_or_default();
            let app = unit.split('/').next().unwrap_or_default().to_string();
            Reporter::Juju {
                unit,
                app: if app.is_empty() { "etcd".into() } else { app },
            }
        } else {
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "localhost".to_string());
            Reporter::Standalone { host }
        }
    }

    pub fn is_juju(&self) -> bool {
        matches!(self, Reporter::Juju { .. })
    }

    /// The unit name, or the host name standalone.
    pub fn unit(&self) -> &str {
        match self {
            Reporter::Juju { unit, .. } => unit,
            Reporter::Standalone { host } => host,
        }
    }

    /// The Juju application name, for hints.
    pub fn app(&self) -> &str {
        match self {
            Reporter::Juju { app, .. } => app,
            Reporter::Standalone { .. } => "etcd",
        }
    }

    /// The command that copies a file off this machine, quoted for a POSIX shell.
    pub fn copy_command(&self, path: &std::path::Path) -> String {
        match self {
            Reporter::Juju { unit, .. } => {
                format!(
                    "juju scp {} .",
                    shell_quote(&format!("{unit}:{}", path.display()))
                )
            }
            Reporter::Standalone { host } => {
                format!(
                    "scp {} .",
                    shell_quote(&format!("{host}:{}", path.display()))
                )
            }
        }
    }

    /// Progress for the operator. Never fails the action.
    pub fn log(&self, msg: &str) {
        let msg = &bounded(msg, MESSAGE_MAX);
        match self {
            Reporter::Juju { .. } => {
                let sent = which::which("action-log")
                    .ok()
                    .map(|tool| run_checked(Command::new(tool).arg(msg)).is_ok());
                if sent != Some(true) {
                    eprintln!("etcd-actions: {msg}");
                }
            }
            Reporter::Standalone { .. } => {
                eprintln!(
                    "etcd-actions: [{:6.2}s] {msg}",
                    started().elapsed().as_secs_f64()
                );
            }
        }
    }

    /// Workload status (Juju only). Never fails the action.
    pub fn status(&self, state: &str, msg: &str) {
        if let Reporter::Juju { .. } = self {
            if let Ok(tool) = which::which("status-set") {
                if let Err(e) = run_checked(Command::new(tool).arg(state).arg(msg)) {
                    eprintln!("etcd-actions: status-set failed: {e}");
                }
            }
        }
    }

    /// The action's params (Juju mode), as a JSON object.
    pub fn params(&self) -> Result<serde_json::Map<String, Value>, Error> {
        let out = run_checked(Command::new(hook_tool("action-get")?).arg("--format=json"))?;
        let text = out.stdout.trim();
        if text.is_empty() || text == "null" {
            return Ok(Default::default());
        }
        match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(Error::BadOutput {
                command: "action-get --format=json".into(),
                problem: format!("expected a JSON object, got `{text}`"),
            }),
        }
    }

    /// Path of a Juju resource, or `None` when none is attached (`resource-get` fails).
    pub fn resource(&self, name: &str) -> Result<Option<PathBuf>, Error> {
        let tool = hook_tool("resource-get")?;
        match run_checked(Command::new(tool).arg(name)) {
            Ok(out) if !out.stdout.trim().is_empty() => Ok(Some(PathBuf::from(out.stdout.trim()))),
            Ok(_) => Ok(None),
            Err(Error::CommandFailed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The other units on the peer relation `endpoint`.
    pub fn peers(&self, endpoint: &str) -> Result<Vec<String>, Error> {
        let ids = run_checked(
            Command::new(hook_tool("relation-ids")?).args(["--format=json", endpoint]),
        )?;
        let ids: Vec<String> = parse_list("relation-ids", &ids.stdout)?;
        let mut units = Vec::new();
        for id in ids {
            let out = run_checked(Command::new(hook_tool("relation-list")?).args([
                "--format=json",
                "-r",
                &id,
            ]))?;
            for unit in parse_list::<String>("relation-list", &out.stdout)? {
                if !units.contains(&unit) {
                    units.push(unit);
                }
            }
        }
        Ok(units)
    }

    /// The store relations this unit has (`s3-credentials`, `azure-storage-credentials`,
    /// `gcs-credentials`), by endpoint, each with its provider's bag; in that order.
    pub fn store_relations(&self) -> Result<Vec<(&'static str, Bag)>, Error> {
        let mut out = Vec::new();
        for endpoint in STORE_ENDPOINTS {
            if let Some(bag) = self.store_relation(endpoint)? {
                out.push((endpoint, bag));
            }
        }
        Ok(out)
    }

    /// The one store relation this unit has (endpoint and bag), `None` for none. More than one
    /// is refused (`Declined`), naming them: archives go to one store at a time.
    pub fn one_store_relation(&self) -> Result<Option<(&'static str, Bag)>, Error> {
        let mut related = self.store_relations()?;
        if related.len() > 1 {
            let endpoints: Vec<&str> = related.iter().map(|(e, _)| *e).collect();
            return Err(Error::Declined(several_stores(&endpoints)));
        }
        Ok(related.pop())
    }

    /// The provider's application databag of the store relation at `endpoint`, with the v1
    /// credentials secret (`secret-extra`) merged in; `None` when there is no such relation.
    pub fn store_relation(
        &self,
        endpoint: &str,
    ) -> Result<Option<BTreeMap<String, String>>, Error> {
        let ids = run_checked(
            Command::new(hook_tool("relation-ids")?).args(["--format=json", endpoint]),
        )?;
        let ids: Vec<String> = parse_list("relation-ids", &ids.stdout)?;
        let Some(id) = ids.first() else {
            return Ok(None);
        };
        let list = hook_tool("relation-list")?;
        let app = match run_checked(Command::new(&list).args(["--format=json", "--app", "-r", id]))
        {
            Ok(out) => serde_json::from_str::<Option<String>>(out.stdout.trim())
                .ok()
                .flatten()
                .filter(|a| !a.is_empty()),
            Err(Error::CommandFailed { stderr, .. })
                if stderr.contains("provided but not defined") =>
            {
                // Juju before 2.8.1: the application of the first unit.
                let out = run_checked(Command::new(&list).args(["--format=json", "-r", id]))?;
                parse_list::<String>("relation-list", &out.stdout)?
                    .first()
                    .and_then(|u| u.split('/').next().map(str::to_string))
            }
            Err(e) => return Err(e),
        };
        let Some(app) = app else {
            return Err(Error::StoreNotReady(format!(
                "relation `{id}` ({endpoint}) has no provider application yet"
            )));
        };
        let out = run_checked(Command::new(hook_tool("relation-get")?).args([
            "--format=json",
            "-r",
            id,
            "--app",
            "-",
            &app,
        ]))?;
        let text = out.stdout.trim();
        let mut bag: BTreeMap<String, String> = if text.is_empty() || text == "null" {
            BTreeMap::new()
        } else {
            serde_json::from_str(text).map_err(|e| Error::BadOutput {
                command: "relation-get --app --format=json".into(),
                problem: format!("{e}"),
            })?
        };
        if let Some(uri) = bag.get("secret-extra").cloned() {
            let out = run_checked(Command::new(hook_tool("secret-get")?).args([
                uri.as_str(),
                "--refresh",
                "--format=json",
            ]))
            .map_err(|e| match e {
                Error::CommandFailed { stderr, .. } => Error::StoreNotReady(format!(
                    "the credentials secret of relation `{id}` cannot be read ({})",
                    stderr.trim()
                )),
                other => other,
            })?;
            let secret: BTreeMap<String, serde_json::Value> =
                serde_json::from_str(out.stdout.trim()).map_err(|_| Error::BadOutput {
                    command: "secret-get --format=json".into(),
                    problem: "not a JSON object".into(),
                })?;
            for key in ["access-key", "secret-key"] {
                if let Some(serde_json::Value::String(v)) = secret.get(key) {
                    bag.insert(key.to_string(), v.clone());
                }
            }
        }
        Ok(Some(bag))
    }

    /// Reports the outcome. In Juju mode this is the single place `action-fail` is called;
    /// the process then exits 0. Standalone, prints YAML and returns the exit code.
    pub fn finish(&self, results: &Results, outcome: Result<(), Error>) -> u8 {
        // Every message reaches the operator whole or cut, never refused for its size.
        let message = |err: &Error| bounded(&err.to_string(), MESSAGE_MAX);
        match self {
            Reporter::Juju { .. } => {
                let mut code = 0;
                if !results.is_empty() {
                    let set = hook_tool("action-set").and_then(|tool| {
                        run_checked(Command::new(tool).args(results.action_set_args()))
                    });
                    if let Err(e) = set {
                        eprintln!("etcd-actions: {e}");
                        code = 1;
                    }
                }
                if let Err(err) = &outcome {
                    let failed = hook_tool("action-fail")
                        .and_then(|tool| run_checked(Command::new(tool).arg(message(err))));
                    eprintln!("etcd-actions: {}", message(err));
                    if let Err(e) = failed {
                        // Without action-fail the only way left to signal failure is the exit code.
                        eprintln!("etcd-actions: {e}");
                        code = err.exit_code();
                    }
                }
                code
            }
            Reporter::Standalone { .. } => {
                let mut doc = serde_yaml::Mapping::new();
                doc.insert("results".into(), results.to_yaml());
                match &outcome {
                    Ok(()) => {
                        doc.insert("status".into(), "completed".into());
                    }
                    Err(err) => {
                        doc.insert("status".into(), "failed".into());
                        doc.insert("message".into(), message(err).into());
                    }
                }
                print!("{}", serde_yaml::to_string(&doc).unwrap_or_default());
                match outcome {
                    Ok(()) => 0,
                    Err(err) => {
                        eprintln!("etcd-actions: {}", message(&err));
                        err.exit_code()
                    }
                }
            }
        }
    }
}

/// Quotes `s` for a POSIX shell when it holds anything but plainly safe characters.
pub fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Why a unit with several store relations uploads nowhere, and what to do.
pub fn several_stores(endpoints: &[&str]) -> String {
    format!(
        "more than one store is related ({}): archives go to one store at a time; remove all \
         but one (`juju remove-relation <app>:<endpoint> <integrator>`)",
        endpoints.join(", ")
    )
}

/// A relation's application databag.
pub type Bag = BTreeMap<String, String>;

/// The charm's endpoint of the `s3` relation.
pub const S3_ENDPOINT: &str = "s3-credentials";
/// The charm's endpoint of the `azure_storage` relation (azure-storage-integrator).
pub const AZURE_ENDPOINT: &str = "azure-storage-credentials";
/// The charm's endpoint of the `gcs` relation (gcs-integrator).
pub const GCS_ENDPOINT: &str = "gcs-credentials";
/// Every store relation, in the order they are named.
pub const STORE_ENDPOINTS: [&str; 3] = [S3_ENDPOINT, AZURE_ENDPOINT, GCS_ENDPOINT];

/// The bucket name this application asks the s3 provider for, unless the provider's own
/// config names one: `etcd-backups-<app>`, cut to S3's rules (3 to 63 of `a-z0-9-`).
pub fn default_bucket(app: &str) -> String {
    let mut name: String = format!("etcd-backups-{app}")
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// One charm config option, as `config-get <key> --format=json` gives it: `None` when there
/// is no `config-get` (standalone), the option is unset, or the tool fails.
pub fn config_value(key: &str) -> Option<String> {
    let tool = which::which("config-get").ok()?;
    let out = run_checked(Command::new(tool).args([key, "--format=json"])).ok()?;
    match serde_json::from_str::<serde_json::Value>(out.stdout.trim()).ok()? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Runs a relation hook of the `s3-credentials` endpoint: the leader writes `bucket` into our
/// application databag, which is what makes the provider publish its credentials. Does
/// nothing off the leader, and nothing when the bag already says so.
pub fn s3_relation_hook(hook: &str) -> Result<String, Error> {
    let leader = run_checked(Command::new(hook_tool("is-leader")?).arg("--format=json"))?;
    if leader.stdout.trim() != "true" {
        return Ok(format!("{hook}: not the leader; nothing to do"));
    }
    let id = std::env::var("JUJU_RELATION_ID").unwrap_or_default();
    if id.is_empty() {
        return Err(Error::usage(format!(
            "{hook} runs without JUJU_RELATION_ID; it must run as a relation hook"
        )));
    }
    let unit = std::env::var("JUJU_UNIT_NAME").unwrap_or_default();
    let app = unit.split('/').next().unwrap_or_default().to_string();
    let want = default_bucket(&app);
    // The s3 provider reads `bucket`; azure-storage-integrator `container`; both v1
    // integrators publish the secret fields named in `requested-secrets`.
    let (field, secrets) = if hook.starts_with(AZURE_ENDPOINT) {
        ("container", true)
    } else if hook.starts_with(GCS_ENDPOINT) {
        ("bucket", true)
    } else {
        ("bucket", false)
    };
    let have = run_checked(Command::new(hook_tool("relation-get")?).args([
        "--format=json",
        "-r",
        &id,
        "--app",
        field,
        &app,
    ]))?;
    let have: Option<String> = serde_json::from_str(have.stdout.trim()).unwrap_or(None);
    if have.is_some() {
        return Ok(format!("{hook}: {field} already requested; nothing to do"));
    }
    let mut args = vec![
        "-r".to_string(),
        id.clone(),
        "--app".to_string(),
        format!("{field}={want}"),
    ];
    if secrets {
        args.push("requested-secrets=[\"secret-key\"]".to_string());
    }
    run_checked(Command::new(hook_tool("relation-set")?).args(&args))?;
    Ok(format!(
        "{hook}: requested {field} `{want}` on relation {id}"
    ))
}

/// The pseudo-hook the follow service runs through `juju-exec` to have the GCS relation's
/// service-account key in memory: it prints the key to its stdout (a pipe).
pub const GCS_KEY_HOOK: &str = "gcs-key";

/// Prints the `gcs-credentials` relation's `secret-key` to stdout (in hook context).
pub fn print_gcs_key() -> Result<(), Error> {
    let reporter = Reporter::Juju {
        unit: std::env::var("JUJU_UNIT_NAME").unwrap_or_default(),
        app: String::new(),
    };
    let bag = reporter
        .store_relation(GCS_ENDPOINT)?
        .ok_or_else(|| Error::ProviderNotReady {
            provider: "gcs-integrator".into(),
            detail: "there is no gcs-credentials relation".into(),
        })?;
    let key = bag
        .get("secret-key")
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| Error::ProviderNotReady {
            provider: "gcs-integrator".into(),
            detail: "the gcs-credentials relation has no `secret-key` yet".into(),
        })?;
    use std::io::Write;
    std::io::stdout()
        .write_all(key.as_bytes())
        .map_err(|e| Error::io("cannot write the key to stdout", e))
}

/// The GCS relation's key, fetched into memory through `juju-exec <unit>` (for the follow
/// service, which runs outside a hook and is never given the key on disk).
pub fn gcs_key_via_exec(unit: &str, exe: &str) -> Result<String, Error> {
    let tool = ["juju-exec", "juju-run"]
        .iter()
        .find_map(|t| which::which(t).ok())
        .ok_or_else(|| Error::ToolMissing {
            tool: "juju-exec".into(),
            hint: "the follow service reads the GCS key through juju-exec".into(),
        })?;
    let command = format!("{} hook {GCS_KEY_HOOK}", shell_quote(exe));
    let out = run_checked(Command::new(tool).args([unit, command.as_str()]))?;
    Ok(out.stdout)
}

/// A message to the unit's log (hooks have no action output).
pub fn juju_log(msg: &str) {
    if let Ok(tool) = hook_tool("juju-log") {
        let _ = run_checked(Command::new(tool).arg(bounded(msg, MESSAGE_MAX)));
    }
}

/// When the process started, for the elapsed time in standalone progress lines.
pub fn started() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

fn hook_tool(name: &str) -> Result<PathBuf, Error> {
    which::which(name).map_err(|_| Error::ToolMissing {
        tool: name.to_string(),
        hint: "this Juju hook tool is not on PATH; JUJU_ACTION_NAME is set, so the agent \
               expects to run as a Juju action (unset it to run standalone)"
            .to_string(),
    })
}

fn parse_list<T: serde::de::DeserializeOwned>(tool: &str, text: &str) -> Result<Vec<T>, Error> {
    let text = text.trim();
    if text.is_empty() || text == "null" {
        return Ok(Vec::new());
    }
    serde_json::from_str(text).map_err(|e| Error::BadOutput {
        command: format!("{tool} --format=json"),
        problem: format!("{e}: `{text}`"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_action_set_rules() {
        for ok in ["snapshot.path", "copy.cmd", "a1", "etcd-version", "a.b.c"] {
            assert!(valid_key(ok), "{ok}");
        }
        for bad in [
            "Foo", "foo-", "-foo", "foo..bar", ".foo", "foo.", "", "a.stderr", "stdout",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn copy_commands_are_quoted() {
        let r = Reporter::Juju {
            unit: "etcd/0".into(),
            app: "etcd".into(),
        };
        assert_eq!(
            r.copy_command(std::path::Path::new("/a/b.tar.gz")),
            "juju scp etcd/0:/a/b.tar.gz ."
        );
        assert_eq!(
            r.copy_command(std::path::Path::new("/a b/it's;$(x)")),
            "juju scp 'etcd/0:/a b/it'\\''s;$(x)' ."
        );
    }

    #[test]
    fn results_nest_like_juju() {
        let mut r = Results::default();
        r.set("snapshot.path", "/x");
        r.set("snapshot.size", "68K");
        r.set("copy.cmd", "juju scp etcd/0:/x .");
        let yaml = serde_yaml::to_string(&r.to_yaml()).unwrap();
        assert_eq!(
            yaml,
            "copy:\n  cmd: juju scp etcd/0:/x .\nsnapshot:\n  path: /x\n  size: 68K\n"
        );
    }
}
