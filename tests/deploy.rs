//! The deployment files (`deploy/`), checked without a cluster: every
//! Kubernetes document parses and has what the API server and the kubelet
//! need (names, namespaces that exist, selectors that select, named ports
//! that resolve, mounted ConfigMaps that exist), the bus pods have their
//! probes and the apps their preStop on `/safe-to-delete`, and every bus
//! config in a ConfigMap is a valid node config once the pod's environment
//! is substituted (the environment variables it uses are all set on the
//! container).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use libatbus::node::{DiscoveryFile, NodeFile};
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every document of every manifest, with the file it came from.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("k8s"))
        .expect("deploy/k8s")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "manifests: {files:?}");
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        for document in yaml_serde::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    docs
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn labels(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The bus configs of the ConfigMaps: (namespace, key) → text.
fn bus_configs(docs: &[(String, Value)]) -> BTreeMap<(String, String), String> {
    let mut configs = BTreeMap::new();
    for (_, doc) in docs {
        if str_at(doc, &["kind"]) != Some("ConfigMap") {
            continue;
        }
        let namespace = str_at(doc, &["metadata", "namespace"]).unwrap_or_default();
        let name = str_at(doc, &["metadata", "name"]).unwrap_or_default();
        for (key, text) in at(doc, &["data"]).and_then(Value::as_object).into_iter().flatten() {
            configs.insert(
                (namespace.to_string(), format!("{name}/{key}")),
                text.as_str().unwrap_or_default().to_string(),
            );
        }
    }
    configs
}

#[test]
fn every_document_names_what_it_needs() {
    let docs = documents();
    let namespaces: BTreeSet<&str> = docs
        .iter()
        .filter(|(_, d)| str_at(d, &["kind"]) == Some("Namespace"))
        .filter_map(|(_, d)| str_at(d, &["metadata", "name"]))
        .collect();
    let mut seen = BTreeSet::new();
    for (file, doc) in &docs {
        let kind = str_at(doc, &["kind"]).unwrap_or_else(|| panic!("{file}: a document without kind"));
        assert!(
            str_at(doc, &["apiVersion"]).is_some(),
            "{file}: {kind} without apiVersion"
        );
        let name = str_at(doc, &["metadata", "name"]).unwrap_or_else(|| panic!("{file}: {kind} without a name"));
        assert!(dns_label(name), "{file}: {kind} {name:?} is not a DNS label");
        if kind != "Namespace" {
            let namespace = str_at(doc, &["metadata", "namespace"])
                .unwrap_or_else(|| panic!("{file}: {kind} {name} has no namespace"));
            assert!(
                namespaces.contains(namespace),
                "{file}: {kind} {name}: namespace {namespace} is not created by the manifests"
            );
            assert!(
                seen.insert((kind, namespace, name)),
                "{file}: {kind} {namespace}/{name} defined twice"
            );
        }
    }
    for ns in ["ns-1", "ns-2", "atbus-system"] {
        assert!(namespaces.contains(ns), "namespace {ns} missing");
    }
}

/// One container of a workload, with what the checks need.
struct Container<'a> {
    file: &'a str,
    workload: String,
    namespace: String,
    kind: String,
    pod: &'a Value,
    spec: &'a Value,
}

fn containers(docs: &[(String, Value)]) -> Vec<Container<'_>> {
    let mut out = Vec::new();
    for (file, doc) in docs {
        let kind = str_at(doc, &["kind"]).unwrap_or_default();
        if kind != "Deployment" && kind != "StatefulSet" {
            continue;
        }
        let name = str_at(doc, &["metadata", "name"]).unwrap_or_default();
        let namespace = str_at(doc, &["metadata", "namespace"]).unwrap_or_default();
        let selector = labels(at(doc, &["spec", "selector", "matchLabels"]));
        let template = labels(at(doc, &["spec", "template", "metadata", "labels"]));
        assert!(!selector.is_empty(), "{file}: {kind} {name} selects nothing");
        for (k, v) in &selector {
            assert_eq!(
                template.get(k),
                Some(v),
                "{file}: {kind} {name}: selector {k}={v} not on its pods"
            );
        }
        let pod = at(doc, &["spec", "template", "spec"]).unwrap_or_else(|| panic!("{file}: {name} has no pod spec"));
        let list = pod
            .get("containers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        assert!(!list.is_empty(), "{file}: {kind} {name} has no containers");
        for index in 0..list.len() {
            let spec = &pod["containers"][index];
            assert!(
                str_at(spec, &["name"]).is_some_and(dns_label),
                "{file}: {name}: container name"
            );
            assert!(
                str_at(spec, &["image"]).is_some(),
                "{file}: {name}: container without image"
            );
            out.push(Container {
                file,
                workload: name.to_string(),
                namespace: namespace.to_string(),
                kind: kind.to_string(),
                pod,
                spec,
            });
        }
    }
    out
}

/// The container port a probe or Service names (by name or number).
fn resolve_port(container: &Value, port: &Value) -> Option<u64> {
    if let Some(number) = port.as_u64() {
        return Some(number);
    }
    let name = port.as_str()?;
    container.get("ports")?.as_array()?.iter().find_map(|p| {
        (p.get("name")?.as_str()? == name)
            .then(|| p.get("containerPort")?.as_u64())
            .flatten()
    })
}

#[test]
fn bus_pods_have_probes_prestop_config_and_environment() {
    let docs = documents();
    let configs = bus_configs(&docs);
    let mut bus_pods = 0;
    for c in containers(&docs) {
        let command: Vec<&str> = c
            .spec
            .get("command")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let Some(config_path) = command
            .iter()
            .position(|a| *a == "--config")
            .and_then(|i| command.get(i + 1))
        else {
            continue; // not a bus container (etcd)
        };
        bus_pods += 1;
        let what = format!("{}: {} {}/{}", c.file, c.kind, c.namespace, c.workload);
        // The config file comes from a mounted ConfigMap of this namespace.
        let mount = c.spec["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap_or("?")))
            .unwrap_or_else(|| panic!("{what}: {config_path} is on no volume"));
        let volume = c.pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{what}: volume {} not defined", mount["name"]));
        let map = str_at(volume, &["configMap", "name"]).unwrap_or_else(|| panic!("{what}: not a ConfigMap volume"));
        let key = config_path.rsplit('/').next().unwrap_or_default();
        let text = configs
            .get(&(c.namespace.clone(), format!("{map}/{key}")))
            .unwrap_or_else(|| panic!("{what}: ConfigMap {map} has no {key}"));
        // Every ${VAR} it uses is set on the container.
        let env: BTreeSet<&str> = c.spec["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str())
            .collect();
        let fake = |name: &str| -> Option<String> {
            env.contains(name).then(|| match name {
                "POD_NAME" => format!("{}-0", c.workload),
                "POD_NAMESPACE" => c.namespace.clone(),
                "POD_IP" => "10.0.0.7".to_string(),
                _ => "a-secret-value".to_string(),
            })
        };
        let file = NodeFile::parse_with_env(text, fake).unwrap_or_else(|e| panic!("{what}: {key}: {e}"));
        // It is a valid node config (checked with the embedded discovery:
        // nothing connects to etcd here).
        if let DiscoveryFile::Etcd { endpoints, .. } = &file.discovery {
            assert!(
                endpoints.iter().all(|e| e.contains("etcd.atbus-system.svc")),
                "{what}: etcd endpoints {endpoints:?} are not the etcd Service"
            );
        } else {
            panic!("{what}: the example's nodes use etcd discovery");
        }
        let admin = file
            .admin
            .clone()
            .unwrap_or_else(|| panic!("{what}: no admin endpoint"));
        let checked = NodeFile {
            discovery: DiscoveryFile::Embedded,
            ..file
        };
        let config = checked
            .into_config(Path::new("."))
            .unwrap_or_else(|e| panic!("{what}: {key} is not a valid node config: {e}"));
        assert!(
            config.name.ends_with(&format!(".{}", c.namespace)),
            "{what}: name {}",
            config.name
        );
        let admin_port: u64 = admin
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("admin port");
        // Probes on the admin endpoint.
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &c.spec[probe]["httpGet"];
            assert_eq!(get["path"], path, "{what}: {probe}");
            assert_eq!(
                resolve_port(c.spec, &get["port"]),
                Some(admin_port),
                "{what}: {probe} port"
            );
        }
        // io_uring must be allowed.
        assert_eq!(
            str_at(c.pod, &["securityContext", "seccompProfile", "type"]),
            Some("Unconfined"),
            "{what}: io_uring needs a seccomp profile that allows it"
        );
        if c.kind == "StatefulSet" {
            let hook = c.spec["lifecycle"]["preStop"]["exec"]["command"].to_string();
            assert!(
                hook.contains(&format!("127.0.0.1:{admin_port}/safe-to-delete")),
                "{what}: preStop does not wait on /safe-to-delete: {hook}"
            );
            let grace = c.pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
            assert!(grace >= 30, "{what}: {grace} s grace is too short to drain");
        }
    }
    assert!(bus_pods >= 4, "relays and apps in two namespaces: {bus_pods}");
}

#[test]
fn services_select_pods_and_ports_that_exist() {
    let docs = documents();
    let containers = containers(&docs);
    let mut services = 0;
    for (file, doc) in &docs {
        if str_at(doc, &["kind"]) != Some("Service") {
            continue;
        }
        services += 1;
        let name = str_at(doc, &["metadata", "name"]).unwrap_or_default();
        let namespace = str_at(doc, &["metadata", "namespace"]).unwrap_or_default();
        let selector = labels(at(doc, &["spec", "selector"]));
        let selected: Vec<&Container> = containers
            .iter()
            .filter(|c| c.namespace == namespace)
            .filter(|c| {
                let template = docs
                    .iter()
                    .find(|(_, d)| {
                        str_at(d, &["metadata", "name"]) == Some(c.workload.as_str())
                            && str_at(d, &["metadata", "namespace"]) == Some(namespace)
                            && str_at(d, &["kind"]) == Some(c.kind.as_str())
                    })
                    .map(|(_, d)| labels(at(d, &["spec", "template", "metadata", "labels"])))
                    .unwrap_or_default();
                !selector.is_empty() && selector.iter().all(|(k, v)| template.get(k) == Some(v))
            })
            .collect();
        assert!(
            !selected.is_empty(),
            "{file}: Service {namespace}/{name} selects no pods"
        );
        for port in at(doc, &["spec", "ports"])
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let target = port.get("targetPort").unwrap_or(&port["port"]);
            assert!(
                selected.iter().any(|c| resolve_port(c.spec, target).is_some()),
                "{file}: Service {namespace}/{name}: target port {target} is on none of its pods"
            );
        }
    }
    assert!(services >= 5, "{services} services");
    // StatefulSets name a governing Service that exists.
    for (file, doc) in &docs {
        if str_at(doc, &["kind"]) == Some("StatefulSet") {
            let service = str_at(doc, &["spec", "serviceName"]).unwrap_or_else(|| panic!("{file}: serviceName"));
            let namespace = str_at(doc, &["metadata", "namespace"]);
            assert!(
                docs.iter().any(|(_, d)| str_at(d, &["kind"]) == Some("Service")
                    && str_at(d, &["metadata", "name"]) == Some(service)
                    && str_at(d, &["metadata", "namespace"]) == namespace),
                "{file}: StatefulSet's Service {service} missing"
            );
        }
    }
}

#[test]
fn the_image_builds_both_binaries_and_the_readme_says_how_to_deploy() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("deploy/Dockerfile");
    for needed in ["--bin atbus ", "--bin atbus-relay", "protobuf-compiler", "curl"] {
        assert!(dockerfile.contains(needed), "Dockerfile lacks {needed:?}");
    }
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README");
    for needed in [
        "docker build -f deploy/Dockerfile",
        "kubectl apply -f deploy/k8s/",
        "create secret generic atbus-token",
    ] {
        assert!(readme.contains(needed), "README does not explain: {needed}");
    }
}
