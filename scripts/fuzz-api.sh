#!/usr/bin/env bash
# Fuzz consnap's control API with schemathesis, driven by docs/openapi.yaml,
# against a live VM taking snapshots; then check that the VM survived it:
# it still answers, runs to its end with the checksum of an uninterrupted
# run, and its latest epoch restores to that checksum too.
#
# Optional (not part of scripts/test.sh or CI). Needs python3 with venv
# (Debian: python3-venv, installed when run as root) and PyPI for
# schemathesis, installed into target/fuzz-venv.
#
#   ./scripts/fuzz-api.sh                  # 3 minutes of fuzzing
#   FUZZ_SECONDS=600 ./scripts/fuzz-api.sh
#
# The guest paces its work on its clock, which runs while it is paused, so
# it ends about FUZZ_SECONDS + 90 s after it starts whatever the fuzzer
# does; the script then waits for that end.
#
# schemathesis talks TCP, so scripts/uds-proxy.py forwards 127.0.0.1:PORT to
# the API's Unix socket. Files go to target/tmp/fuzz-api.*, removed when
# everything passes. Exits 0 only if schemathesis found nothing and the VM
# came through intact.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-180}
rate=2000                # guest ops per second: the run outlives the fuzzing
ops=$((rate * (seconds + 90)))
spec="memstress,wss=8M,ops=$ops,seed=11"

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "fuzz-api: installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv
    else
        echo "fuzz-api: needs python3 with the venv module: install the Debian packages python3 python3-venv" >&2
        exit 1
    fi
fi
venv=target/fuzz-venv
if [[ ! -x $venv/bin/schemathesis ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'schemathesis>=4,<5'
fi

cargo build --release -q
bin=$PWD/target/release/consnap
mkdir -p target/tmp
work=$(mktemp -d "$PWD/target/tmp/fuzz-api.XXXXXX")
sock=$work/api.sock
vm_pid=
proxy_pid=
cleanup() {
    [[ -n $proxy_pid ]] && kill "$proxy_pid" 2>/dev/null || true
    [[ -n $vm_pid ]] && kill -KILL "$vm_pid" 2>/dev/null || true
}
trap cleanup EXIT

"$bin" run --workload "$spec,rate=$rate" --snapshot-dir "$work/snaps" --mode stop-copy \
    --interval 100ms --api-sock "$sock" --report "$work/run.json" --quiet \
    >"$work/console" 2>"$work/stderr" &
vm_pid=$!
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || { echo "fuzz-api: the VM did not open $sock" >&2; cat "$work/stderr" >&2; exit 1; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 scripts/uds-proxy.py "$port" "$sock" 2>"$work/proxy.stderr" &
proxy_pid=$!
for _ in $(seq 50); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
    sleep 0.1
done

echo "fuzz-api: schemathesis against docs/openapi.yaml for ${seconds}s, all checks"
set +e
"$venv/bin/schemathesis" run docs/openapi.yaml --url "http://127.0.0.1:$port" \
    --checks all --max-time "$seconds" --workers 4 --request-timeout 150 --no-color \
    --report har --report-har-path "$work/fuzz.har" --generation-database none \
    2>&1 | tee "$work/schemathesis.log"
found=${PIPESTATUS[0]}
set -e
requests=$(python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["log"]["entries"]))' "$work/fuzz.har")
# What was sent and answered, by operation and status.
python3 - "$work/fuzz.har" <<'PY'
import collections, json, sys, urllib.parse
seen = collections.Counter()
for e in json.load(open(sys.argv[1]))["log"]["entries"]:
    path = urllib.parse.urlsplit(e["request"]["url"]).path
    seen[(e["request"]["method"], path if len(path) < 40 else path[:37] + "...", e["response"]["status"])] += 1
for (method, path, status), n in sorted(seen.items(), key=lambda kv: -kv[1])[:40]:
    print(f"  {n:6} {method:7} {path:40} {status}")
if len(seen) > 40:
    print(f"  ... {len(seen) - 40} more (method, path, status) combinations")
PY

# The VM survived: it answers, resumes if the fuzzer left it paused, takes
# a snapshot now, and runs to its end unharmed.
kill -0 "$vm_pid" 2>/dev/null || { echo "fuzz-api: the VM died during fuzzing" >&2; tail "$work/stderr" >&2; exit 1; }
"$bin" ctl --sock "$sock" resume
"$bin" ctl --sock "$sock" set interval=200ms
"$bin" ctl --sock "$sock" snapshot
"$bin" ctl --sock "$sock" stats | head -4
echo "fuzz-api: waiting for the guest to finish its $ops ops"
wait "$vm_pid"
vm_pid=
want=$("$bin" run --workload "$spec" --report "$work/ref.json" --quiet >/dev/null 2>&1 &&
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["checksum"])' "$work/ref.json")
got=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["checksum"])' "$work/run.json")
"$bin" restore "$work/snaps" --at latest --report "$work/restored.json" >/dev/null 2>&1
restored=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["checksum"])' "$work/restored.json")
epochs=$("$bin" ls "$work/snaps" --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')

echo "fuzz-api: $requests requests; schemathesis exit $found; $epochs epochs; checksums: uninterrupted $want, fuzzed run $got, latest epoch restored $restored"
if [[ $found -ne 0 || $got != "$want" || $restored != "$want" ]]; then
    echo "fuzz-api: FAILED; files kept in $work" >&2
    exit 1
fi
rm -rf "$work"
echo "fuzz-api: passed"
