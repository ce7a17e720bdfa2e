//! Standalone on the machines people run etcd on: etcdctl-style connection settings with no
//! config file, and a kubeadm static-pod manifest in place of etcd's YAML config.

use std::fs;
use std::path::Path;

use crate::util::*;

fn tls_file(node: &Node, name: &str) -> String {
    node.tls.as_ref().unwrap().join(name).display().to_string()
}

#[track_caller]
fn assert_is_snapshot_of(node: &Node, out: &serde_yaml::Value) {
    let path = Path::new(out["snapshot"]["path"].as_str().unwrap());
    assert_sidecar_ok(path);
    assert_eq!(
        out["snapshot"]["revision"].as_str().unwrap(),
        node.revision().to_string()
    );
}

#[test]
fn etcdctl_style_settings_need_no_config_file() {
    let tmp = tempdir();
    let node = single_tls(tmp.path(), "unit", &v35());
    node.fill("k/", 20);
    let target = tmp.path().join("snaps");
    let t = target.to_str().unwrap();
    let no_config =
        |agent: Agent| agent.env("ETCD_ACTIONS_ETCD_CONFIG", "/nonexistent/etcd.conf.yml");

    // Flags, as etcdctl takes them; no scheme + TLS files means https.
    let hostport = format!("127.0.0.1:{}", node.client);
    let flags = [
        "--endpoints",
        hostport.as_str(),
        "--cacert",
        &tls_file(&node, "ca.crt"),
        "--cert",
        &tls_file(&node, "client.crt"),
        "--key",
        &tls_file(&node, "client.key"),
    ]
    .map(str::to_string);
    let mut args: Vec<&str> = vec!["snapshot", "--target", t];
    args.extend(flags.iter().map(String::as_str));
    let out = no_config(Agent::standalone(&node, &args).env("ETCD_ACTIONS_ETCDCTL", NO_ETCDCTL))
        .run()
        .success();
    assert_is_snapshot_of(&node, &out);

    // The same from etcdctl's environment variables.
    let out = no_config(Agent::snapshot(&node, t))
        .env("ETCDCTL_ENDPOINTS", node.endpoint())
        .env("ETCDCTL_CACERT", tls_file(&node, "ca.crt"))
        .env("ETCDCTL_CERT", tls_file(&node, "client.crt"))
        .env("ETCDCTL_KEY", tls_file(&node, "client.key"))
        .run()
        .success();
    assert_is_snapshot_of(&node, &out);

    // Without the client certificate etcd refuses, and the message says where and why.
    let msg = no_config(Agent::snapshot(&node, t))
        .env("ETCDCTL_ENDPOINTS", node.endpoint())
        .env("ETCDCTL_CACERT", tls_file(&node, "ca.crt"))
        .run()
        .failure();
    assert!(msg.contains(&node.endpoint()), "{msg}");

    // One member only.
    let two = format!("{},{}", node.endpoint(), node.endpoint());
    let msg = no_config(Agent::snapshot(&node, t))
        .env("ETCDCTL_ENDPOINTS", &two)
        .run()
        .failure();
    assert!(msg.contains("exactly one endpoint"), "{msg}");

    // A restore needs etcd's data dir: a connection alone is refused, changing nothing.
    let archive = out["snapshot"]["path"].as_str().unwrap().to_string();
    let before = node.dump();
    let msg = no_config(Agent::restore(&node, &archive, &["--skip-backup"]))
        .env("ETCDCTL_ENDPOINTS", node.endpoint())
        .run()
        .failure();
    assert!(msg.contains("--endpoints alone"), "{msg}");
    assert_eq!(node.dump(), before);
}

/// A kubeadm manifest written by the test, pointing at a real etcd started outside any
/// Kubernetes: snapshot uses its TLS files as a client, restore its data dir, name and peer
/// URL with the operator's stop/start commands.
#[test]
fn a_kubeadm_static_pod_manifest_is_a_config() {
    let tmp = tempdir();
    let node = single_tls(tmp.path(), "cp-1", &v35());
    node.fill("registry/", 30);
    let manifest = tmp.path().join("etcd.yaml");
    let d = node.tls.as_ref().unwrap().display().to_string();
    fs::write(
        &manifest,
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  annotations:
    kubeadm.kubernetes.io/etcd.advertise-client-urls: {client}
  labels:
    component: etcd
    tier: control-plane
  name: etcd
  namespace: kube-system
spec:
  containers:
  - command:
    - etcd
    - --advertise-client-urls={client}
    - --cert-file={d}/server.crt
    - --client-cert-auth=true
    - --data-dir={data}
    - --experimental-initial-corrupt-check=true
    - --initial-advertise-peer-urls={peer}
    - --initial-cluster=cp-1={peer}
    - --key-file={d}/server.key
    - --listen-client-urls={client}
    - --listen-metrics-urls=http://127.0.0.1:2381
    - --listen-peer-urls={peer}
    - --name=cp-1
    - --peer-cert-file={d}/server.crt
    - --peer-client-cert-auth=true
    - --peer-key-file={d}/server.key
    - --peer-trusted-ca-file={d}/ca.crt
    - --snapshot-count=10000
    - --trusted-ca-file={d}/ca.crt
    image: registry.k8s.io/etcd:3.5.1-0
    name: etcd
    volumeMounts:
    - mountPath: /var/lib/etcd
      name: etcd-data
  hostNetwork: true
  priorityClassName: system-node-critical
  volumes:
  - hostPath:
      path: {data}
      type: DirectoryOrCreate
    name: etcd-data
status: {{}}
"#,
            client = node.endpoint(),
            peer = node.peer_url(),
            data = node.data_dir().display(),
        ),
    )
    .unwrap();
    let with_manifest = |agent: Agent| agent.env("ETCD_ACTIONS_ETCD_CONFIG", &manifest);
    let target = tmp.path().join("snaps");
    let out = with_manifest(Agent::snapshot(&node, target.to_str().unwrap()))
        .run()
        .success();
    assert_is_snapshot_of(&node, &out);
    let archive = out["snapshot"]["path"].as_str().unwrap().to_string();
    let want = node.dump();
    let old_cluster = node.cluster_id();

    node.fill("later/", 5);
    with_manifest(Agent::restore(&node, &archive, &["--skip-backup"]))
        .run()
        .success();
    assert_eq!(node.dump(), want);
    assert_ne!(node.cluster_id(), old_cluster, "a new cluster");
    assert_eq!(node.member_names(), vec!["cp-1".to_string()]);
}
