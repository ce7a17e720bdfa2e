//! Entry point: argv -> `etcd_actions::run` -> exit code. No logic lives here.

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(etcd_actions::run(std::env::args_os().collect()))
}
