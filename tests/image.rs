//! What Tether ships, built the way a release is and run the way a user
//! would: `scripts/image.sh` (which runs `scripts/dist.sh`) builds the static
//! binaries and the OCI archive; the archive is unpacked with umoci and its
//! root filesystem runs `tether --version` and `tether demo --self-test` in a
//! mount namespace of its own where `/lib` is an empty tmpfs and nothing of
//! the host is visible. `tether-edge` is checked against its size target and
//! its dependency tree against the cloud's crates.

mod process;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

const IMAGE_MAX: u64 = 25 << 20;
const EDGE_MAX: u64 = 12 << 20;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Runs `cmd` to completion within `limit`, killing it past that.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} still running after {:?}", start.elapsed());
        }
    }
}

fn ok(cmd: &mut Command, limit: Duration) -> String {
    let out = run(cmd, limit);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the binaries and the image once per test process. A release build
/// from scratch takes minutes on two cores.
fn built() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let mut cmd = Command::new(root().join("scripts/image.sh"));
        // The variables cargo sets for a test are fingerprinted by the crates
        // that read them: without this, a shell's `scripts/dist.sh` and this
        // test would rebuild each other's output every time.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if (k.starts_with("CARGO_") && k != "CARGO_HOME") || k == "LD_LIBRARY_PATH" {
                cmd.env_remove(&*k);
            }
        }
        let out = ok(cmd.current_dir(root()), Duration::from_secs(40 * 60));
        println!("{out}");
        root().join(format!("target/image/tether-{}.oci.tar", version()))
    })
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .len()
}

/// Follows index.json to the image's manifest and config, as a registry would.
fn blob(layout: &Path, digest: &str) -> Value {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob"))
        .expect("blob is JSON")
}

#[test]
fn image_is_static_small_labelled_and_runs_with_no_libraries() {
    let archive = built();
    let bytes = size(archive);
    println!(
        "image {}: {bytes} bytes ({:.1} MiB), target <= 25 MiB",
        archive.display(),
        bytes as f64 / 1048576.0
    );
    assert!(bytes <= IMAGE_MAX, "image is {bytes} bytes");

    let dir = process::temp_dir("image", "unpack");
    let layout = dir.join("oci");
    std::fs::create_dir_all(&layout).unwrap();
    ok(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&layout),
        Duration::from_secs(60),
    );

    // The OCI structure: one manifest tagged with the version, its config
    // naming an unprivileged user, the entrypoint and the standard labels.
    let index = blob_file(&layout.join("index.json"));
    let m = &index["manifests"][0];
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        version()
    );
    let manifest = blob(&layout, m["digest"].as_str().unwrap());
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
    let config = blob(&layout, manifest["config"]["digest"].as_str().unwrap());
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532", "{c}");
    assert_eq!(c["Entrypoint"][0], "/usr/local/bin/tether");
    for l in [
        "title", "version", "revision", "created", "licenses", "source",
    ] {
        let key = format!("org.opencontainers.image.{l}");
        assert!(c["Labels"][&key].is_string(), "label {key} missing: {c}");
    }
    assert_eq!(c["Labels"]["org.opencontainers.image.version"], version());
    assert_eq!(config["os"], "linux");

    // Unpack the filesystem with umoci, as a runtime would.
    let bundle = dir.join("bundle");
    let mut unpack = Command::new("umoci");
    unpack.arg("unpack");
    if !process::is_root() {
        unpack.arg("--rootless");
    }
    ok(
        unpack
            .arg("--image")
            .arg(format!("{}:{}", layout.display(), version()))
            .arg(&bundle),
        Duration::from_secs(120),
    );
    let rootfs = bundle.join("rootfs");
    let mut files = Vec::new();
    list(&rootfs, &rootfs, &mut files);
    files.sort();
    assert_eq!(
        files,
        [
            "etc/group",
            "etc/nsswitch.conf",
            "etc/passwd",
            "usr/local/bin/tether"
        ],
        "the image holds the binary and the user's names, nothing else"
    );

    if !process::is_root() {
        println!(
            "SKIP running the unpacked image: chroot and mount namespaces need root (CI runs as root)"
        );
        return;
    }
    // Mount points for the run, inside the unpacked copy only.
    for d in ["lib", "lib64", "proc"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    let in_image = |args: &str| {
        let script = format!(
            "set -e; r={r}; mount -t tmpfs -o ro,size=1k empty $r/lib; \
             mount -t tmpfs -o ro,size=1k empty $r/lib64; mount -t proc proc $r/proc; \
             for d in lib lib64; do test -z \"$(ls -A $r/$d)\" || {{ echo $d not empty >&2; exit 1; }}; done; \
             exec chroot --userspec=65532:65532 $r /usr/local/bin/tether {args}",
            r = rootfs.display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--pid", "--fork", "--propagation", "private"])
            .args(["sh", "-c", &script])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
        cmd
    };
    let v = ok(&mut in_image("--version"), Duration::from_secs(30));
    assert!(v.contains(version()), "{v}");
    let out = run(&mut in_image("demo --self-test"), Duration::from_secs(180));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "demo --self-test in the image failed");
    let _ = std::fs::remove_dir_all(&dir);
}

fn blob_file(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).expect("read")).expect("JSON")
}

/// Regular files under `dir`, relative to `base`.
fn list(base: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            list(base, &p, out);
        } else {
            out.push(p.strip_prefix(base).unwrap().display().to_string());
        }
    }
}

#[test]
fn edge_binary_is_small_static_and_links_no_cloud_code() {
    built();
    let edge = root().join("target/dist/tether-edge");
    let bytes = size(&edge);
    println!(
        "tether-edge: {bytes} bytes ({:.1} MiB) stripped, static; target <= 12 MiB",
        bytes as f64 / 1048576.0
    );
    assert!(bytes <= EDGE_MAX, "tether-edge is {bytes} bytes");
    let file = ok(Command::new("file").arg(&edge), Duration::from_secs(10));
    assert!(
        file.contains("static") && file.contains("stripped"),
        "{file}"
    );

    // The edge agent's commands are there, the cloud's are not.
    ok(
        Command::new(&edge).args(["edge", "--help"]),
        Duration::from_secs(10),
    );
    let cloud = run(
        Command::new(&edge).args(["cloud", "--help"]),
        Duration::from_secs(10),
    );
    assert!(
        !cloud.status.success(),
        "tether-edge must not run the cloud"
    );

    // And the cloud's crates are not even in its tree.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = ok(
        Command::new(cargo).current_dir(root()).args([
            "tree",
            "--locked",
            "-p",
            "tether",
            "--no-default-features",
            "-e",
            "normal",
            "--prefix",
            "none",
        ]),
        Duration::from_secs(120),
    );
    for banned in [
        "kube ",
        "kube-client",
        "k8s-openapi",
        "tether-cloudstream",
        "tether-cloudhub",
        "tether-cluster",
        "tether-iptables-manager",
        "tether-tests",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(banned)),
            "tether-edge links {banned}:\n{tree}"
        );
    }
}

/// The README's "Quick start on a cluster", every step that needs no
/// cluster, with the shipped binaries: `tether token create`, `tether cloud`
/// (the image's binary) and the one command on the edge (`tether-edge edge
/// --token`), then a kubelet request through the tunnel as the apiserver
/// sends it.
#[test]
fn quick_start_with_the_shipped_binaries() {
    built();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(process::bounded(Duration::from_secs(120), quick_start()));
}

async fn quick_start() -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    use tether_tests::harness::Pki;

    let tether = root().join("target/dist/tether");
    let tether_edge = root().join("target/dist/tether-edge");
    let dir = process::temp_dir("image", "quick-start");
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    let state = state.display().to_string();

    // The edge CA, then a token bound to the node and its address.
    let out = tokio::process::Command::new(&tether)
        .args(["token", "list", "--state-dir", &state])
        .output()
        .await?;
    ensure!(out.status.success() && std::path::Path::new(&state).join("ca.crt").exists());
    let out = tokio::process::Command::new(&tether)
        .args(["token", "create", "--state-dir", &state, "--single-use"])
        .args(["--node", "edge-1", "--ip", "127.0.0.1"])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?
        .lines()
        .next()
        .context("no token printed")?
        .to_owned();

    // The front's serving certificate and the apiserver's client CA.
    let pki = Pki::generate()?;
    let front = pki
        .front_ca
        .issue_server("tether-front", &["localhost", "127.0.0.1"])?;
    let fc = process::write(&dir, "front.crt", &front.cert_pem)?;
    let fk = process::write(&dir, "front.key", front.key_pem.expose())?;
    let fca = process::write(&dir, "client-ca.crt", pki.front_ca.cert_pem())?;

    let any = "127.0.0.1:0";
    let cloud = process::spawn_program(
        &tether,
        &[
            "cloud",
            "--state-dir",
            &state,
            "--server-name",
            "localhost",
            "--tunnel-addr",
            any,
            "--front-addr",
            any,
            "--bootstrap-addr",
            any,
            "--admin-addr",
            any,
            "--hub-addr",
            any,
            "--front-cert",
            &fc,
            "--front-key",
            &fk,
            "--front-client-ca",
            &fca,
        ],
        "cloud started",
    )
    .await?;
    let f = |k| process::field(&cloud.started, k);
    let (tunnel, front_addr, bootstrap, hub) =
        (f("tunnel")?, f("front")?, f("bootstrap")?, f("hub")?);

    let kubelet = tether_tests::fixture::FixtureKubelet::start(None).await?;
    let edge_state = dir.join("edge").display().to_string();
    let _edge = process::spawn_program(
        &tether_edge,
        &[
            "edge",
            "--node-name",
            "edge-1",
            "--token",
            &token,
            "--cloud-addr",
            &tunnel,
            "--bootstrap-addr",
            &bootstrap,
            "--hub-addr",
            &hub,
            "--cloud-server-name",
            "localhost",
            "--state-dir",
            &edge_state,
            "--kubelet-url",
            &format!("http://{}", kubelet.addr),
            "--admin-addr",
            any,
        ],
        "started",
    )
    .await?;

    let tls = pki.apiserver_tls()?;
    let mut last = String::new();
    for _ in 0..100 {
        match front_get(
            &front_addr,
            tls.clone(),
            "edge-1",
            "/containerLogs/default/web-0/app",
        )
        .await
        {
            Ok((p, body)) if p.status == 200 => {
                ensure!(!body.is_empty(), "empty logs through the tunnel");
                let _ = std::fs::remove_dir_all(&dir);
                return Ok(());
            }
            Ok((p, _)) => last = p.status.to_string(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no logs through tether-edge within 10 s: {last}")
}

async fn front_get(
    front: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    host: &str,
    path: &str,
) -> anyhow::Result<(http::response::Parts, bytes::Bytes)> {
    let tcp = tokio::net::TcpStream::connect(front).await?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    tether_tests::kubectl::get(tls, host, path).await
}
