//! `etcd-actions status` (the `backup-status` action): backup health from what the last runs
//! left in the state dir, the local target, and the installed timer. Cheap: no snapshot, no
//! store listing, no etcd request.

use std::path::Path;

use crate::config::Settings;
use crate::error::Error;
use crate::health::{age, max_age, workload_status, Health};
use crate::juju::{Reporter, Results};
use crate::manifest::{now_secs, rfc3339};

pub fn run(
    reporter: &Reporter,
    settings: &Settings,
    target: &Path,
    results: &mut Results,
) -> Result<(), Error> {
    let now = now_secs();
    let health = crate::health::state_file(settings)
        .map(|f| Health::load(&f))
        .unwrap_or_default();
    let max = max_age(reporter.is_juju());
    let (state, message) = workload_status(&health, max, now);
    results.set("status.state", state);
    results.set("status.message", &message);
    results.set("status.max-age", max.map_or("none".to_string(), age));
    let when = |at: u64| format!("{} ({} ago)", rfc3339(at), age(now.saturating_sub(at)));
    for (place, n) in &health.newest {
        let key = |k: &str| format!("newest.{place}.{k}");
        results.set(&key("id"), &n.id);
        results.set(&key("time"), when(n.at));
        results.set(&key("age-seconds"), now.saturating_sub(n.at));
        results.set(
            &key("revision"),
            n.revision.map_or("unknown".to_string(), |r| r.to_string()),
        );
        results.set(&key("bytes"), n.bytes);
        results.set(&key("encrypted"), n.encrypted);
        let verified = n
            .sha256
            .as_ref()
            .is_some_and(|s| health.verified.iter().any(|v| v == s));
        results.set(&key("verified"), verified);
    }
    if health.newest.is_empty() {
        results.set("newest", "none: no backup recorded on this unit yet");
    }
    // What the target holds now (archives by name; cheap, local).
    if target.is_absolute() {
        let dir = crate::fsutil::Dir::open(target).ok();
        let count = dir.map_or(0, |d| {
            d.names()
                .iter()
                .filter(|n| crate::catalog::is_archive_name(n))
                .count()
        });
        results.set("target.path", target.display());
        results.set("target.archives", count);
    }
    match &health.drill {
        Some(d) => {
            results.set("drill.id", &d.id);
            results.set("drill.time", when(d.at));
            results.set("drill.result", if d.passed { "passed" } else { "failed" });
            results.set("drill.seconds", format!("{:.1}", d.duration_seconds));
        }
        None => results.set("drill", "none yet (verify --deep runs one)"),
    }
    let (calendar, next) = crate::actions::schedule::installed();
    results.set(
        "schedule.on-calendar",
        calendar.as_deref().unwrap_or("none"),
    );
    results.set("schedule.next-run", next.as_deref().unwrap_or("none"));
    match target
        .is_absolute()
        .then(|| crate::actions::follow::seen(target))
        .flatten()
    {
        Some((f, running)) => {
            results.set("follow.state", if running { "running" } else { "stopped" });
            results.set("follow.cluster-id", &f.cluster_id);
            results.set("follow.durable-revision", f.through_revision);
            let through = f.through_ms / 1000;
            results.set("follow.complete-through", when(through));
            results.set(
                "follow.last-flush-lag",
                format!("{:.1}s", f.last_flush_lag_ms as f64 / 1000.0),
            );
            results.set("follow.segments-written", f.segments_written);
        }
        None => results.set(
            "follow",
            "not running here: continuous backup (the continuous-backup option, or \
             `etcd-actions follow`) has recorded no history in the target",
        ),
    }
    for (key, op) in &health.operations {
        let k = |f: &str| format!("operations.{}.{f}", key.replace('/', "-"));
        if op.last_success > 0 {
            results.set(&k("last-success"), when(op.last_success));
        }
        if op.last_failure > 0 {
            results.set(&k("last-failure"), when(op.last_failure));
        }
    }
    match &health.last_error {
        Some(e) => {
            results.set("last-error.operation", &e.operation);
            results.set("last-error.time", when(e.at));
            results.set("last-error.message", &e.message);
        }
        None => results.set("last-error", "none"),
    }
    Ok(())
}
