#!/usr/bin/env bash
# Builds Tether's container image as an OCI archive:
#   target/image/tether-<version>.oci.tar   (tag <version> inside)
# It holds the static `tether` from scripts/dist.sh and nothing a static
# binary does not need: no base image, no shell, no libraries. It runs as the
# unprivileged user 65532. Built with umoci (Debian package `umoci`), since no
# base image can be pulled here and no container daemon is needed.
#
# Push it with standard tools, e.g.
#   skopeo copy oci-archive:target/image/tether-0.1.0.oci.tar:0.1.0 \
#     docker://registry.example.com/tether:0.1.0
# or load it locally: `podman load -i target/image/tether-0.1.0.oci.tar`.
#
# Set TETHER_IMAGE_SKIP_BUILD=1 to package an existing target/dist/tether.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v umoci >/dev/null || {
  echo "image.sh: missing Debian package: umoci (apt-get install -y --no-install-recommends umoci)" >&2
  exit 1
}
[[ ${TETHER_IMAGE_SKIP_BUILD:-} == 1 ]] || ./scripts/dist.sh

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Reproducible: the image's date is the commit's, not the build's.
created=$(git log -1 --format=%cI 2>/dev/null || date -u +%FT%TZ)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
layout="$work/oci"
ref="$layout:$version"
rootless=()
[[ $(id -u) -eq 0 ]] || rootless=(--rootless)

umoci init --layout "$layout"
umoci new --image "$ref"
umoci unpack "${rootless[@]}" --image "$ref" "$work/bundle"
root="$work/bundle/rootfs"
install -D -m 0755 target/dist/tether "$root/usr/local/bin/tether"
install -d -m 1777 "$root/tmp"
install -d -m 0755 "$root/etc" "$root/var/lib/tether"
# Names for the user (logs, `id`), and the resolver order for glibc's
# built-in files and dns lookups.
printf 'root:x:0:0:root:/root:/sbin/nologin\ntether:x:65532:65532:tether:/var/lib/tether:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\ntether:x:65532:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
chown 65532:65532 "$root/var/lib/tether" 2>/dev/null || true
umoci repack --image "$ref" "$work/bundle"

labels=(
  org.opencontainers.image.title=tether
  "org.opencontainers.image.description=Cloud-edge stream tunnel for Kubernetes kubelet traffic"
  org.opencontainers.image.version="$version"
  org.opencontainers.image.revision="$revision"
  org.opencontainers.image.created="$created"
  org.opencontainers.image.licenses=Apache-2.0
  org.opencontainers.image.source=https://github.com/tether/tether
  org.opencontainers.image.documentation=https://github.com/tether/tether/blob/main/docs/operator-guide.md
)
cfg=(--os linux --architecture amd64 --created "$created" --author "Tether developers"
  --config.user 65532:65532 --config.workingdir /var/lib/tether
  --config.env PATH=/usr/local/bin --config.entrypoint /usr/local/bin/tether
  --config.stopsignal SIGTERM --history.created "$created"
  --history.created_by "scripts/image.sh")
for l in "${labels[@]}"; do cfg+=(--config.label "$l" --manifest.annotation "$l"); done
for p in 10000 10001 10002 10003 10004 10005 10007; do cfg+=(--config.exposedports "$p/tcp"); done
umoci config "${cfg[@]}" --image "$ref"
umoci gc --layout "$layout"

mkdir -p target/image
archive="target/image/tether-$version.oci.tar"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="$created" \
  -C "$layout" -cf "$archive.tmp" . && mv "$archive.tmp" "$archive"
stat -c '%s %n' "$archive" | awk '{ printf "image.sh: %s %d bytes (%.1f MiB)\n", $2, $1, $1 / 1048576 }'
