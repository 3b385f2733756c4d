#!/usr/bin/env bash
# The cost of a fresh hit through etcd: `singleflight --backend etcd://… NAME --ttl 1h --
# CMD` served from etcd, against a local hit of the same 10 KiB result and `etcdctl get`
# of the same key, in one hyperfine run, with ratios. Not a test: it prints figures and
# asserts nothing about speed. It starts its own one-member etcd on free loopback ports
# in a temp dir and stops it at the end. The load average is printed with the figures.
#
#   bench/etcd.sh              # 1000 runs per command
#   RUNS=2000 bench/etcd.sh
#   SF_BIN=/path/to/singleflight bench/etcd.sh  # measure that binary, build nothing
#
# Installs what is missing: hyperfine, etcd-server and etcd-client, python3 (apt).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
runs=${RUNS:-1000}

say() { printf '%s\n' "$*" >&2; }

apt_install() {
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get install -y -qq "$@" > /dev/null 2>&1 ||
        { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq "$@" > /dev/null; }
}

command -v hyperfine > /dev/null || { say "installing hyperfine"; apt_install hyperfine; }
command -v python3 > /dev/null || { say "installing python3"; apt_install python3; }
if [[ ! -x /usr/bin/etcd || ! -x /usr/bin/etcdctl ]]; then
    say "installing etcd-server and etcd-client"
    apt_install etcd-server etcd-client
    # Where the install started the packaged service, stop it: this script runs its own.
    invoke-rc.d etcd stop > /dev/null 2>&1 || true
fi

sf=${SF_BIN:-}
if [[ -z $sf ]]; then
    say "building singleflight (release)"
    cargo build --release --quiet
    sf="${CARGO_TARGET_DIR:-$root/target}/release/singleflight"
fi

work=$(mktemp -d)
etcd_pid=
cleanup() {
    [[ -n $etcd_pid ]] && kill "$etcd_pid" 2> /dev/null && wait "$etcd_pid" 2> /dev/null
    rm -rf "$work"
}
trap cleanup EXIT
export SINGLEFLIGHT_CACHE_DIR="$work/sf-cache"
mkdir -m 700 "$SINGLEFLIGHT_CACHE_DIR"
unset SINGLEFLIGHT_BACKEND SINGLEFLIGHT_ETCD_PREFIX
export ETCDCTL_API=3

# Two free loopback ports (client, peer), bound at once and released for etcd.
read -r client peer < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
say "starting etcd on 127.0.0.1:$client"
/usr/bin/etcd --name bench --data-dir "$work/etcd" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "bench=http://127.0.0.1:$peer" --logger zap --log-level warn \
    > "$work/etcd.log" 2>&1 &
etcd_pid=$!
for _ in $(seq 100); do
    etcdctl --endpoints "127.0.0.1:$client" endpoint health > /dev/null 2>&1 && break
    sleep 0.1
done
etcdctl --endpoints "127.0.0.1:$client" endpoint health > /dev/null ||
    { say "etcd did not start: $(tail -5 "$work/etcd.log")"; exit 1; }
backend="etcd://127.0.0.1:$client"
key=/singleflight/bench/result

say "preparing a 10 KiB result, in etcd and in the cache dir"
small="$work/small.txt"
python3 -c '
import sys
line = "".join(chr(33 + i % 94) for i in range(63)) + "\n"
sys.stdout.write((line * 160)[:10240])' > "$small"
for where in "--backend=$backend" ""; do
    # shellcheck disable=SC2086 # an empty $where is no argument
    "$sf" $where bench --ttl 1h -- cat "$small" > /dev/null
    # shellcheck disable=SC2086
    "$sf" $where -v bench --ttl 1h -- cat "$small" 2> "$work/decision" | cmp -s - "$small" ||
        { say "a hit ($where) did not print the cached bytes"; exit 1; }
    grep -q '^singleflight.*fresh.*: served$' "$work/decision" ||
        { say "not a fresh hit ($where): $(cat "$work/decision")"; exit 1; }
done
etcdctl --endpoints "127.0.0.1:$client" get --print-value-only "$key" > "$work/value"
[[ $(stat -c %s "$work/value") -gt 10240 ]] || { say "etcdctl get found no result"; exit 1; }

say "measuring: $runs runs each"
hyperfine -N --warmup 100 --runs "$runs" --style basic --export-json "$work/hit.json" \
    -n etcd-hit "$sf --backend $backend bench --ttl 1h -- cat $small" \
    -n local-hit "$sf bench --ttl 1h -- cat $small" \
    -n etcdctl "etcdctl --endpoints 127.0.0.1:$client get --print-value-only $key" >&2

echo
echo "== 10 KiB result, $runs runs each (hyperfine -N), $(uname -sr), $(nproc) CPUs," \
    "load $(cut -d' ' -f1-3 /proc/loadavg), $(etcd --version | head -1) =="
python3 - "$work/hit.json" <<'EOF'
import json, sys
labels = ["etcd-hit", "local-hit", "etcdctl"]
results = dict(zip(labels, json.load(open(sys.argv[1]))["results"]))
def ms(r, key): return r[key] * 1000
for label in labels:
    r = results[label]
    print(f"  {label:9} mean {ms(r, 'mean'):7.3f} ms ± {ms(r, 'stddev'):.3f}  "
          f"median {ms(r, 'median'):7.3f} ms  min {ms(r, 'min'):7.3f} ms")
hit = results["etcd-hit"]
for label in labels[1:]:
    r = results[label]
    print(f"etcd-hit/{label}: {hit['median'] / r['median']:.2f}x (median), "
          f"{hit['mean'] / r['mean']:.2f}x (mean), {hit['min'] / r['min']:.2f}x (min); "
          f"difference of medians {ms(hit, 'median') - ms(r, 'median'):+.3f} ms")
EOF
