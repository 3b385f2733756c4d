#!/usr/bin/env bash
# The cost of a fresh hit: `singleflight NAME --ttl 1h -- CMD` served from the cache,
# measured in one hyperfine run against `cat` of the same bytes, a keyed hit (the same
# with --key-cwd, --key-env and --key-file: one getcwd and one stat more) and a `bkt`
# hit of the same command, plus the hit's max RSS. Not a test: it prints figures, it asserts
# nothing about speed. The figures are only as good as the machine is quiet: the load
# average is printed with them.
#
#   bench/hit.sh              # 10 KiB result, then a 100 MiB one
#   SKIP_LARGE=1 bench/hit.sh # 10 KiB only
#   RUNS=2000 bench/hit.sh    # more runs per command (default 1000)
#   SF_BIN=/path/to/singleflight bench/hit.sh  # measure that binary, build nothing
#
# Installs what is missing: hyperfine (apt, else cargo), bkt (cargo, into bench/.tools),
# GNU time and python3 (apt).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
tools="$root/bench/.tools"
runs=${RUNS:-1000}
export PATH="$tools/bin:$PATH"

say() { printf '%s\n' "$*" >&2; }

apt_install() {
    command -v apt-get > /dev/null || return 1
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get install -y -qq "$@" > /dev/null 2>&1 ||
        { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq "$@" > /dev/null; }
}

need_tools() {
    if ! command -v hyperfine > /dev/null; then
        say "installing hyperfine"
        apt_install hyperfine || cargo install hyperfine --locked --root "$tools"
    fi
    if ! command -v bkt > /dev/null; then
        say "installing bkt into $tools"
        cargo install bkt --locked --root "$tools"
    fi
    [[ -x /usr/bin/time ]] || { say "installing GNU time"; apt_install time; }
    command -v python3 > /dev/null || { say "installing python3"; apt_install python3; }
}

need_tools
sf=${SF_BIN:-}
if [[ -z $sf ]]; then
    say "building singleflight (release)"
    cargo build --release --quiet
    sf="${CARGO_TARGET_DIR:-$root/target}/release/singleflight"
fi
bkt=$(command -v bkt)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export SINGLEFLIGHT_CACHE_DIR="$work/sf-cache"
export BKT_CACHE_DIR="$work/bkt-cache"
mkdir -m 700 "$SINGLEFLIGHT_CACHE_DIR" "$BKT_CACHE_DIR"

# Prints the max RSS in KiB of one run of "$@" (stdout discarded).
max_rss_kib() {
    /usr/bin/time -f %M -o "$work/rss" "$@" > /dev/null
    cat "$work/rss"
}

# Primes both caches with `cat FILE`, checks that a hit prints FILE byte for byte.
prime() {
    local file=$1 name=$2
    shift 2
    "$sf" "$name" --ttl 1h "$@" -- cat "$file" > /dev/null
    "$sf" -v "$name" --ttl 1h "$@" -- cat "$file" 2> "$work/decision" | cmp -s - "$file" ||
        { say "a hit did not print the cached bytes"; exit 1; }
    grep -q '^singleflight.*fresh.*: served$' "$work/decision" ||
        { say "not a fresh hit: $(cat "$work/decision")"; exit 1; }
}

# Prints the hyperfine export's figures as ratios of the first command (the hit).
ratios() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
labels = sys.argv[2].split(",")
by = dict(zip(labels, results))
hit = by["hit"]
def ms(r, key): return r[key] * 1000
for label in labels:
    r = by[label]
    print(f"  {label:5} mean {ms(r, 'mean'):7.3f} ms ± {ms(r, 'stddev'):.3f}  "
          f"median {ms(r, 'median'):7.3f} ms  min {ms(r, 'min'):7.3f} ms")
for label in labels[1:]:
    r = by[label]
    if label == "keyed":
        print(f"keyed/hit: {r['median'] / hit['median']:.2f}x (median), "
              f"{r['mean'] / hit['mean']:.2f}x (mean), {r['min'] / hit['min']:.2f}x (min), "
              f"+{(r['median'] - hit['median']) * 1e6:.0f} us (median)")
        continue
    print(f"hit/{label}: {hit['median'] / r['median']:.2f}x (median), "
          f"{hit['mean'] / r['mean']:.2f}x (mean), {hit['min'] / r['min']:.2f}x (min)")
EOF
}

say "preparing a 10 KiB result"
small="$work/small.txt"
python3 -c '
import sys
line = "".join(chr(33 + i % 94) for i in range(63)) + "\n"
sys.stdout.write((line * 160)[:10240])' > "$small"
prime "$small" bench
keys=(--key-cwd --key-env HOME --key-file "$small")
prime "$small" keyed "${keys[@]}"
"$bkt" --ttl=1h -- cat "$small" > /dev/null
"$bkt" --ttl=1h -- cat "$small" | cmp -s - "$small" || { say "bkt did not print the bytes"; exit 1; }

say "measuring: $runs runs each"
hyperfine -N --warmup 100 --runs "$runs" --style basic --export-json "$work/small.json" \
    -n hit "$sf bench --ttl 1h -- cat $small" \
    -n cat "cat $small" \
    -n keyed "$sf keyed --key-cwd --key-env HOME --key-file $small --ttl 1h -- cat $small" \
    -n bkt "$bkt --ttl=1h -- cat $small" >&2

echo
echo "== 10 KiB result, $runs runs each (hyperfine -N), $(uname -sr), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg) =="
ratios "$work/small.json" hit,cat,keyed,bkt
echo "max RSS: hit $(max_rss_kib "$sf" bench --ttl 1h -- cat "$small") KiB," \
    "cat $(max_rss_kib cat "$small") KiB," \
    "bkt $(max_rss_kib "$bkt" --ttl=1h -- cat "$small") KiB"

if [[ ${SKIP_LARGE:-} == 1 ]]; then
    exit 0
fi
say "preparing a 100 MiB result"
large="$work/large.bin"
head -c $((100 << 20)) /dev/urandom > "$large"
prime "$large" large --max-output 200MiB
hyperfine -N --warmup 2 --runs 20 --style basic --export-json "$work/large.json" \
    -n hit "$sf large --ttl 1h -- cat $large" \
    -n cat "cat $large" >&2
echo
echo "== 100 MiB result, 20 runs each (hyperfine -N) =="
ratios "$work/large.json" hit,cat
echo "max RSS: hit $(max_rss_kib "$sf" large --ttl 1h -- cat "$large") KiB," \
    "cat $(max_rss_kib cat "$large") KiB"
