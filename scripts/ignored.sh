#!/usr/bin/env bash
# One line counting the tests libtest reported as ignored in a log of
# `cargo test` (default target/test.log, which scripts/test.sh writes), by
# reason: "ignored tests: 3 needs /dev/kvm; 1 needs QEMU". A test is
# ignored where the build did not find what it needs
# (build-support/test_deps.rs), or when it is marked #[ignore] for good.
set -euo pipefail
log=${1:-target/test.log}
counts=$(sed -nE 's/^test .* \.\.\. ignored(, (.*))?$/\2/p' "$log" |
    sed 's/^$/no reason given/' | sort | uniq -c | sort -rn |
    sed -E 's/^ *([0-9]+) /\1 /' | paste -sd ';' - | sed 's/;/; /g')
echo "ignored tests: ${counts:-none}"
