//! Scheduled backups: a systemd service + timer pair that runs `etcd-actions backup`, printed
//! by `etcd-actions schedule`, installed with `--install`, and kept in step with the charm's
//! `backup-schedule` / `backup-retention` config by its `config-changed` hook.
//!
//! The service runs as root with the same `ETCD_ACTIONS_*` settings the command was given, and
//! writes to the journal. Under Juju it runs through `juju-exec <unit>` so that the backup
//! reads the `s3` relation as an action does. Secrets never go into the world-readable unit
//! files: the retention policy and any S3 credentials go into a 0600 environment file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext};
use crate::juju::Results;
use crate::process::run_checked;

pub const UNIT: &str = "etcd-actions-backup";
const ENV_FILE: &str = "/etc/etcd-actions/backup.env";

/// Where unit files go: `/etc/systemd/system`, or ETCD_ACTIONS_SYSTEMD_DIR.
fn unit_dir() -> PathBuf {
    std::env::var_os("ETCD_ACTIONS_SYSTEMD_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/etc/systemd/system"), PathBuf::from)
}

/// The installed timer's `OnCalendar`, and its next run as systemd reports it (`None` when
/// there is no timer, or systemd cannot say).
pub fn installed() -> (Option<String>, Option<String>) {
    let timer = unit_dir().join(format!("{UNIT}.timer"));
    let Ok(text) = std::fs::read_to_string(&timer) else {
        return (None, None);
    };
    let calendar = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("OnCalendar="))
        .map(str::to_string);
    let next = which::which("systemctl").ok().and_then(|tool| {
        let out = run_checked(Command::new(tool).args([
            "show",
            &format!("{UNIT}.timer"),
            "--property=NextElapseUSecRealtime",
            "--value",
        ]))
        .ok()?;
        Some(out.stdout.trim().to_string()).filter(|s| !s.is_empty() && s != "n/a")
    });
    (calendar, next)
}

fn env_file() -> PathBuf {
    std::env::var_os("ETCD_ACTIONS_ENV_FILE")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(ENV_FILE), PathBuf::from)
}

/// Quotes a value for a systemd unit line: `%` is a specifier, `\\` and `"` are escapes.
/// Values never hold control characters (`units` refuses them): a newline would end the line.
fn quote(v: &str) -> String {
    format!(
        "\"{}\"",
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('%', "%%")
    )
}

/// Quotes an `ExecStart=` argument, where `$` also expands.
fn quote_exec(v: &str) -> String {
    quote(&v.replace('$', "$$"))
}

/// Quotes a value for the `EnvironmentFile=`, which systemd reads as a shell-like file: no
/// specifiers there (a `%` stays a `%`), and in double quotes `\\`, `"`, `$` and `` ` `` are
/// escaped with a backslash.
fn quote_env(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Refuses a value that would break the line it is written on.
fn one_line(what: &str, v: &str) -> Result<(), Error> {
    if v.chars().any(|c| c.is_control()) {
        return Err(Error::usage(format!(
            "{what} has a newline or another control character, which would split the \
             systemd unit it is written into; remove it"
        )));
    }
    Ok(())
}

/// Checks an OnCalendar expression: with `systemd-analyze calendar` when it is there, and
/// always for characters that cannot be in one.
pub fn check_calendar(spec: &str) -> Result<(), Error> {
    let bad = |why: String| {
        Error::usage(format!(
            "OnCalendar `{}` is not valid: {why}; write it as systemd does, e.g. `daily`, \
             `*-*-* 02:30:00` or `Mon..Fri *-*-* 00/6:00`",
            crate::error::bounded(spec, 200)
        ))
    };
    if spec.trim().is_empty() || spec.chars().any(|c| c.is_control()) {
        return Err(bad("it is empty or has control characters".into()));
    }
    if spec.trim_start().starts_with('-') {
        return Err(bad("it starts with `-`, as an option does".into()));
    }
    if let Ok(tool) = which::which("systemd-analyze") {
        if let Err(Error::CommandFailed { stderr, .. }) =
            run_checked(Command::new(tool).args(["calendar", "--", spec]))
        {
            return Err(bad(stderr.trim().to_string()));
        }
    }
    Ok(())
}

/// A service's `ExecStart=` and `Environment=` lines, quoted for systemd.
fn exec_lines(exec: &[String], env: &[(String, String)]) -> String {
    let mut out = format!(
        "ExecStart={}\n",
        exec.iter()
            .map(|a| quote_exec(a))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (k, v) in env {
        out.push_str(&format!("Environment={}\n", quote(&format!("{k}={v}"))));
    }
    out
}

/// The service and timer texts. Refuses any value with a control character.
pub fn units(
    exec: &[String],
    env: &[(String, String)],
    on_calendar: &str,
) -> Result<(String, String), Error> {
    for a in exec {
        one_line("a command-line argument of the timer's service", a)?;
    }
    for (k, v) in env {
        one_line(&format!("the setting {k}"), v)?;
    }
    one_line("the OnCalendar spec", on_calendar)?;
    let mut service = String::from(
        "[Unit]\n\
         Description=Back up this machine's etcd (etcd-actions backup)\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n",
    );
    service.push_str(&exec_lines(exec, env));
    service.push_str(&format!(
        "EnvironmentFile=-{}\n\
         Nice=10\n\
         IOSchedulingClass=best-effort\n\
         StandardOutput=journal\n\
         StandardError=journal\n",
        env_file().display()
    ));
    let timer = format!(
        "[Unit]\n\
         Description=Scheduled etcd backups (etcd-actions)\n\
         \n\
         [Timer]\n\
         OnCalendar={on_calendar}\n\
         Persistent=true\n\
         RandomizedDelaySec=60\n\
         Unit={UNIT}.service\n\
         \n\
         [Install]\n\
         WantedBy=timers.target\n"
    );
    Ok((service, timer))
}

/// The settings in force (flags or environment), secrets aside, for the service: every one
/// the command was given, so the timed run does what this command would. Other
/// `ETCD_ACTIONS_*` variables of this process are carried too.
fn current_settings(settings: &crate::config::Settings) -> Vec<(String, String)> {
    let mut v = settings.env_pairs();
    for (k, val) in std::env::vars() {
        let carried = k.starts_with("ETCD_ACTIONS_")
            && !matches!(
                k.as_str(),
                "ETCD_ACTIONS_RETENTION"
                    | "ETCD_ACTIONS_SYSTEMD_DIR"
                    | "ETCD_ACTIONS_ENV_FILE"
                    | "ETCD_ACTIONS_PAUSE"
                    | "ETCD_ACTIONS_PEAK_RSS_FILE"
            );
        if carried && !v.iter().any(|(have, _)| *have == k) {
            v.push((k, val));
        }
    }
    v.sort();
    v
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).ctx(|| format!("cannot create `{}`", dir.display()))?;
    }
    let tmp = path.with_extension("tmp-etcd-actions");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .ctx(|| format!("cannot write `{}`", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .ctx(|| format!("cannot write `{}`", tmp.display()))?;
    fs::rename(&tmp, path).ctx(|| format!("cannot write `{}`", path.display()))
}

/// Runs systemctl when systemd runs this machine; says what it did.
fn systemctl(args: &[&str]) -> String {
    if !Path::new("/run/systemd/system").exists() {
        return format!(
            "systemd is not running here: run `systemctl {}` yourself",
            args.join(" ")
        );
    }
    match which::which("systemctl")
        .map_err(|e| e.to_string())
        .and_then(|t| run_checked(Command::new(t).args(args)).map_err(|e| e.to_string()))
    {
        Ok(_) => format!("systemctl {}: done", args.join(" ")),
        Err(e) => format!("systemctl {} failed: {e}", args.join(" ")),
    }
}

/// Writes the units (and the 0600 environment file), then reloads and enables the timer.
fn install(service: &str, timer: &str, env_file_text: &str) -> Result<Vec<String>, Error> {
    let dir = unit_dir();
    write_file(&dir.join(format!("{UNIT}.service")), service, 0o644)?;
    write_file(&dir.join(format!("{UNIT}.timer")), timer, 0o644)?;
    write_file(&env_file(), env_file_text, 0o600)?;
    Ok(vec![
        systemctl(&["daemon-reload"]),
        systemctl(&["enable", "--now", &format!("{UNIT}.timer")]),
    ])
}

/// Disables the timer and removes the units.
fn uninstall() -> Result<Vec<String>, Error> {
    let mut done = vec![systemctl(&["disable", "--now", &format!("{UNIT}.timer")])];
    let dir = unit_dir();
    for name in [format!("{UNIT}.service"), format!("{UNIT}.timer")] {
        crate::fsutil::remove_any(&dir.join(name))?;
    }
    crate::fsutil::remove_any(&env_file())?;
    done.push(systemctl(&["daemon-reload"]));
    Ok(done)
}

fn self_exe() -> Result<String, Error> {
    std::env::current_exe()
        .ctx(|| "cannot find this program's path".to_string())
        .map(|p| p.display().to_string())
}

/// `etcd-actions schedule`.
pub fn run(
    settings: &crate::config::Settings,
    on_calendar: &str,
    target: &Path,
    install_units: bool,
    results: &mut Results,
) -> Result<(), Error> {
    check_calendar(on_calendar)?;
    let exec = vec![
        self_exe()?,
        "backup".to_string(),
        "--target".to_string(),
        target.display().to_string(),
    ];
    let (service, timer) = units(&exec, &current_settings(settings), on_calendar)?;
    results.set("schedule.service", &service);
    results.set("schedule.timer", &timer);
    if install_units {
        let retention = std::env::var("ETCD_ACTIONS_RETENTION").unwrap_or_default();
        crate::retention::Policy::parse(&retention)
            .map_err(|e| Error::usage(format!("ETCD_ACTIONS_RETENTION: {e}")))?;
        let mut text = env_text(&retention)?;
        for (k, v) in settings.s3.credentials.env_pairs() {
            one_line(k, &v)?;
            text.push_str(&format!("{k}={}\n", quote_env(&v)));
        }
        for note in install(&service, &timer, &text)? {
            results.set(&format!("schedule.{}", note_key(&note)), note);
        }
        results.set("schedule.installed", unit_dir().display());
    }
    Ok(())
}

fn juju_log_note(note: &str) {
    crate::juju::juju_log(note);
}

fn note_key(note: &str) -> &'static str {
    if note.contains("daemon-reload") {
        "reload"
    } else {
        "enable"
    }
}

fn env_text(retention: &str) -> Result<String, Error> {
    one_line("the retention policy", retention)?;
    Ok(format!(
        "# Written by etcd-actions; read by {UNIT}.service.\nETCD_ACTIONS_RETENTION={}\n",
        quote_env(retention)
    ))
}

/// The follow service's unit: `etcd-actions follow` for as long as the machine runs,
/// restarted when it ends, stopped with SIGTERM (it flushes and exits 0).
pub fn follow_unit(exec: &[String], env: &[(String, String)]) -> Result<String, Error> {
    for a in exec {
        one_line("a command-line argument of the follow service", a)?;
    }
    for (k, v) in env {
        one_line(&format!("the setting {k}"), v)?;
    }
    let mut service = String::from(
        "[Unit]\n\
         Description=Record etcd's change history for point-in-time restores (etcd-actions follow)\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         StartLimitIntervalSec=0\n\
         \n\
         [Service]\n\
         Type=simple\n",
    );
    service.push_str(&exec_lines(exec, env));
    service.push_str(&format!(
        "EnvironmentFile=-{}\n\
         Restart=always\n\
         RestartSec=5\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec=60\n\
         Nice=5\n\
         StandardOutput=journal\n\
         StandardError=journal\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        follow_env_file().display()
    ));
    Ok(service)
}

fn follow_env_file() -> PathBuf {
    env_file().with_file_name("follow.env")
}

/// Installs (or, with `on` false, removes) the follow service of the charm's
/// `continuous-backup` option. The service runs outside any hook, so what a hook would read
/// (the s3 relation, the encryption recipients) goes into its 0600 environment file; the s3
/// relation hooks call this again when the relation changes.
pub fn sync_follow(
    settings: &crate::config::Settings,
    on: bool,
    target: &str,
) -> Result<String, Error> {
    let dir = unit_dir();
    let service_path = dir.join(format!("{}.service", crate::actions::follow::SERVICE));
    let name = format!("{}.service", crate::actions::follow::SERVICE);
    if !on {
        if !service_path.exists() {
            return Ok("continuous-backup is off".into());
        }
        let mut notes = vec![systemctl(&["disable", "--now", &name])];
        crate::fsutil::remove_any(&service_path)?;
        crate::fsutil::remove_any(&follow_env_file())?;
        crate::fsutil::remove_any(&follow_env_file().with_extension("ca.pem"))?;
        notes.push(systemctl(&["daemon-reload"]));
        return Ok(format!(
            "continuous-backup is off: removed the follow service ({})",
            notes.join("; ")
        ));
    }
    let mut env = current_settings(settings);
    let (model, _) = crate::unit::juju_identity();
    let unit = std::env::var("JUJU_UNIT_NAME").unwrap_or_default();
    // The unit and model, so that follow's archives and history are this application's.
    env.retain(|(k, _)| !k.starts_with("ETCD_ACTIONS_S3_") && k != "ETCD_ACTIONS_ENCRYPT_TO");
    env.push(("JUJU_UNIT_NAME".into(), unit));
    if let Some(d) = crate::juju::config_value("metrics-dir").filter(|d| !d.trim().is_empty()) {
        env.retain(|(k, _)| k != "ETCD_ACTIONS_METRICS_DIR");
        env.push(("ETCD_ACTIONS_METRICS_DIR".into(), d));
    }
    if let Some(m) = model {
        env.push(("JUJU_MODEL_UUID".into(), m));
    }
    let mut text = format!("# Written by etcd-actions; read by {name}.\n");
    let keys = crate::crypt::Keys::load(&settings.keys, true)?;
    if keys.encrypts() {
        text.push_str(&format!(
            "ETCD_ACTIONS_ENCRYPT_TO={}\n",
            quote_env(&keys.recipients().join(","))
        ));
    }
    let reporter = crate::juju::Reporter::Juju {
        unit: String::new(),
        app: String::new(),
    };
    let mut ca_changed = false;
    let store_note = match follow_store(&reporter) {
        Ok(cfg) => {
            let ca = follow_env_file().with_extension("ca.pem");
            if !cfg.ca_pems.is_empty() {
                let pem = cfg.ca_pems.join("\n");
                if fs::read_to_string(&ca).ok().as_deref() != Some(pem.as_str()) {
                    write_file(&ca, &pem, 0o600)?;
                    ca_changed = true;
                }
            }
            let (mut public, secret) = cfg.env_pairs(Some(&ca));
            if cfg.location() == "gcs" {
                // The key is never written to disk: the service reads it through juju-exec.
                let unit = std::env::var("JUJU_UNIT_NAME").unwrap_or_default();
                public.push((crate::store::GCS_KEY_FROM_UNIT.to_string(), unit));
            }
            for (k, v) in public.iter().chain(&secret) {
                one_line(k, v)?;
                text.push_str(&format!("{k}={}\n", quote_env(v)));
            }
            format!("segments go to {} too", cfg.describe())
        }
        Err(why) => format!("segments stay local: {why}"),
    };
    let exec = vec![
        self_exe()?,
        "follow".to_string(),
        "--target".to_string(),
        target.to_string(),
    ];
    let service = follow_unit(&exec, &env)?;
    let same = |p: &Path, want: &str| fs::read_to_string(p).is_ok_and(|t| t == want);
    if same(&service_path, &service) && same(&follow_env_file(), &text) && !ca_changed {
        return Ok(format!(
            "continuous-backup: the follow service is up to date ({store_note})"
        ));
    }
    write_file(&service_path, &service, 0o644)?;
    write_file(&follow_env_file(), &text, 0o600)?;
    let notes = [
        systemctl(&["daemon-reload"]),
        systemctl(&["enable", &name]),
        // A running follow picks up new settings by a restart (it resumes without a gap).
        systemctl(&["restart", &name]),
    ];
    Ok(format!(
        "continuous-backup: follow service installed in {} ({store_note}; {})",
        dir.display(),
        notes.join("; ")
    ))
}

/// After an s3 relation hook, `secret-changed` and at `update-status`: an installed follow
/// service gets the relation's store and the secret's recipients now (restarted only when
/// something changed). The target comes from the charm's config, checked as
/// `config-changed` checks it.
pub fn refresh_follow(settings: &crate::config::Settings) -> Result<String, Error> {
    let service = unit_dir().join(format!("{}.service", crate::actions::follow::SERVICE));
    if !service.exists() {
        return Ok("no follow service".into());
    }
    let config = charm_config()?;
    let (continuous, target) = follow_config(&config);
    if !continuous {
        return Ok("continuous-backup is off: config-changed removes the follow service".into());
    }
    if let Err(msg) = check_follow_target(&target) {
        return Ok(format!("the follow service was left as it was: {msg}"));
    }
    crate::crypt::Keys::load(&settings.keys, true)?.check_writes()?;
    sync_follow(settings, true, &target)
}

/// The store the follow service uploads segments to: the one store relation's, when its
/// settings can reach a service outside a hook. Why not, otherwise.
fn follow_store(reporter: &crate::juju::Reporter) -> Result<crate::store::StoreConfig, String> {
    match reporter.one_store_relation() {
        Ok(Some((endpoint, bag))) => {
            crate::store::StoreConfig::from_relation(endpoint, &bag).map_err(|e| e.to_string())
        }
        Ok(None) => Err("no store relation".into()),
        Err(Error::Declined(msg)) => Err(msg),
        Err(e) => Err(e.to_string()),
    }
}

/// The charm's config, as `config-get --format=json` gives it.
fn charm_config() -> Result<serde_json::Map<String, serde_json::Value>, Error> {
    let tool = which::which("config-get").map_err(|_| Error::ToolMissing {
        tool: "config-get".into(),
        hint: "this runs as a Juju hook".into(),
    })?;
    let out = run_checked(Command::new(tool).arg("--format=json"))?;
    Ok(serde_json::from_str(out.stdout.trim()).unwrap_or_default())
}

/// `continuous-backup` and `backup-target` (the default target when it is empty).
fn follow_config(config: &serde_json::Map<String, serde_json::Value>) -> (bool, String) {
    let target = config
        .get("backup-target")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .unwrap_or(crate::cli::DEFAULT_TARGET)
        .to_string();
    let continuous = config
        .get("continuous-backup")
        .and_then(|v| v.as_bool().or_else(|| v.as_str().map(|s| s == "true")))
        .unwrap_or(false);
    (continuous, target)
}

fn check_follow_target(target: &str) -> Result<(), &'static str> {
    if one_line("backup-target", target).is_err() || !Path::new(target).is_absolute() {
        return Err("backup-target: not an absolute directory; continuous-backup needs one");
    }
    Ok(())
}

/// The charm's `config-changed` hook: installs, updates or removes the timer from the
/// `backup-schedule`, `backup-retention` and `backup-target` options. An option that cannot be
/// used sets a `blocked` status naming it and leaves the installed timer as it was.
pub fn config_changed(settings: &crate::config::Settings) -> Result<String, Error> {
    let config = charm_config()?;
    let get = |k: &str| {
        config
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let unit = std::env::var("JUJU_UNIT_NAME").unwrap_or_default();
    let reporter = crate::juju::Reporter::Juju {
        unit: unit.clone(),
        app: unit.split('/').next().unwrap_or_default().to_string(),
    };
    let schedule = get("backup-schedule");
    let retention = get("backup-retention");
    // The encryption keys: a secret that cannot be read or holds no usable key would make
    // every backup fail (never silently write them in the clear).
    if let Err(e) =
        crate::crypt::Keys::load(&settings.keys, true).and_then(|k| k.check_writes().map(|()| k))
    {
        let msg = format!(
            "{}: {}",
            crate::crypt::SECRET_OPTION,
            crate::error::bounded(&e.to_string(), 400)
        );
        reporter.status("blocked", &msg);
        return Ok(format!(
            "the timer was left as it was: {msg}; fix it with `juju config` or `juju grant-secret`"
        ));
    }
    let (continuous, target) = follow_config(&config);
    let follow_note = if let (true, Err(msg)) = (continuous, check_follow_target(&target)) {
        reporter.status("blocked", msg);
        return Ok(format!("the follow service was left as it was: {msg}"));
    } else {
        sync_follow(settings, continuous, &target)?
    };
    juju_log_note(&follow_note);
    if schedule.is_empty() {
        let had = unit_dir().join(format!("{UNIT}.timer")).exists();
        let notes = uninstall()?;
        reporter.status("active", "no backup schedule");
        return Ok(if had {
            format!(
                "backup-schedule is empty: removed the timer ({})",
                notes.join("; ")
            )
        } else {
            "backup-schedule is empty: no timer".to_string()
        });
    }
    let checked = check_options(&schedule, &retention, &target);
    if let Err((option, e)) = checked {
        let msg = format!("{option}: {}", crate::error::bounded(&e.to_string(), 400));
        reporter.status("blocked", &msg);
        return Ok(format!(
            "the timer was left as it was: {msg}; fix it with `juju config`"
        ));
    }
    let juju_exec = ["juju-exec", "juju-run"]
        .iter()
        .find_map(|t| which::which(t).ok())
        .ok_or_else(|| Error::ToolMissing {
            tool: "juju-exec".into(),
            hint: "the timer runs the backup through juju-exec (juju-run on Juju 2.9)".into(),
        })?;
    let command = format!(
        "{} backup --target {}",
        crate::juju::shell_quote(&self_exe()?),
        crate::juju::shell_quote(&target)
    );
    let exec = vec![juju_exec.display().to_string(), unit, command];
    let (service, timer) = units(&exec, &current_settings(settings), &schedule)?;
    let notes = install(&service, &timer, &env_text(&retention)?)?;
    reporter.status("active", &format!("backups scheduled: {schedule}"));
    Ok(format!(
        "backup timer `{schedule}` installed in {} ({})",
        unit_dir().display(),
        notes.join("; ")
    ))
}

/// Checks the options that reach the unit files; on a problem, names the option.
fn check_options(
    schedule: &str,
    retention: &str,
    target: &str,
) -> Result<(), (&'static str, Error)> {
    check_calendar(schedule).map_err(|e| ("backup-schedule", e))?;
    crate::retention::Policy::parse(retention)
        .map_err(|e| ("backup-retention", Error::usage(e)))?;
    one_line("backup-retention", retention).map_err(|e| ("backup-retention", e))?;
    one_line("backup-target", target).map_err(|e| ("backup-target", e))?;
    if !Path::new(target).is_absolute() {
        return Err((
            "backup-target",
            Error::usage(format!(
                "`{}` is not an absolute directory",
                crate::error::bounded(target, 200)
            )),
        ));
    }
    Ok(())
}
