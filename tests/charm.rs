//! The charm as Juju gets it: `scripts/pack` builds the `.charm` zip, charmcraft (PyPI, in the
//! project's cache) lints it and expands the project, and the packed `dispatch` runs the
//! binary for a hook. Then the docs: every action param, config option, subcommand flag and
//! environment variable the source knows is in the reference.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

fn charmcraft(dir: &Path, args: &[&str]) -> std::process::Output {
    let cc = cache_dir().join("charmcraft");
    let bin = cc.join("bin/charmcraft");
    assert!(
        bin.is_file(),
        "charmcraft is not installed: run scripts/install-deps"
    );
    let runtime = tempdir();
    std::fs::set_permissions(
        runtime.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    Command::new("python3")
        .arg(bin)
        .args(args)
        .current_dir(dir)
        .env("PYTHONPATH", &cc)
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env("HOME", runtime.path())
        .output()
        .unwrap()
}

/// Packs the charm with the tests' build of the binary; returns the zip.
fn pack(dir: &Path) -> PathBuf {
    let out = dir.join("etcd_ubuntu-22.04-amd64.charm");
    let run = Command::new(repo().join("scripts/pack"))
        .env("PACK_OUT", &out)
        .env("PACK_BINARY", AGENT)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    out
}

#[test]
fn the_packed_charm_lints_clean_and_dispatch_runs_the_binary() {
    let tmp = tempdir();
    let charm = pack(tmp.path());

    let out = charmcraft(
        tmp.path(),
        &["analyse", "--format", "json", charm.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut seen = BTreeSet::new();
    for c in checks.as_array().unwrap() {
        let (name, result) = (c["name"].as_str().unwrap(), c["result"].as_str().unwrap());
        seen.insert(name.to_string());
        match name {
            // Attributes, not lints: a compiled charm has no Python language or framework.
            "language" | "framework" => assert_eq!(c["check_type"], "attribute", "{c}"),
            _ => assert!(
                result == "ok" || result == "nonapplicable",
                "charmcraft analyse: {c}"
            ),
        }
    }
    for must in ["metadata", "entrypoint", "juju-actions", "juju-config"] {
        assert!(seen.contains(must), "analyse ran `{must}`: {seen:?}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.to_lowercase().contains("warning"), "{stderr}");

    let out = charmcraft(&repo(), &["expand-extensions"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.to_lowercase().contains("warning"), "{stderr}");
    let project: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(project["type"], "charm");
    for p in [
        "ubuntu-22.04-amd64",
        "ubuntu-22.04-arm64",
        "ubuntu-24.04-amd64",
        "ubuntu-24.04-arm64",
    ] {
        assert!(!project["platforms"][p].is_null(), "platform {p}");
    }
    let metadata: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("metadata.yaml")).unwrap())
            .unwrap();
    assert!(metadata["series"].is_null(), "no series: Juju 4 rejects it");
    assert!(format!("{:?}", metadata["assumes"]).contains("juju >= 3"));

    // Unpacked as Juju unpacks it, `dispatch` runs the binary for every hook.
    let unpacked = tmp.path().join("charm");
    let listing = Command::new("python3")
        .args([
            "-c",
            "import os, stat, sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             for i in z.infolist():\n\
             \x20   p = os.path.join(sys.argv[2], i.filename)\n\
             \x20   os.makedirs(os.path.dirname(p), exist_ok=True)\n\
             \x20   mode = i.external_attr >> 16\n\
             \x20   if stat.S_ISLNK(mode):\n\
             \x20       os.symlink(z.read(i).decode(), p)\n\
             \x20   else:\n\
             \x20       open(p, 'wb').write(z.read(i)); os.chmod(p, mode & 0o777)\n\
             \x20   print(i.filename)\n",
            charm.to_str().unwrap(),
            unpacked.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(listing.status.success(), "{listing:?}");
    let files = String::from_utf8_lossy(&listing.stdout).into_owned();
    for f in [
        "dispatch",
        "bin/etcd-actions",
        "metadata.yaml",
        "actions.yaml",
        "config.yaml",
        "manifest.yaml",
        "actions/import",
        "hooks/config-changed",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} in the charm:\n{files}");
    }
    let juju = Juju::new(tmp.path(), "etcd/0");
    let path = format!(
        "{}:{}",
        juju.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = Command::new(unpacked.join("dispatch"))
        .current_dir(tmp.path())
        .env("PATH", &path)
        .env("JUJU_DISPATCH_PATH", "hooks/start")
        .env("JUJU_UNIT_NAME", "etcd/0")
        .env("JUJU_CHARM_DIR", &unpacked)
        .env("FAKE_JUJU_STATE", &juju.state)
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    let logged = std::fs::read_to_string(juju.state.join("juju-log.txt")).unwrap_or_default();
    assert!(logged.contains("start: nothing to do"), "{logged}");

    // And an action: `dispatch` with JUJU_DISPATCH_PATH=actions/<name>, on a real etcd.
    let node = Node::single(tmp.path(), "d0", &v3530());
    node.fill("/d/", 5);
    let backups = tmp.path().join("backups");
    juju.params(
        "snapshot",
        serde_json::json!({"target": backups.to_str().unwrap()}),
    );
    let run = Command::new(unpacked.join("dispatch"))
        .current_dir(tmp.path())
        .env("PATH", &path)
        .env("JUJU_DISPATCH_PATH", "actions/snapshot")
        .env("JUJU_ACTION_NAME", "snapshot")
        .env("JUJU_ACTION_UUID", "9")
        .env("JUJU_UNIT_NAME", "etcd/0")
        .env("JUJU_CHARM_DIR", &unpacked)
        .env("FAKE_JUJU_STATE", &juju.state)
        .env("ETCD_ACTIONS_ETCD_CONFIG", node.config_path())
        .env("ETCD_ACTIONS_LOCK_TIMEOUT", "60")
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
    assert_eq!(juju.failure(), None, "{run:?}");
    let r = juju.results();
    assert_eq!(r["snapshot"]["keys"].as_str(), Some("5"), "{r}");
    assert!(Path::new(r["snapshot"]["path"].as_str().unwrap()).is_file());
}

/// The `--flags` a `--help` text names.
fn flags(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .filter(|w| w.len() > 2 && w != "--help" && w != "--version")
        .collect()
}

fn help(args: &[&str]) -> String {
    let out = Command::new(AGENT).args(args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Every string literal in the sources that names an environment variable the agent reads.
fn env_vars_in_source() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut dirs = vec![repo().join("src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            for part in text.split('"').skip(1).step_by(2) {
                let known = [
                    "ETCD_ACTIONS_",
                    "ETCDCTL_",
                    "AWS_",
                    "AZURE_",
                    "GOOGLE_",
                    "JUJU_",
                ];
                if known.iter().any(|k| part.starts_with(k))
                    && part.len() > 6
                    && !part.ends_with('_')
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                {
                    found.insert(part.to_string());
                }
            }
        }
    }
    found
}

#[test]
fn the_reference_covers_every_param_option_flag_and_variable() {
    let docs = |f: &str| std::fs::read_to_string(repo().join("docs/reference").join(f)).unwrap();
    let (actions_md, config_md, cli_md, env_md) = (
        docs("actions.md"),
        docs("config.md"),
        docs("cli.md"),
        docs("env.md"),
    );
    let mut missing = Vec::new();

    let actions: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("actions.yaml")).unwrap())
            .unwrap();
    for (name, action) in actions.as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        if !actions_md.contains(&format!("`{name}`")) {
            missing.push(format!("action `{name}` in docs/reference/actions.md"));
        }
        assert_eq!(
            action["additionalProperties"].as_bool(),
            Some(false),
            "action {name}: additionalProperties: false"
        );
        for (param, schema) in action["params"].as_mapping().into_iter().flatten() {
            let param = param.as_str().unwrap();
            assert!(schema["type"].is_string(), "{name}.{param} has a type");
            if !actions_md.contains(&format!("`{param}`")) {
                missing.push(format!(
                    "param `{name}.{param}` in docs/reference/actions.md"
                ));
            }
        }
    }
    let config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("config.yaml")).unwrap())
            .unwrap();
    for (option, _) in config["options"].as_mapping().unwrap() {
        let option = option.as_str().unwrap();
        if !config_md.contains(&format!("`{option}`")) {
            missing.push(format!(
                "config option `{option}` in docs/reference/config.md"
            ));
        }
    }
    let top = help(&["--help"]);
    let commands: Vec<String> = top
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect();
    assert!(commands.len() >= 11, "{commands:?}");
    let mut vars: BTreeSet<String> = env_vars_in_source();
    for cmd in &commands {
        if !cli_md.contains(&format!("`{cmd}`")) {
            missing.push(format!("subcommand `{cmd}` in docs/reference/cli.md"));
        }
        let text = help(&[cmd, "--help"]);
        for flag in flags(&text) {
            if !cli_md.contains(&flag) {
                missing.push(format!("flag `{cmd} {flag}` in docs/reference/cli.md"));
            }
        }
        for part in text.split("[env: ").skip(1) {
            vars.insert(part.split('=').next().unwrap().to_string());
        }
    }
    assert!(
        vars.contains("ETCD_ACTIONS_S3_CHECKSUM") && vars.len() > 30,
        "{vars:?}"
    );
    for v in vars {
        if !env_md.contains(&v) {
            missing.push(format!(
                "environment variable `{v}` in docs/reference/env.md"
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "the reference lacks:\n{}",
        missing.join("\n")
    );
}
