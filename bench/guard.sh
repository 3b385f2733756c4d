#!/usr/bin/env bash
# What the guard costs a run: a miss of `true` (`--ttl 0`, so every call wins the lock
# and runs the command) with the guard and with `SINGLEFLIGHT_GUARD=off`, in one
# hyperfine run, plus a fresh hit for reference (the guard is never started on a hit).
# Both misses go through `env`, so that they differ only in the guard. Prints figures,
# asserts nothing.
#
#   bench/guard.sh                # release build, 300 runs each
#   RUNS=1000 bench/guard.sh
#   SF_BIN=/path/to/singleflight bench/guard.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
runs=${RUNS:-300}
command -v hyperfine > /dev/null || { echo "needs hyperfine (apt-get install hyperfine)" >&2; exit 1; }
if [[ -z ${SF_BIN:-} ]]; then
    cargo build --release --quiet
    SF_BIN="$root/target/release/singleflight"
fi
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export SINGLEFLIGHT_CACHE_DIR="$cache/cache"
"$SF_BIN" hit --ttl 1h -- echo hit > /dev/null

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
hyperfine -N --warmup 20 --runs "$runs" --export-json "$cache/guard.json" \
    -n "miss of true, guard on" "env SINGLEFLIGHT_GUARD=on $SF_BIN miss-on --ttl 0 -- true" \
    -n "miss of true, guard off" "env SINGLEFLIGHT_GUARD=off $SF_BIN miss-off --ttl 0 -- true" \
    -n "fresh hit" "$SF_BIN hit --ttl 1h -- echo hit"
# Medians (a loaded machine's outliers move the means), and the guard's share.
python3 - "$cache/guard.json" <<'PY'
import json, sys
results = {r["command"]: r["median"] * 1000 for r in json.load(open(sys.argv[1]))["results"]}
for name, ms in results.items():
    print(f"median {name}: {ms:.2f} ms")
on, off = results["miss of true, guard on"], results["miss of true, guard off"]
print(f"the guard costs a run {on - off:.2f} ms ({on / off:.2f}x)")
PY
