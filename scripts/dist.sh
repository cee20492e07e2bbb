#!/usr/bin/env bash
# Builds what Tether ships, static and stripped (profile `dist` in Cargo.toml):
#   target/dist/tether       every role; the container image's binary
#   target/dist/tether-edge  the edge agent alone (no `cloud` feature), for
#                            edge devices and the systemd unit
# glibc's crt-static makes them run on any x86_64 Linux with no shared
# libraries at all (the musl target cannot be installed here).
set -euo pipefail
cd "$(dirname "$0")/.."

target=$(rustc -vV | sed -n 's/^host: //p')
# A target dir of its own: crt-static changes every crate's flags, and the
# explicit --target keeps build scripts and proc-macros dynamic.
export CARGO_TARGET_DIR=target/static
# getrandom's default finds glibc's getrandom() with dlsym, which a static
# binary cannot, and falls back to /dev/urandom; the image has no /dev of its
# own, so call the system call directly (Linux >= 3.17).
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static --cfg getrandom_backend=\"linux_getrandom\""
out="$CARGO_TARGET_DIR/$target/dist/tether"
mkdir -p target/dist

cargo build --locked --profile dist --target "$target" --bin tether --no-default-features
cp "$out" target/dist/tether-edge.tmp && mv target/dist/tether-edge.tmp target/dist/tether-edge
cargo build --locked --profile dist --target "$target" --bin tether
cp "$out" target/dist/tether.tmp && mv target/dist/tether.tmp target/dist/tether

for b in tether tether-edge; do
  stat -c '%s %n' "target/dist/$b" | awk '{ printf "dist.sh: %-24s %9d bytes (%.1f MiB)\n", $2, $1, $1 / 1048576 }'
done
