//! Named points in the code where the crash-safety tests (the `failpoints` build) make the
//! agent abort or pause; in a normal build they compile to nothing.

#[cfg(feature = "failpoints")]
use std::fs;
#[cfg(feature = "failpoints")]
use std::path::Path;

/// A named point where the `failpoints` build can be made to crash (abort, no cleanup) with
/// `FAILPOINTS=<name>=return`. Compiles to nothing otherwise.
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        let _: Option<()> = fail::eval(name, |_| std::process::abort());
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// A named point where the `failpoints` build stops for a test, to make a race window
/// deterministic: with `ETCD_ACTIONS_PAUSE=<name>:<dir>` it creates `<dir>/<name>.reached`
/// and waits (at most 120 s) until `<dir>/<name>.go` exists. Compiles to nothing otherwise.
pub fn pause_point(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        let Some(spec) = std::env::var("ETCD_ACTIONS_PAUSE").ok() else {
            return;
        };
        let Some((at, dir)) = spec.split_once(':') else {
            return;
        };
        if at != name {
            return;
        }
        let dir = Path::new(dir);
        let _ = fs::write(dir.join(format!("{name}.reached")), b"");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !dir.join(format!("{name}.go")).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
