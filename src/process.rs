//! Every external command the agent runs goes through here.
//!
//! Spawn failure, non-zero exit and death by signal are separate errors, and the child's
//! stderr is carried into the message. Arguments are always passed as a vector: no value
//! that came from an action param is ever given to a shell.

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

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

/// Runs `cmd` to completion with stdin closed, capturing its output. Fails unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Result<Output, Error> {
    let command = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| Error::CommandInvoke {
            command: command.clone(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(Error::CommandFailed {
            command,
            status: describe(out.status),
            stderr,
        });
    }
    Ok(Output { stdout, stderr })
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
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
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
/// not a pipe, so a daemon it leaves behind cannot hold our pipe open and hang the action.
pub fn run_shell(script: &str, log_dir: &Path) -> Result<Output, Error> {
    let log = log_dir.join(format!("service-{}.out", std::process::id()));
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    spawn_logged(&mut cmd, &log)?.wait()
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
