#!/usr/bin/env bash
# Print the path of a Garage 2.5.0 binary (the S3-compatible object store
# the replication tests run against), building it once into a versioned
# cache outside the clone when it is missing: about 16 minutes and 1.4 GB
# of memory on 2 cores, paid once per machine.
#
#   CONSNAP_GARAGE_CACHE   cache root (default: $HOME/.cache/consnap)
set -euo pipefail
version=2.5.0
root=${CONSNAP_GARAGE_CACHE:-$HOME/.cache/consnap}/garage-$version
bin=$root/bin/garage
if [[ ! -x $bin ]]; then
    echo "garage.sh: building Garage $version into $root (once per machine, about 16 minutes)" >&2
    mkdir -p "$root"
    # A private target directory beside the cache (not /tmp, which may be
    # small), removed afterwards: only the binary is kept.
    tmp=$(mktemp -d "$root.build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    CARGO_TARGET_DIR=$tmp cargo install --locked garage --version "$version" --root "$root.partial" >&2
    mkdir -p "$root/bin"
    mv "$root.partial/bin/garage" "$bin.tmp"
    mv "$bin.tmp" "$bin"
    rm -rf "$root.partial"
fi
"$bin" --version >/dev/null
echo "$bin"
