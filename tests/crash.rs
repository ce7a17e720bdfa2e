//! Crash safety: abort at every crash point and kill -9 at many moments. After each crash,
//! starting etcd yields exactly the old or exactly the new keys, and a rerun succeeds.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use etcd_actions::actions::restore::CRASH_POINTS;

use crate::restore::snapshot;
use crate::util::*;

struct Bench {
    unit: Node,
    old: std::collections::BTreeMap<String, String>,
    new: std::collections::BTreeMap<String, String>,
    old_archive: std::path::PathBuf,
    new_archive: std::path::PathBuf,
    _src: Node,
}

fn bench(base: &Path) -> Bench {
    let src = Node::single(base, "src", &v35());
    src.fill("new/", 120);
    let (new_archive, _) = snapshot(&src, &base.join("snaps-new"));
    let unit = Node::single(base, "unit", &v35());
    unit.fill("old/", 80);
    let (old_archive, _) = snapshot(&unit, &base.join("snaps-old"));
    Bench {
        old: unit.dump(),
        new: src.dump(),
        unit,
        old_archive,
        new_archive,
        _src: src,
    }
}

impl Bench {
    fn restore(&self, archive: &Path, backups: &Path) -> Agent {
        Agent::restore(
            &self.unit,
            archive.to_str().unwrap(),
            &["--target", backups.to_str().unwrap()],
        )
    }

    /// As after a power cut: stop whatever runs, start etcd on what is on disk.
    #[track_caller]
    fn power_cycle_sees_old_or_new(&self, context: &str) -> &'static str {
        self.unit.stop();
        self.unit.start();
        self.unit.wait_healthy();
        let got = self.unit.dump();
        if got == self.old {
            "old"
        } else if got == self.new {
            "new"
        } else {
            panic!(
                "after {context}: etcd holds neither the old nor the new keys ({} keys)",
                got.len()
            );
        }
    }

    #[track_caller]
    fn rerun_then_reset(&self, backups: &Path, context: &str) {
        let r = self.restore(&self.new_archive, backups).run();
        r.success();
        assert_eq!(self.unit.dump(), self.new, "rerun after {context}");
        let state = files_in(&self.unit.data_dir().join(".etcd-actions"));
        assert_eq!(
            state,
            kept_previous(),
            "leftovers after the rerun that followed {context}"
        );
        self.restore(&self.old_archive, backups)
            .env("X", "")
            .run()
            .success();
        assert_eq!(self.unit.dump(), self.old);
    }
}

#[test]
fn crash_at_every_restore_step() {
    let tmp = tempdir();
    let b = bench(tmp.path());
    let backups = tmp.path().join("backups");
    let mut seen = Vec::new();
    for point in CRASH_POINTS {
        let run = b
            .restore(&b.new_archive, &backups)
            .env("FAILPOINTS", format!("{point}=return"))
            .run();
        assert_eq!(
            run.out.status.signal(),
            Some(6),
            "the crash point {point} did not fire (build with --features failpoints): {}",
            run.stderr()
        );
        let state = b.power_cycle_sees_old_or_new(point);
        seen.push(format!("{point}:{state}"));
        b.rerun_then_reset(&backups, point);
    }
    eprintln!(
        "crash points covered: {} ({})",
        CRASH_POINTS.len(),
        seen.join(", ")
    );
    assert!(seen.iter().any(|s| s.ends_with(":old")) && seen.iter().any(|s| s.ends_with(":new")));
}

#[test]
fn kill_9_at_many_moments() {
    let tmp = tempdir();
    let b = bench(tmp.path());
    let backups = tmp.path().join("backups");
    // Time a clean run, then spread the kills over it (deterministic fractions).
    let start = std::time::Instant::now();
    b.restore(&b.new_archive, &backups).run().success();
    let full = start.elapsed();
    b.restore(&b.old_archive, &backups).run().success();
    let mut outcomes = Vec::new();
    for frac in [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.97] {
        let delay = full.mul_f64(frac);
        let mut agent = b.restore(&b.new_archive, &backups);
        let child = agent
            .command()
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let status = child.wait_with_output().unwrap().status;
        let context = format!("kill -9 after {delay:?} (exit {status:?})");
        let state = b.power_cycle_sees_old_or_new(&context);
        outcomes.push(format!("{:.0}ms:{state}", delay.as_secs_f64() * 1000.0));
        b.rerun_then_reset(&backups, &context);
    }
    eprintln!(
        "kill -9 trials: {} over a {full:?} restore ({})",
        outcomes.len(),
        outcomes.join(", ")
    );
}

#[test]
fn concurrent_restores_serialize_and_a_held_lock_fails_clearly() {
    let tmp = tempdir();
    let b = bench(tmp.path());
    let backups = tmp.path().join("backups");
    let children: Vec<_> = (0..2)
        .map(|_| b.restore(&b.new_archive, &backups).spawn())
        .collect();
    for c in children {
        wait_ok(c);
    }
    assert_eq!(b.unit.dump(), b.new);

    // Another holder of the lock: with no time to wait, the action fails and says why.
    let lock = b.unit.data_dir().join(".etcd-actions/lock");
    let mut holder = std::process::Command::new("flock")
        .arg("-o")
        .arg(&lock)
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let run = b
        .restore(&b.old_archive, &backups)
        .env("ETCD_ACTIONS_LOCK_TIMEOUT", "1")
        .run();
    let _ = holder.kill();
    let _ = holder.wait();
    let msg = run.failure();
    assert!(msg.contains("holds the lock"), "{msg}");
    assert_eq!(run.code(), 4);
    assert_eq!(b.unit.dump(), b.new, "nothing changed");
    // The holder is gone (as after kill -9): the lock does not block.
    b.restore(&b.old_archive, &backups)
        .env("ETCD_ACTIONS_LOCK_TIMEOUT", "1")
        .run()
        .success();
    assert_eq!(b.unit.dump(), b.old);
}

#[test]
fn the_next_action_of_any_kind_recovers_and_leaves_etcd_running() {
    let tmp = tempdir();
    let b = bench(tmp.path());
    let backups = tmp.path().join("backups");
    // Crashed with etcd stopped (before the swap), then with the new data swapped in but not
    // verified: a snapshot run, not a restore, must clean up, roll back and start etcd.
    for point in ["restore-after-stop", "restore-after-swap"] {
        let run = b
            .restore(&b.new_archive, &backups)
            .env("FAILPOINTS", format!("{point}=return"))
            .run();
        assert_eq!(run.out.status.signal(), Some(6), "{point} did not fire");
        assert!(!b.unit.running(), "etcd is down after the crash at {point}");
        let snaps = tmp.path().join(format!("after-{point}"));
        let r = Agent::snapshot(&b.unit, snaps.to_str().unwrap())
            .run()
            .success();
        assert!(b.unit.running(), "recovery left etcd running");
        assert_eq!(
            b.unit.dump(),
            b.old,
            "rolled back to the old data after {point}"
        );
        assert_eq!(r["snapshot"]["keys"].as_str(), Some("80"));
        let state = files_in(&b.unit.data_dir().join(".etcd-actions"));
        assert_eq!(state, vec!["lock".to_string()], "leftovers after {point}");
    }
}
