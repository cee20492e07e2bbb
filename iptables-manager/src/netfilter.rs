//! Running the netfilter tools: which backend the host uses, reading the nat
//! table, and applying one transaction. Every call is one exec with a
//! deadline; transactions are fed on stdin.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::render::{Family, NFT_TABLE};

/// Which netfilter interface to program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-legacy` (x_tables).
    Legacy,
    /// `iptables-nft` (iptables syntax over nf_tables).
    Nft,
    /// Native `nft` with Tether's own table.
    Nftables,
}

/// The operator's choice: a backend, or detect it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// Detect like kube-proxy: use the iptables flavour that holds rules.
    Auto,
    /// Use this one.
    Fixed(Backend),
}

impl std::str::FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "legacy" | "iptables-legacy" => Self::Fixed(Backend::Legacy),
            "nft" | "iptables-nft" => Self::Fixed(Backend::Nft),
            "nftables" => Self::Fixed(Backend::Nftables),
            other => {
                return Err(format!(
                    "unknown backend {other:?}; want auto, legacy, nft or nftables"
                ));
            }
        })
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Legacy => "iptables-legacy",
            Self::Nft => "iptables-nft",
            Self::Nftables => "nftables",
        })
    }
}

/// Failures of the netfilter tools, each naming the cause.
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    /// The binary is not installed.
    #[error("{bin} not found in PATH (install the Debian package {package})")]
    MissingBinary {
        /// The binary.
        bin: String,
        /// The package that provides it.
        package: &'static str,
    },
    /// The kernel has no nat table for this family.
    #[error("{bin}: the kernel has no nat support for this family: {stderr}")]
    NoNat {
        /// The binary.
        bin: String,
        /// What it said.
        stderr: String,
    },
    /// The tool refused (the transaction was not applied).
    #[error("{bin} failed ({status}): {stderr}")]
    Failed {
        /// The binary.
        bin: String,
        /// Exit status.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// The tool did not finish in time (e.g. the xtables lock is held).
    #[error("{bin} did not finish within {0:?}", .timeout)]
    Timeout {
        /// The binary.
        bin: String,
        /// The deadline.
        timeout: Duration,
    },
    /// Running it failed otherwise.
    #[error("running {bin}: {cause}")]
    Io {
        /// The binary.
        bin: String,
        /// The error.
        cause: std::io::Error,
    },
}

impl NetfilterError {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::MissingBinary { .. } => "missing_binary",
            Self::NoNat { .. } => "no_nat",
            Self::Failed { .. } => "rejected",
            Self::Timeout { .. } => "timeout",
            Self::Io { .. } => "io",
        }
    }
}

const TOOL_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs `bin args`, feeding `stdin`, and returns stdout.
async fn run(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetfilterError> {
    let package = if bin.starts_with("nft") {
        "nftables"
    } else {
        "iptables"
    };
    let mut child = Command::new(bin)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|cause| match cause.kind() {
            std::io::ErrorKind::NotFound => NetfilterError::MissingBinary {
                bin: bin.to_owned(),
                package,
            },
            _ => NetfilterError::Io {
                bin: bin.to_owned(),
                cause,
            },
        })?;
    let io = |cause| NetfilterError::Io {
        bin: bin.to_owned(),
        cause,
    };
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await.map_err(io)?;
        drop(pipe);
    }
    let out = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| NetfilterError::Timeout {
            bin: bin.to_owned(),
            timeout: TOOL_TIMEOUT,
        })?
        .map_err(io)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let no_nat = [
        "Table does not exist",
        "can't initialize",
        "Could not fetch rule set",
    ]
    .iter()
    .any(|m| stderr.contains(m))
        && !stderr.contains("No such file or directory");
    Err(if no_nat {
        NetfilterError::NoNat {
            bin: bin.to_owned(),
            stderr,
        }
    } else {
        NetfilterError::Failed {
            bin: bin.to_owned(),
            status: out.status.to_string(),
            stderr,
        }
    })
}

impl Backend {
    fn tool(self, family: Family, suffix: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self {
            Self::Legacy => format!("{base}-legacy{suffix}"),
            Self::Nft | Self::Nftables => format!("{base}-nft{suffix}"),
        }
    }

    /// Tether's nat state for `family` as `iptables-save -t nat` prints it.
    pub(crate) async fn save(self, family: Family) -> Result<String, NetfilterError> {
        run(&self.tool(family, "-save"), &["-t", "nat"], None).await
    }

    /// Applies an `iptables-restore --noflush` transaction.
    pub(crate) async fn restore(self, family: Family, input: &str) -> Result<(), NetfilterError> {
        run(
            &self.tool(family, "-restore"),
            &["--noflush", "-w", "5"],
            Some(input),
        )
        .await
        .map(drop)
    }

    /// Applies an `nft -f` transaction.
    pub(crate) async fn nft_apply(script: &str) -> Result<(), NetfilterError> {
        run("nft", &["-f", "-"], Some(script)).await.map(drop)
    }

    /// Tether's table as `nft list` prints it, or None when it does not exist.
    pub(crate) async fn nft_list() -> Result<Option<String>, NetfilterError> {
        match run("nft", &["list", "table", "inet", NFT_TABLE], None).await {
            Ok(s) => Ok(Some(s)),
            Err(NetfilterError::Failed { stderr, .. } | NetfilterError::NoNat { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Picks the backend. For `Auto`, like kube-proxy's iptables wrapper: count
/// the rules each iptables flavour holds and use the one the host already
/// uses; with no rules anywhere, prefer iptables-nft. Returns the choice and
/// a sentence explaining it for the log.
pub(crate) async fn detect(choice: BackendChoice) -> Result<(Backend, String), NetfilterError> {
    if let BackendChoice::Fixed(b) = choice {
        return Ok((b, format!("backend {b} chosen by configuration")));
    }
    let count = |b: Backend| async move {
        let mut n = 0usize;
        let mut seen = false;
        for fam in [Family::V4, Family::V6] {
            if let Ok(s) = run(&b.tool(fam, "-save"), &[], None).await {
                seen = true;
                n += s.lines().filter(|l| l.starts_with("-A ")).count();
            }
        }
        seen.then_some(n)
    };
    let (legacy, nft) = (count(Backend::Legacy).await, count(Backend::Nft).await);
    let pick = match (legacy, nft) {
        (None, None) => {
            return Err(NetfilterError::MissingBinary {
                bin: "iptables-legacy-save / iptables-nft-save".into(),
                package: "iptables",
            });
        }
        (Some(l), Some(n)) if l > n => (
            Backend::Legacy,
            format!("iptables-legacy holds {l} rules, iptables-nft {n}: using iptables-legacy"),
        ),
        (Some(l), Some(n)) => (
            Backend::Nft,
            format!("iptables-nft holds {n} rules, iptables-legacy {l}: using iptables-nft"),
        ),
        (Some(l), None) => (
            Backend::Legacy,
            format!("only iptables-legacy is usable ({l} rules): using it"),
        ),
        (None, Some(n)) => (
            Backend::Nft,
            format!("only iptables-nft is usable ({n} rules): using it"),
        ),
    };
    Ok(pick)
}
