#!/usr/bin/env bash
# Fuzz the store's parsers with cargo fuzz (libFuzzer): epoch files as they
# are and with their checksums made right, --retain policies and RECLAIM
# files (targets in fuzz/, checks in crates/store/src/fuzzing.rs).
#
#   ./scripts/fuzz-store.sh                    # 60 s per target
#   FUZZ_SECONDS=600 ./scripts/fuzz-store.sh sealed_epoch
#
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install
# nightly; cargo install cargo-fuzz`). The seeds in fuzz/corpus stay as
# they are; what the fuzzer finds goes to target/fuzz-corpus, and a crash
# to fuzz/artifacts/TARGET, with the command that replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(epoch sealed_epoch policy ledger)
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz-store: needs a nightly toolchain and cargo-fuzz (rustup toolchain install nightly; cargo install cargo-fuzz)" >&2
    exit 2
fi
for t in "${targets[@]}"; do
    mkdir -p "target/fuzz-corpus/$t"
    echo "fuzz-store: $t for ${secs}s"
    log="target/fuzz-corpus/$t.log"
    if ! (cd fuzz && cargo +nightly fuzz run "$t" "../target/fuzz-corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs") >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "fuzz-store: $t failed (full output: $log; failing input, if any: fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    grep -E "^Done" "$log" || true
done
