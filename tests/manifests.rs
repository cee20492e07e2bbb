//! The Kubernetes manifests: `kubectl kustomize deploy/kustomize` renders,
//! the objects have the structure the operator guide describes, and the
//! cloud's ConfigMap is a configuration the real binary accepts. Needs
//! `kubectl` (scripts/test.sh installs Debian's kubernetes-client).

mod process;

use std::collections::BTreeSet;

use anyhow::{Context, ensure};
use process::BIN;
use serde_json::Value;

/// `kubectl kustomize <dir>` (relative to the repository root), parsed.
async fn render(dir: &str) -> anyhow::Result<Vec<Value>> {
    let path = format!("{}/{dir}", env!("CARGO_MANIFEST_DIR"));
    let (ok, out, err) = process::run(&["kubectl", "kustomize", &path])
        .await
        .context("running kubectl (scripts/test.sh installs Debian's kubernetes-client)")?;
    ensure!(ok, "kubectl kustomize {dir} failed: {err}");
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&out).context("parsing the rendered YAML")?;
    ensure!(!docs.is_empty(), "kubectl kustomize {dir} rendered nothing");
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The rule of `role` for `resource`, as (api group, verbs).
fn rule<'a>(role: &'a Value, resource: &str) -> (&'a str, Vec<&'a str>) {
    let r = role["rules"]
        .as_array()
        .and_then(|rules| {
            rules
                .iter()
                .find(|r| strs(&r["resources"]).contains(&resource))
        })
        .unwrap_or_else(|| panic!("no rule for {resource} in {}", role["metadata"]["name"]));
    (strs(&r["apiGroups"])[0], strs(&r["verbs"]))
}

fn env_field_ref<'a>(container: &'a Value, name: &str) -> &'a str {
    container["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == name))
        .and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
        .unwrap_or_else(|| panic!("no env {name} from a fieldRef"))
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a str {
    container["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == name))
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no env {name} with a value"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kustomize_renders_the_cluster_deployment() {
    let docs = render("deploy/kustomize").await.unwrap();

    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {kinds:?}");
    }
    for d in &docs {
        let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
        if !cluster_scoped.contains(&d["kind"].as_str().unwrap()) {
            assert_eq!(d["metadata"]["namespace"], "tether", "{}", d["metadata"]);
        }
    }

    // RBAC.
    let cr = find(&docs, "ClusterRole", "tether-cloud");
    assert_eq!(rule(cr, "nodes"), ("", vec!["get"]));
    assert_eq!(rule(cr, "nodes/status"), ("", vec!["patch"]));
    assert_eq!(rule(cr, "pods"), ("", vec!["list", "watch"]));
    let role = find(&docs, "Role", "tether-cloud");
    // Leases are also deleted: a replica removes its records on shutdown.
    for (resource, group, want) in [
        (
            "configmaps",
            "",
            &["create", "get", "list", "update", "watch"][..],
        ),
        (
            "leases",
            "coordination.k8s.io",
            &["create", "delete", "get", "list", "update", "watch"][..],
        ),
    ] {
        let (g, mut verbs) = rule(role, resource);
        verbs.sort_unstable();
        assert_eq!(g, group);
        assert_eq!(verbs, want, "{resource}");
    }
    let (_, verbs) = rule(find(&docs, "Role", "tether-iptables-manager"), "configmaps");
    assert_eq!(verbs, ["get", "list", "watch"]);
    for (kind, name, role_kind) in [
        ("ClusterRoleBinding", "tether-cloud", "ClusterRole"),
        ("RoleBinding", "tether-cloud", "Role"),
        ("RoleBinding", "tether-iptables-manager", "Role"),
    ] {
        let b = find(&docs, kind, name);
        assert_eq!(b["roleRef"]["kind"], role_kind);
        assert_eq!(b["roleRef"]["name"], name);
        assert_eq!(b["subjects"][0]["kind"], "ServiceAccount");
        assert_eq!(b["subjects"][0]["name"], name);
        assert_eq!(b["subjects"][0]["namespace"], "tether");
        find(&docs, "ServiceAccount", name);
    }

    // The cloud Deployment.
    let dep = find(&docs, "Deployment", "tether-cloud");
    assert_eq!(dep["spec"]["replicas"], 2);
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tether-cloud");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let anti = &pod["affinity"]["podAntiAffinity"];
    assert_eq!(
        anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/tether-dev/tether:0.1.0");
    assert_eq!(strs(&c["command"]), ["tether"]);
    let args = strs(&c["args"]);
    assert_eq!(args[0], "cloud");
    assert!(args.contains(&"--cluster"), "{args:?}");
    assert!(
        args.windows(2)
            .any(|w| w == ["--config", "/etc/tether/cloud.yaml"])
    );
    assert_eq!(env_field_ref(c, "TETHER_NAMESPACE"), "metadata.namespace");
    assert_eq!(env_field_ref(c, "TETHER_REPLICA_ID"), "metadata.name");
    assert_eq!(env_field_ref(c, "TETHER_ADVERTISE_ADDRESS"), "status.podIP");
    assert_eq!(env_value(c, "TETHER_LOG_FORMAT"), "json");
    let ports: BTreeSet<(&str, u64)> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    for p in [
        ("bootstrap", 10002),
        ("front", 10003),
        ("tunnel", 10004),
        ("admin", 10005),
    ] {
        assert!(ports.contains(&p), "{p:?} not in {ports:?}");
    }
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());
    let volumes = pod["volumes"].as_array().unwrap();
    let secret = |name: &str| volumes.iter().any(|v| v["secret"]["secretName"] == name);
    assert!(secret("tether-cloud-state") && secret("tether-front"));

    // Its configuration: the ConfigMap the volume names (with kustomize's
    // hash suffix) holds a file the real binary accepts, with the container's
    // own arguments and environment.
    let cm_name = volumes
        .iter()
        .find_map(|v| {
            v["configMap"]["name"]
                .as_str()
                .filter(|n| n.starts_with("tether-cloud-config"))
        })
        .expect("config volume");
    let cloud_yaml = find(&docs, "ConfigMap", cm_name)["data"]["cloud.yaml"]
        .as_str()
        .expect("cloud.yaml in the ConfigMap");
    let dir = std::env::temp_dir().join(format!("tether-manifests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = process::write(&dir, "cloud.yaml", cloud_yaml).unwrap();
    // `--cluster` comes with cluster mode; until the binary has it, check the rest.
    let help = process::ok(&[BIN, "cloud", "--help"]).await.unwrap();
    let mut cmd = tokio::process::Command::new(BIN);
    for a in &args {
        match *a {
            "/etc/tether/cloud.yaml" => cmd.arg(&cfg),
            "--cluster" if !help.contains("--cluster") => &mut cmd,
            a => cmd.arg(a),
        };
    }
    let out = cmd
        .arg("--check-config")
        .env("TETHER_NAMESPACE", "tether")
        .env("TETHER_REPLICA_ID", "tether-cloud-5d8f7c9b4-x2x7q")
        .env("TETHER_ADVERTISE_ADDRESS", "10.20.253.88")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the rendered cloud.yaml is refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK");
    let _ = std::fs::remove_dir_all(&dir);

    // Services: edges dial NodePorts like KubeSphere's 30000-30004.
    let svc = find(&docs, "Service", "tether-cloud");
    assert_eq!(svc["spec"]["type"], "NodePort");
    let node_ports: Vec<(u64, u64)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_u64().unwrap(), p["nodePort"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        node_ports,
        [
            (10000, 30000),
            (10002, 30002),
            (10003, 30003),
            (10004, 30004)
        ]
    );
    let front = find(&docs, "Service", "tether-front");
    assert_eq!(front["spec"]["type"], "ClusterIP");
    assert_eq!(front["spec"]["ports"][0]["port"], 10003);
    assert_eq!(
        find(&docs, "Service", "tether-cloud-admin")["spec"]["clusterIP"],
        "None"
    );

    // Item 2 of the hardening issue: the plain-HTTP admin port (probes,
    // metrics, hub API) is never open to every pod. Each ingress rule that
    // admits it names its sources, and none of them is "any namespace".
    let policy = find(&docs, "NetworkPolicy", "tether-cloud");
    let admin_rules: Vec<&Value> = policy["spec"]["ingress"]
        .as_array()
        .expect("ingress rules")
        .iter()
        .filter(|r| {
            r["ports"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["port"] == 10005))
        })
        .collect();
    assert!(!admin_rules.is_empty(), "no rule for the admin port");
    for r in admin_rules {
        let from = r["from"]
            .as_array()
            .expect("admin port rule without `from`");
        assert!(!from.is_empty(), "admin port open to all: {r}");
        for peer in from {
            assert!(
                peer.get("namespaceSelector").is_none()
                    || peer["namespaceSelector"]
                        .as_object()
                        .is_some_and(|o| !o.is_empty()),
                "admin port open to every namespace: {peer}"
            );
            assert!(
                peer.get("ipBlock").is_none(),
                "admin port open to an ipBlock: {peer}"
            );
        }
    }

    let pdb = find(&docs, "PodDisruptionBudget", "tether-cloud");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        dep["spec"]["selector"]["matchLabels"]
    );

    // iptables-manager on the control-plane hosts.
    let ds = find(&docs, "DaemonSet", "tether-iptables-manager");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "tether-iptables-manager");
    assert_eq!(
        env_value(&pod["containers"][0], "TETHER_LOG_FORMAT"),
        "json"
    );
    assert!(pod["nodeSelector"]["node-role.kubernetes.io/control-plane"].is_string());
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "node-role.kubernetes.io/control-plane")
    );
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/tether-dev/tether:0.1.0");
    let args = strs(&c["args"]);
    assert_eq!(
        args,
        [
            "iptables-manager",
            "--records",
            "configmap://tether/tunnelport"
        ]
    );
    let caps = strs(&c["securityContext"]["capabilities"]["add"]);
    assert!(
        caps.contains(&"NET_ADMIN") && caps.contains(&"NET_RAW"),
        "{caps:?}"
    );
    assert_eq!(strs(&c["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], 10007, "{probe}");
        assert_eq!(c[probe]["httpGet"]["host"], "127.0.0.1", "{probe}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_overlay_leaves_kubeedge_its_hub_and_certificate_ports() {
    let docs = render("deploy/kubeedge-migration").await.unwrap();
    let svc = find(&docs, "Service", "tether-cloud");
    let ports = svc["spec"]["ports"].as_array().unwrap();
    let names: Vec<&str> = ports.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["bootstrap", "front", "tunnel"]);
    let node_ports: Vec<Option<u64>> = ports.iter().map(|p| p["nodePort"].as_u64()).collect();
    assert_eq!(node_ports, [None, Some(30003), Some(30004)]);
    // Everything else is the base.
    assert_eq!(
        find(&docs, "Deployment", "tether-cloud")["spec"]["replicas"],
        2
    );
    find(&docs, "DaemonSet", "tether-iptables-manager");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_a_bad_field_and_listens_on_nothing() {
    let dir = std::env::temp_dir().join(format!("tether-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("fornt_addr: 0.0.0.0:10003\n", "fornt_addr"),
        ("front_cert: /x.crt\n", "front_key"),
        ("cert_lifetime_hours: 0\n", "cert_lifetime_hours"),
    ];
    for (yaml, named) in cases {
        let cfg = process::write(&dir, "cloud.yaml", yaml).unwrap();
        let (ok, out, err) = process::run(&[BIN, "cloud", "--config", &cfg, "--check-config"])
            .await
            .unwrap();
        assert!(!ok, "{yaml:?} was accepted: {out}");
        assert!(err.contains(named), "{yaml:?}: {err}");
    }
    // Ports already taken do not matter: nothing binds.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let cfg = process::write(&dir, "cloud.yaml", &format!("admin_addr: {addr}\n")).unwrap();
    let out = process::ok(&[BIN, "cloud", "--config", &cfg, "--check-config"])
        .await
        .unwrap();
    assert_eq!(out.trim(), "OK");
    let _ = std::fs::remove_dir_all(&dir);
}
