#!/usr/bin/env bash
# The project's test command (README.md; .ci/run calls exactly this).
#
# 1. Checks the tools it needs (scripts/deps.sh): as root on Debian it
#    installs what is missing, QEMU included; elsewhere it stops with one
#    line naming the packages.
# 2. Checks formatting and lints.
# 3. Fetches the Debian kernel and busybox initramfs for the Linux tests
#    (cached in target/linux), and builds Garage for the replication tests
#    (once per machine, scripts/garage.sh).
# 4. Builds the product binary (no test hooks) for the test that checks
#    it, then runs every test in release mode. A test whose dependency
#    (KVM, QEMU, Garage, root, network namespaces, TUN/TAP, userfaultfd,
#    the kernel files) the build did not find is reported as ignored, with
#    the reason (build-support/test_deps.rs); where the dependency exists
#    this script sets CONSNAP_REQUIRE_<NAME>=1, so that a test that cannot
#    use it fails instead of being ignored. Tests keep their files in
#    target/tmp (also their TMPDIR) and remove them when they pass. The
#    output goes to target/test.log too, and the last line counts the
#    ignored tests by reason.
# 5. Where a nightly toolchain with cargo-fuzz exists, fuzzes the store's
#    parsers for 10 s per target (scripts/fuzz-store.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh

cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings

# The product binary as `cargo build --release` makes it: without the
# test hooks, which only test builds compile in (the `testing` feature of
# snapshot, turned on by consnap's dev-dependencies). A test checks that
# it ignores them; `cargo test` below builds the binary again with them.
cargo build --release --bin consnap
mkdir -p target/product
cp target/release/consnap target/product/consnap
export CONSNAP_PRODUCT_BIN=$PWD/target/product/consnap CONSNAP_REQUIRE_PRODUCT=1

./scripts/fetch-linux.sh
export CONSNAP_LINUX_DIR=${CONSNAP_LINUX_DIR:-$PWD/target/linux} CONSNAP_REQUIRE_LINUX=1
# The object store the replication tests run against: Garage, built once
# per machine into $HOME/.cache/consnap (about 16 minutes the first time).
CONSNAP_GARAGE=$(./scripts/garage.sh)
export CONSNAP_GARAGE CONSNAP_REQUIRE_GARAGE=1
# The 3-node cluster tests put each Garage node and each "host" in a
# network namespace of its own: as root they must run.
if [[ $(id -u) == 0 ]]; then
    # Root runs consnap as another user and in a mount namespace of its
    # own, and may always create a userfaultfd.
    export CONSNAP_REQUIRE_ROOT=1 CONSNAP_REQUIRE_UFFD=1
fi
if [[ $(id -u) == 0 ]] && command -v ip >/dev/null; then
    export CONSNAP_REQUIRE_NETNS=1
    # The network tests put a TAP in such a namespace: where the kernel
    # offers TUN/TAP they must run.
    if [[ -c /dev/net/tun ]]; then
        export CONSNAP_REQUIRE_TAP=1
    fi
fi
if [[ -e /dev/kvm ]]; then
    export CONSNAP_REQUIRE_KVM=1
fi
if command -v qemu-system-x86_64 >/dev/null; then
    export CONSNAP_REQUIRE_QEMU=1
fi
# Anything a test or tool puts in the temporary directory stays in target/
# too, never in the machine's /tmp.
mkdir -p target/tmp
export TMPDIR=$PWD/target/tmp
status=0
cargo test --release --workspace --no-fail-fast 2>&1 | tee target/test.log || status=$?
./scripts/ignored.sh target/test.log
if [[ $status != 0 ]]; then
    exit "$status"
fi

# The store's parsers under libFuzzer, a short while per target, where a
# nightly toolchain and cargo-fuzz exist (the same checks ran above on
# stable, over the seed corpus and its mutations: store's fuzz_smoke test).
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    FUZZ_SECONDS=${FUZZ_SECONDS:-10} ./scripts/fuzz-store.sh
else
    echo "test.sh: no nightly toolchain with cargo-fuzz: the libFuzzer runs of scripts/fuzz-store.sh are skipped"
fi
