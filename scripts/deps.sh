#!/usr/bin/env bash
# Checks the tools that building and testing consnap need. As root on
# Debian it installs what is missing with apt-get (QEMU from the release's
# backports, whose apt source it adds when the machine has none, derived
# from the machine's own Debian source so that it works behind any mirror);
# anywhere else it stops with one line naming the packages to install.
#
# Debian packages: gcc libc6-dev (linker and C runtime for Rust binaries),
# cpio gzip lz4 xz-utils zstd (scripts/fetch-linux.sh), qemu-system-x86
# (the QEMU cross-check), iproute2 (the object-store cluster tests). Rust:
# cargo and rustc 1.88 or newer, with the rustfmt and clippy components.
set -euo pipefail

apt_dir=${CONSNAP_APT_DIR:-/etc/apt}
# shellcheck disable=SC1091
codename=$(. "${CONSNAP_OS_RELEASE:-/etc/os-release}" 2>/dev/null && echo "${VERSION_CODENAME:-}") || true
backports=$codename-backports

# The apt source files apt reads (not *.disabled and the like).
apt_sources() {
    local f
    for f in "$apt_dir"/sources.list "$apt_dir"/sources.list.d/*.list "$apt_dir"/sources.list.d/*.sources; do
        if [[ -f $f ]]; then echo "$f"; fi
    done
}

# A deb822 stanza for $backports with the URIs and Signed-By of the first
# enabled source whose suites include $codename: deb822 (.sources) first,
# then the one-line format (.list).
derive_backports_source() {
    local f
    for f in $(apt_sources); do
        [[ $f == *.sources ]] || continue
        awk -v want="$codename" -v bp="$backports" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; suites = ""; signed = ""; types = ""; enabled = "yes"; field = ""
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^#/) continue
                    if (line ~ /^[ \t]/) {            # continuation of the field before
                        if (field == "signed-by") signed = signed "\n" line
                        continue
                    }
                    split(line, kv, ":")
                    field = tolower(kv[1])
                    value = substr(line, index(line, ":") + 1)
                    sub(/^[ \t]+/, "", value); sub(/[ \t]+$/, "", value)
                    if (field == "types") types = value
                    else if (field == "uris") uris = value
                    else if (field == "suites") suites = value
                    else if (field == "signed-by") signed = value
                    else if (field == "enabled") enabled = tolower(value)
                }
                if (enabled == "no" || (" " types " ") !~ / deb / || uris == "") next
                n = split(suites, s, /[ \t]+/)
                for (j = 1; j <= n; j++) if (s[j] == want) {
                    print "Types: deb"
                    print "URIs: " uris
                    print "Suites: " bp
                    print "Components: main"
                    if (signed != "") print "Signed-By: " signed
                    found = 1
                    exit
                }
            }
            END { exit found ? 0 : 1 }
        ' "$f" && return 0
    done
    for f in $(apt_sources); do
        [[ $f == *.sources ]] && continue
        awk -v want="$codename" -v bp="$backports" '
            /^[ \t]*deb[ \t]/ {
                i = 2; signed = ""
                if ($i ~ /^\[/) {                     # [ options ]
                    while (i <= NF) {
                        opt = $i; gsub(/[\[\]]/, "", opt)
                        if (opt ~ /^signed-by=/) signed = substr(opt, 11)
                        if ($i ~ /\]$/) { i++; break }
                        i++
                    }
                }
                if ($(i + 1) == want) {
                    print "Types: deb"
                    print "URIs: " $i
                    print "Suites: " bp
                    print "Components: main"
                    if (signed != "") print "Signed-By: " signed
                    found = 1
                    exit
                }
            }
            END { exit found ? 0 : 1 }
        ' "$f" && return 0
    done
    return 1
}

if [[ ${CONSNAP_DEPS_PRINT_BACKPORTS:-} == 1 ]]; then
    # For checking the derivation by hand: print the stanza, change nothing.
    derive_backports_source
    exit
fi

# command:package
tools=(cc:gcc cpio:cpio gzip:gzip lz4:lz4 xz:xz-utils zstd:zstd qemu-system-x86_64:qemu-system-x86 ip:iproute2)

missing=()
for t in "${tools[@]}"; do
    command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
# The C runtime that cc links Rust binaries against.
if [[ ! -e /usr/lib/x86_64-linux-gnu/crt1.o && ! -e /usr/lib64/crt1.o && ! -e /usr/lib/crt1.o ]]; then
    missing+=(libc6-dev)
fi

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    echo "deps: needs Rust 1.88 or newer with rustfmt and clippy (rustup component add rustfmt clippy)" >&2
    exit 1
fi

[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1 || [[ -z $codename ]]; then
    echo "deps: missing tools: install the Debian packages ${missing[*]} (qemu-system-x86 from bookworm-backports on Debian 12), or run this as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
has_backports() {
    local f
    for f in $(apt_sources); do
        grep -Eq "^[^#]*[[:space:]]$backports([[:space:]]|\$)" "$f" && return 0
    done
    return 1
}
if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] && ! has_backports; then
    stanza=$(derive_backports_source) || {
        echo "deps: no apt source for $codename to derive $backports from; install: ${missing[*]}" >&2
        exit 1
    }
    echo "deps: adding "$apt_dir"/sources.list.d/consnap-backports.sources for $backports"
    printf '%s\n' "$stanza" > "$apt_dir"/sources.list.d/consnap-backports.sources
fi

echo "deps: installing ${missing[*]}"
apt-get update -qq
others=()
for p in "${missing[@]}"; do
    [[ $p == qemu-system-x86 ]] || others+=("$p")
done
if [[ ${#others[@]} -gt 0 ]]; then
    apt-get install -y -qq --no-install-recommends "${others[@]}"
fi
if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
    # Backports first: Debian 12's QEMU 7.2 conflicts with the qemu-utils 10
    # from backports that such machines may already have.
    apt-get install -y -qq --no-install-recommends -t "$backports" qemu-system-x86 ||
        apt-get install -y -qq --no-install-recommends qemu-system-x86
fi
