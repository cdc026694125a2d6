#!/usr/bin/env bash
# The project's test command (README.md; .ci/run calls exactly this).
#
# - Fetches the Debian kernel and busybox initramfs for the Linux tests
#   (cached in target/linux).
# - When /dev/kvm exists, sets CONSNAP_REQUIRE_KVM=1: a KVM test that cannot
#   run is then a failure, never a silent skip.
# - When qemu-system-x86_64 is installed, sets CONSNAP_REQUIRE_QEMU=1 so the
#   cross-check against QEMU must run too.
# - Checks formatting and lints, then runs every test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -e /dev/kvm ]]; then
    export CONSNAP_REQUIRE_KVM=1
fi
if command -v qemu-system-x86_64 >/dev/null; then
    export CONSNAP_REQUIRE_QEMU=1
fi
./scripts/fetch-linux.sh
export CONSNAP_LINUX_DIR=${CONSNAP_LINUX_DIR:-$PWD/target/linux}

cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release --workspace
