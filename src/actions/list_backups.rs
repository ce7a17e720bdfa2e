//! The `list-backups` action: the archives in `target` and in the object store, newest first,
//! with where each one is.

use std::path::Path;

use std::path::PathBuf;

use super::Unit;
use crate::catalog;
use crate::error::{human_size, Error};
use crate::juju::Results;
use crate::params::{Params, TakesParams};

/// What list-backups lists: the target directory (and the store, when there is one).
#[derive(Debug, Clone)]
pub struct ListOptions {
    pub target: PathBuf,
}

impl From<crate::cli::ListArgs> for ListOptions {
    fn from(a: crate::cli::ListArgs) -> ListOptions {
        ListOptions { target: a.target }
    }
}

impl TakesParams for ListOptions {
    fn take(&mut self, params: &mut Params) -> Result<(), Error> {
        if let Some(t) = params.string("target")? {
            self.target = PathBuf::from(t);
        }
        Ok(())
    }
}

pub fn run(unit: &Unit<'_>, target: &Path, results: &mut Results) -> Result<(), Error> {
    if !target.is_absolute() {
        return Err(Error::Target {
            path: target.to_path_buf(),
            problem: "is relative; give the absolute directory the archives are in".into(),
        });
    }
    let store = unit.store()?;
    let entries = catalog::list(unit, target, store.as_ref())?;
    let mut table = vec![format!(
        "{:<45} {:<20} {:>12} {:>8} {:<6} sha256",
        "backup-id", "time", "revision", "size", "where"
    )];
    for (i, e) in entries.iter().enumerate() {
        let key = |k: &str| format!("backups.{i}.{k}");
        results.set(&key("id"), &e.id);
        results.set(&key("time"), &e.time);
        results.set(
            &key("revision"),
            e.revision.map_or("unknown".to_string(), |r| r.to_string()),
        );
        results.set(&key("size"), human_size(e.size));
        results.set(&key("bytes"), e.size);
        results.set(&key("sha256"), e.sha256.as_deref().unwrap_or("unknown"));
        results.set(&key("where"), e.place());
        if e.encrypted {
            results.set(&key("encryption"), "age");
        }
        if e.incomplete {
            results.set(
                &key("incomplete"),
                "an upload that never finished (no record beside it): not a backup to restore; \
                 prune removes it after 24 h",
            );
        }
        if let Some(p) = &e.path {
            results.set(&key("path"), p.display());
        }
        if let Some(u) = &e.url {
            results.set(&key("url"), u);
        }
        table.push(format!(
            "{:<45} {:<20} {:>12} {:>8} {:<6} {}",
            e.id,
            e.time,
            e.revision.map_or("?".to_string(), |r| r.to_string()),
            human_size(e.size),
            if e.incomplete {
                "INCOMPLETE"
            } else {
                e.place()
            },
            e.sha256.as_deref().map_or("?", |s| &s[..s.len().min(12)])
        ));
    }
    results.set("count", entries.len());
    // The change history `follow` records: what a restore to a point can reach.
    let folder = store.as_ref().map(|s| unit.store_folder(s));
    let histories = crate::history::list(
        target,
        store.as_ref().zip(folder.as_deref()),
        &crate::history::unit_tag(&unit.name()),
    )?;
    for (i, h) in histories.iter().enumerate() {
        let key = |k: &str| format!("history.{i}.{k}");
        let (spans, gaps) = h.spans();
        results.set(&key("cluster-id"), &h.cluster_id);
        results.set(&key("segments"), h.segments.len());
        results.set(
            &key("bytes"),
            h.segments.iter().map(|f| f.size).sum::<u64>(),
        );
        let (local, stored) = (
            h.segments.iter().filter(|f| f.path.is_some()).count(),
            h.segments.iter().filter(|f| f.key.is_some()).count(),
        );
        results.set(
            &key("where"),
            format!("{local} local, {stored} in the store"),
        );
        let shown: Vec<String> = spans
            .iter()
            .map(|s| {
                format!(
                    "{}–{} ({} – {})",
                    s.from,
                    s.to,
                    crate::replay::show_ms(s.from_ms),
                    crate::replay::show_ms(s.to_ms)
                )
            })
            .collect();
        results.set(&key("revisions"), shown.join("; "));
        results.set(
            &key("gaps"),
            if gaps.is_empty() {
                "none".to_string()
            } else {
                gaps.iter()
                    .map(|(a, b)| format!("{a}–{b}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        );
        table.push(format!(
            "history of cluster {}: revisions {}; gaps: {}",
            h.cluster_id,
            if shown.is_empty() {
                "none".into()
            } else {
                shown.join("; ")
            },
            if gaps.is_empty() {
                "none".to_string()
            } else {
                format!("{gaps:?}")
            }
        ));
    }
    results.set("table", table.join("\n"));
    results.set(
        "store",
        store
            .as_ref()
            .map_or("none (archives are local only)".to_string(), |s| {
                format!("{} under `{}/`", s.cfg.describe(), unit.store_folder(s))
            }),
    );
    Ok(())
}
