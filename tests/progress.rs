//! Progress in bytes: action-log about every 10% under Juju, timestamped lines on a pipe,
//! and an indicatif bar (bytes, rate, ETA) only when stderr is a terminal: a real pty (tmux).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

/// The percentages in lines like `snapshot: 40% (...)`.
fn percents(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split("snapshot: ").nth(1))
        .filter_map(|rest| rest.split('%').next())
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

#[track_caller]
fn assert_about_every_ten_percent(p: &[u64], text: &str) {
    assert!(p.len() >= 8 && p.len() <= 11, "{p:?}\n{text}");
    assert!(p.windows(2).all(|w| w[0] < w[1]), "{p:?}");
    assert_eq!(p.last(), Some(&100), "{text}");
}

/// A node whose db is a few MB: etcd streams it in 32 KiB messages.
fn node_with_data(base: &Path) -> Node {
    let node = Node::single(base, "unit", &v35());
    for i in 0..30 {
        node.put(
            &format!("blob{i}"),
            &format!("{i:x}").repeat(100 << 10)[..100 << 10],
        );
    }
    node
}

#[test]
fn juju_progress_goes_to_action_log_about_every_ten_percent() {
    let tmp = tempdir();
    let node = node_with_data(tmp.path());
    let juju = Juju::new(tmp.path(), "etcd/0");
    let target = tmp.path().join("backups");
    juju.params(
        "snapshot",
        serde_json::json!({"target": target.to_str().unwrap()}),
    );
    Agent::juju(&node, &juju, "snapshot").run().juju_ok(&juju);
    let log = juju.log();
    assert_about_every_ten_percent(&percents(&log), &log);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("snapshot: "))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" of ") && l.ends_with("/s)")),
        "sizes and rate in the lines: {log}"
    );
}

#[test]
fn a_pipe_gets_timestamped_lines_and_no_bar() {
    let tmp = tempdir();
    let node = node_with_data(tmp.path());
    let run = Agent::snapshot(&node, tmp.path().join("s").to_str().unwrap()).run();
    run.success();
    let err = run.stderr();
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("snapshot: ")).collect();
    assert!(
        lines.iter().all(|l| l.starts_with("etcd-actions: [")),
        "{err}"
    );
    assert_about_every_ten_percent(&percents(&err), &err);
    assert!(
        !err.contains('\r') && !err.contains("ETA"),
        "no bar on a pipe: {err}"
    );
}

#[test]
fn a_terminal_gets_a_progress_bar() {
    let tmp = tempdir();
    let node = node_with_data(tmp.path());
    let session = format!("etcd-actions-{}", std::process::id());
    let target = tmp.path().join("s");
    let done = tmp.path().join("done");
    // The agent's environment, as the other tests give it, written out for the shell in tmux.
    let mut agent = Agent::snapshot(&node, target.to_str().unwrap());
    let cmd = agent.command();
    let mut script = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            script.push_str(&format!(
                "export {}='{}'\n",
                k.to_string_lossy(),
                v.to_string_lossy()
            ));
        }
    }
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    script.push_str(&format!(
        "'{}' {} > {}/out.yaml; echo $? > {}\n",
        cmd.get_program().to_string_lossy(),
        args.join(" "),
        tmp.path().display(),
        done.display()
    ));
    let sh = tmp.path().join("run.sh");
    std::fs::write(&sh, script).unwrap();
    let tmux = |args: &[&str]| {
        let out = Command::new("tmux").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "160",
        "-y",
        "20",
        "sh",
    ]);
    tmux(&[
        "send-keys",
        "-t",
        &session,
        &format!("sh {}", sh.display()),
        "Enter",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let pane = tmux(&["capture-pane", "-p", "-t", &session]);
    tmux(&["kill-session", "-t", &session]);
    assert_eq!(
        std::fs::read_to_string(&done).unwrap_or_default().trim(),
        "0",
        "{pane}"
    );
    // The finished bar: what, the bar, bytes of total, rate, ETA.
    let bar = pane
        .lines()
        .find(|l| l.starts_with("snapshot ["))
        .unwrap_or_else(|| panic!("no bar on the terminal:\n{pane}"));
    assert!(
        bar.contains("MiB/") && bar.contains("/s") && bar.contains("ETA"),
        "{bar}"
    );
    assert!(!pane.contains("snapshot: 50%"), "a bar, not lines: {pane}");
}
