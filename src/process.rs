//! Every external command the agent runs goes through here.
//!
//! Spawn failure, non-zero exit and death by signal are separate errors, and the child's
//! stderr is carried into the message. Arguments are always passed as a vector: no value
//! that came from an action param is ever given to a shell.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::error::Error;

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Renders a command for messages: program basename and args.
pub fn display(cmd: &Command) -> String {
    let mut s = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program())
        .to_string_lossy()
        .into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended abnormally".to_string(),
    }
}

/// Most of a command's stdout kept (more is an error: no tool we run prints that much).
const STDOUT_MAX: usize = 16 << 20;
/// The tail of a command's stderr kept for messages.
const STDERR_TAIL: usize = 64 << 10;

/// Reads `r` to its end, keeping at most `max` bytes: the first ones, or with `tail` the
/// last ones. Returns the bytes kept and whether some were dropped.
fn read_bounded(mut r: impl Read, max: usize, tail: bool) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut dropped = false;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > max {
            dropped = true;
            if tail {
                let cut = kept.len() - max;
                kept.drain(..cut);
            } else {
                kept.truncate(max);
            }
        }
    }
    (kept, dropped)
}

fn lossy_tail(bytes: &[u8], dropped: bool) -> String {
    let text = String::from_utf8_lossy(bytes).into_owned();
    if dropped {
        format!("[... earlier output cut ...]\n{text}")
    } else {
        text
    }
}

/// Runs `cmd` to completion with stdin closed, capturing its output with bounded memory.
/// Fails unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Result<Output, Error> {
    let command = display(cmd);
    let invoke = |source| Error::CommandInvoke {
        command: command.clone(),
        source,
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(invoke)?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || read_bounded(stderr, STDERR_TAIL, true));
    let (out, out_dropped) = read_bounded(stdout, STDOUT_MAX, false);
    let (err, err_dropped) = err_reader.join().unwrap_or_default();
    let status = child.wait().map_err(invoke)?;
    let stdout = String::from_utf8_lossy(&out).into_owned();
    let stderr = lossy_tail(&err, err_dropped);
    if !status.success() {
        return Err(Error::CommandFailed {
            command,
            status: describe(status),
            stderr,
        });
    }
    if out_dropped {
        return Err(Error::BadOutput {
            command,
            problem: format!("it printed more than {} bytes", STDOUT_MAX),
        });
    }
    Ok(Output { stdout, stderr })
}

/// The last `STDERR_TAIL` bytes of a log file.
fn log_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(STDERR_TAIL as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let (bytes, _) = read_bounded(f, STDERR_TAIL, true);
    lossy_tail(&bytes, start > 0)
}

/// A command running in the background with its output in a log file (no pipe to fill),
/// for commands the agent works beside, and for daemons' launchers that may leave children
/// holding their output open.
pub struct Running {
    child: std::process::Child,
    command: String,
    log: std::path::PathBuf,
    status: Option<ExitStatus>,
}

/// Starts `cmd` with stdin closed and stdout and stderr going to `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Running, Error> {
    let command = display(cmd);
    let io = |source| Error::CommandInvoke {
        command: command.clone(),
        source,
    };
    let out = File::create(log).map_err(io)?;
    let err = out.try_clone().map_err(io)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io)?;
    Ok(Running {
        child,
        command,
        log: log.to_path_buf(),
        status: None,
    })
}

impl Running {
    /// Whether the command has exited (without waiting).
    pub fn exited(&mut self) -> Result<bool, Error> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|source| Error::CommandInvoke {
                    command: self.command.clone(),
                    source,
                })?;
        }
        Ok(self.status.is_some())
    }

    /// Waits for the command; fails unless it exited 0, with its output in the error.
    pub fn wait(&mut self) -> Result<Output, Error> {
        let status = match self.status {
            Some(s) => s,
            None => {
                let s = self.child.wait().map_err(|source| Error::CommandInvoke {
                    command: self.command.clone(),
                    source,
                })?;
                self.status = Some(s);
                s
            }
        };
        let text = log_tail(&self.log);
        if !status.success() {
            return Err(Error::CommandFailed {
                command: self.command.clone(),
                status: describe(status),
                stderr: text,
            });
        }
        Ok(Output {
            stdout: text,
            stderr: String::new(),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs an operator-supplied shell command (service stop/start). Its output goes to a file,
/// not a pipe, so a daemon it leaves behind cannot hold our pipe open and hang the action. It
/// runs in a process group of its own; after `timeout` the whole group is killed and the
/// run fails with `ServiceTimeout`.
pub fn run_shell(script: &str, log_dir: &Path, timeout: Duration) -> Result<Output, Error> {
    let log = log_dir.join(format!("service-{}.out", std::process::id()));
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).process_group(0);
    let mut running = spawn_logged(&mut cmd, &log)?;
    let deadline = Instant::now() + timeout;
    while !running.exited()? {
        if Instant::now() >= deadline {
            let pgid = Pid::from_raw(running.child.id() as i32);
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = running.child.wait();
            running.status = Some(ExitStatus::from_raw(9));
            return Err(Error::ServiceTimeout {
                command: script.to_string(),
                seconds: timeout.as_secs(),
                output: log_tail(&log),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    running.wait()
}

/// Builds a command for an etcd tool with a clean environment: inherited `ETCDCTL_*` and
/// `ETCDUTL_*` variables would conflict with our flags (etcdctl refuses flag+env pairs).
pub fn etcd_tool(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("ETCDCTL_") || k.starts_with("ETCDUTL_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("ETCDCTL_API", "3");
    cmd
}

/// A background child that must not outlive this run (a drill's throwaway etcd): started in
/// a process group of its own, under `setpriv --pdeathsig KILL` where setpriv exists (the
/// kernel kills it when this process dies, even by SIGKILL), and recorded in `record` with
/// a `marker` argument of its command line, so that the next run can end it should all of
/// that fail. SIGTERM, SIGINT and SIGHUP (a Juju cancel or timeout) kill its group before
/// this process exits. Dropping it kills the group and reaps the child.
pub struct Guarded {
    child: std::process::Child,
    record: std::path::PathBuf,
}

impl Guarded {
    /// Starts `program` with `args`, only `env` in its environment, and its output in
    /// `log`.
    pub fn spawn(
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &File,
        record: &Path,
        marker: &str,
        on_signal: impl Fn() + Send + 'static,
    ) -> Result<Guarded, Error> {
        let mut cmd = match which::which("setpriv") {
            Ok(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(program);
                c
            }
            Err(_) => Command::new(program),
        };
        cmd.args(args).env_clear().envs(env.iter().copied());
        let out = log
            .try_clone()
            .map_err(|e| Error::io("cannot share a log file", e))?;
        let err = log
            .try_clone()
            .map_err(|e| Error::io("cannot share a log file", e))?;
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().map_err(|e| Error::CommandInvoke {
            command: display(&cmd),
            source: e,
        })?;
        let pid = child.id() as i32;
        let _ = std::fs::write(record, format!("{pid}\n{marker}\n"));
        let record_path = record.to_path_buf();
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGHUP,
        ]) {
            std::thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    let _ = std::fs::remove_file(&record_path);
                    on_signal();
                    std::process::exit(128 + sig);
                }
            });
        }
        Ok(Guarded {
            child,
            record: record.to_path_buf(),
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Asks the child to stop (SIGTERM) and waits up to `timeout` for it to exit; whether it
    /// did. It is killed either way when this is dropped.
    pub fn terminate(mut self, timeout: Duration) -> bool {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.record);
    }
}

/// Ends a child recorded by `Guarded` in `record` that is still running (a run that was
/// killed outright left it): only when its command line still carries the recorded marker,
/// so a reused pid is never touched. Removes the record.
pub fn end_recorded(record: &Path) {
    let Ok(text) = std::fs::read_to_string(record) else {
        return;
    };
    let mut lines = text.lines();
    let pid = lines.next().and_then(|p| p.trim().parse::<i32>().ok());
    let marker = lines.next().unwrap_or_default().to_string();
    let carries = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c.split(|&b| b == 0).any(|a| a == marker.as_bytes()))
            .unwrap_or(false)
    };
    if let Some(pid) = pid.filter(|&p| p > 1 && !marker.is_empty()) {
        if carries(pid) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while carries(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _ = std::fs::remove_file(record);
}
