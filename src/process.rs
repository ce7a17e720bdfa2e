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

/// Runs an operator-supplied shell command (service stop/start). Its output goes to files, not
/// pipes, so a daemon it leaves behind cannot hold our pipe open and hang the action.
pub fn run_shell(script: &str, log_dir: &Path) -> Result<Output, Error> {
    let command = format!("sh -c '{script}'");
    let out_path = log_dir.join(format!("service-{}.out", std::process::id()));
    let err_path = log_dir.join(format!("service-{}.err", std::process::id()));
    let io = |source| Error::CommandInvoke {
        command: command.clone(),
        source,
    };
    let stdout = File::create(&out_path).map_err(io)?;
    let stderr = File::create(&err_path).map_err(io)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .map_err(io)?;
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let output = Output {
        stdout: read(&out_path),
        stderr: read(&err_path),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    if !status.success() {
        return Err(Error::CommandFailed {
            command,
            status: describe(status),
            stderr: output.stderr,
        });
    }
    Ok(output)
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
