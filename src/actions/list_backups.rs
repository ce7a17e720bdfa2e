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
