#!/usr/bin/env bash
# Runs Tether's whole test suite. On a fresh Debian machine as root it first
# installs the system packages the tests use; without root it checks for them
# and names what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run, with a binary each provides (to tell whether
# it is installed). Add to both when a test starts using a new tool.
# kubernetes-client provides kubectl (with kustomize built in) for the
# manifests test; any kubectl already on PATH will do. umoci builds the OCI
# image (scripts/image.sh) and file tells the image test a binary is static.
PKGS=(curl procps iproute2 iptables nftables prometheus prometheus-node-exporter kubernetes-client umoci file)
declare -A BIN=([curl]=curl [procps]=kill [iproute2]=ip [iptables]=iptables-legacy-restore [nftables]=nft
  [prometheus]=prometheus [prometheus-node-exporter]=prometheus-node-exporter [kubernetes-client]=kubectl
  [umoci]=umoci [file]=file)

missing=()
for p in "${PKGS[@]}"; do
  command -v "${BIN[$p]}" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "test.sh: missing Debian packages: ${missing[*]}" >&2
    echo "test.sh: install them with: apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

cargo test --workspace --locked "$@"
