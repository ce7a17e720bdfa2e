//! The fake hook tools themselves behave as juju-contract.md says, so a test that passes
//! against them says something about real Juju.

use std::process::Command;

use crate::util::*;

fn tool(juju: &Juju, name: &str, args: &[&str]) -> std::process::Output {
    Command::new(juju.bin.join(name))
        .args(args)
        .env("FAKE_JUJU_STATE", &juju.state)
        .env("JUJU_ACTION_NAME", "snapshot")
        .output()
        .unwrap()
}

#[test]
fn action_set_rejects_what_juju_rejects_and_stores_nothing() {
    let tmp = tempdir();
    let juju = Juju::new(tmp.path(), "etcd/0");
    for bad in [
        "Foo=1",
        "foo-=1",
        "-foo=1",
        "foo..bar=1",
        ".foo=1",
        "foo.=1",
        "=1",
        "a.stderr=1",
        "stdout=x",
        "novalue",
    ] {
        let out = tool(&juju, "action-set", &["good=1", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("ERROR "),
            "{bad}"
        );
        assert_eq!(
            juju.results(),
            serde_json::json!({}),
            "nothing stored for {bad}"
        );
    }
    let out = tool(&juju, "action-set", &["a.b=c=d", "x="]);
    assert!(out.status.success());
    assert_eq!(
        juju.results(),
        serde_json::json!({"a": {"b": "c=d"}, "x": ""})
    );
    tool(&juju, "action-set", &["a=flat"]);
    assert_eq!(juju.results()["a"], "flat", "last write wins");
}

#[test]
fn action_fail_does_not_stop_and_action_get_formats() {
    let tmp = tempdir();
    let juju = Juju::new(tmp.path(), "etcd/0");
    juju.params("restore", serde_json::json!({}));
    let out = tool(&juju, "action-fail", &["boom"]);
    assert!(out.status.success());
    assert_eq!(juju.failure().as_deref(), Some("boom"));
    assert_eq!(
        tool(&juju, "action-fail", &["a", "b"]).status.code(),
        Some(2)
    );
    let out = tool(&juju, "action-get", &["skip-backup"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "False\n");
    let out = tool(&juju, "action-get", &["--format=json", "skip-backup"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "false\n");
    let out = tool(&juju, "action-get", &["sha256"]);
    assert_eq!(out.stdout, b"", "empty string prints nothing");
    let out = tool(&juju, "action-get", &["--format=json", "missing"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "null\n");
    let out = Command::new(juju.bin.join("action-get"))
        .env("FAKE_JUJU_STATE", &juju.state)
        .env_remove("JUJU_ACTION_NAME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = tool(&juju, "resource-get", &["snapshot"]);
    assert_eq!(out.status.code(), Some(1));
    juju.attach_bytes("snapshot", b"x");
    let out = tool(&juju, "resource-get", &["snapshot"]);
    assert!(out.status.success());
    assert!(
        !out.stdout.ends_with(b"\n"),
        "resource-get prints no newline"
    );
    juju.peers(&["etcd/1"]);
    let out = tool(
        &juju,
        "relation-list",
        &["--format=json", "-r", "cluster:0"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[\"etcd/1\"]\n");
    assert_eq!(tool(&juju, "relation-list", &[]).status.code(), Some(2));
    assert_eq!(tool(&juju, "action-log", &[]).status.code(), Some(2));
}

/// The charm's YAML files parse, and every action has a link to the binary.
#[test]
fn charm_files_are_valid() {
    for f in ["actions.yaml", "metadata.yaml", "config.yaml"] {
        let text = std::fs::read_to_string(repo().join(f)).unwrap();
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(doc.is_mapping(), "{f}");
    }
    let actions: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(repo().join("actions.yaml")).unwrap())
            .unwrap();
    for name in actions.as_mapping().unwrap().keys() {
        let link = repo().join("actions").join(name.as_str().unwrap());
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            std::path::PathBuf::from("../target/release/etcd-actions"),
            "{}",
            link.display()
        );
    }
    for hook in [
        "s3-credentials-relation-joined",
        "s3-credentials-relation-changed",
        "config-changed",
    ] {
        assert!(
            std::fs::read_link(repo().join("hooks").join(hook)).is_ok(),
            "{hook}"
        );
    }
}
