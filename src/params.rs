//! Juju action params over command-line flags: each command's options say once, in their own
//! action's file, which params they take (`TakesParams`); `merged` applies them in Juju mode.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::error::Error;
use crate::juju::Reporter;

/// Options that a Juju action's params can set.
pub trait TakesParams {
    /// Takes the params these options know from `params`, over what the flags said.
    fn take(&mut self, params: &mut Params) -> Result<(), Error>;
}

/// `opts` with the action's params applied over them in Juju mode (unknown params refused);
/// standalone, `opts` as the flags gave them.
pub fn merged<T: TakesParams>(reporter: &Reporter, mut opts: T) -> Result<T, Error> {
    if reporter.is_juju() {
        let mut params = Params::new(reporter.params()?);
        opts.take(&mut params)?;
        params.finish()?;
    }
    Ok(opts)
}

/// Action params from `action-get --format=json`, checked by type; unknown ones are refused.
pub struct Params {
    map: Map<String, Value>,
}

impl Params {
    pub fn new(map: Map<String, Value>) -> Params {
        Params { map }
    }

    pub fn string(&mut self, key: &str) -> Result<Option<String>, Error> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Error::usage(format!(
                "param `{key}` must be a string, got `{other}`"
            ))),
        }
    }

    pub fn boolean(&mut self, key: &str) -> Result<Option<bool>, Error> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(other) => Err(Error::usage(format!(
                "param `{key}` must be true or false, got `{other}`"
            ))),
        }
    }

    /// The params that name an archive: `target`, `snapshot` and `backup-id` (empty = unset).
    pub fn archive(
        &mut self,
        target: &mut PathBuf,
        snapshot: &mut Option<PathBuf>,
        backup_id: &mut Option<String>,
    ) -> Result<(), Error> {
        if let Some(t) = self.string("target")? {
            *target = PathBuf::from(t);
        }
        if let Some(s) = self.string("snapshot")? {
            *snapshot = Some(PathBuf::from(s)).filter(|p| !p.as_os_str().is_empty());
        }
        if let Some(s) = self.string("backup-id")? {
            *backup_id = Some(s).filter(|s| !s.is_empty());
        }
        Ok(())
    }

    pub fn integer(&mut self, key: &str) -> Result<Option<i64>, Error> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
            Some(Value::String(s)) if s.trim().parse::<i64>().is_ok() => {
                Ok(s.trim().parse::<i64>().ok())
            }
            Some(other) => Err(Error::usage(format!(
                "param `{key}` must be a whole number, got `{other}`"
            ))),
        }
    }

    pub fn finish(self) -> Result<(), Error> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(Error::usage(format!(
                "unknown param `{k}`; see `juju actions --schema` for the params this action takes"
            ))),
        }
    }
}
