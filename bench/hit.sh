#!/usr/bin/env bash
# The cost of a fresh hit: `singleflight NAME --ttl 1h -- CMD` served from the cache,
# measured in one hyperfine run, side by side, for
#   static  the shipped static Linux binary (dist/build.sh's <arch>-unknown-linux-musl archive),
#   npm     the `singleflight` of the npm packages (dist/build.sh npm), installed with
#           `npm install -g` into a temp prefix, as a user gets it,
#   cargo   the `cargo install --path .` build (glibc),
#   cat     `cat` of the same bytes,
#   floor   bench/floor.c: a static C program that only opens, reads and writes the file,
#           built with the static binary's toolchain (zig's clang and musl, as
#           `python3 -m ziglang cc -target <arch>-linux-musl -static -O2 -s`): what no hit can beat,
#   keyed   a static hit with --key-cwd, --key-env and --key-file (one getcwd and one stat more),
#   bkt     a hit of the same command;
# with the ratios and each one's max RSS. Not a test: it prints figures, it asserts
# nothing about speed. The figures are only as good as the machine is quiet: the load
# average is printed with them. Targets: static <= 1.5x floor, static <= 0.7x cat, npm
# within 1.05x of static.
#
#   bench/hit.sh              # 10 KiB result, then a 100 MiB one (static only)
#   SKIP_LARGE=1 bench/hit.sh # 10 KiB only
#   RUNS=2000 bench/hit.sh    # more runs per command (default 1000)
#   SF_BIN=/path/to/singleflight bench/hit.sh    # measure that binary as `static`
#   SF_CARGO=/path/to/singleflight bench/hit.sh  # and that one as `cargo` (no cargo install)
#
# Builds what is missing (dist/build.sh, cargo install into a temp root) and installs
# hyperfine (apt, else cargo), bkt (cargo, into bench/.tools), GNU time and python3 (apt),
# zig (pip's ziglang, as dist/build.sh does) for the floor program.
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
    if ! type -P zig > /dev/null && ! python3 -c 'import ziglang' 2> /dev/null; then
        say "installing zig (pip install ziglang)"
        python3 -m pip install --quiet ziglang 2> /dev/null ||
            python3 -m pip install --quiet --break-system-packages ziglang
    fi
}

# zig, from PATH or pip's ziglang.
zig() {
    if type -P zig > /dev/null; then command zig "$@"; else python3 -m ziglang "$@"; fi
}

need_tools
target_dir=${CARGO_TARGET_DIR:-$root/target}
dist="$target_dir/dist"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
musl="$(uname -m)-unknown-linux-musl"
case $(uname -m) in x86_64) platform=linux-x64 ;; aarch64) platform=linux-arm64 ;; esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# static: the binary inside the shipped archive.
sf=${SF_BIN:-}
if [[ -z $sf ]]; then
    archive="$dist/singleflight-$version-$musl.tar.gz"
    [[ -f $archive ]] || { say "building the static archive"; dist/build.sh "$musl"; }
    tar -xzf "$archive" -C "$work"
    sf="$work/singleflight-$version-$musl/singleflight"
fi
# npm: the packed packages, installed globally into a temp prefix (offline).
npm_tgz="$dist/npm/singleflight-cli-singleflight-$version.tgz"
npm_platform_tgz="$dist/npm/singleflight-cli-$platform-$version.tgz"
[[ -f $npm_tgz && -f $npm_platform_tgz ]] || { say "packing the npm packages"; dist/build.sh npm; }
npm_config_cache="$work/npm-cache" npm_config_userconfig=/dev/null \
    npm install -g --prefix "$work/npm" --offline --no-audit --no-fund \
    --allow-scripts=@singleflight-cli/singleflight "$npm_platform_tgz" "$npm_tgz" > /dev/null 2>&1
sf_npm="$work/npm/bin/singleflight"
# cargo: what `cargo install --path .` builds, reusing this tree's release build.
sf_cargo=${SF_CARGO:-}
if [[ -z $sf_cargo ]]; then
    say "cargo install --path . (release, glibc)"
    cargo install --quiet --locked --path "$root" --root "$work/cargo" --target-dir "$target_dir"
    sf_cargo="$work/cargo/bin/singleflight"
fi
# floor: the C program, static, with the static binary's C toolchain.
floor="$work/floor"
zig cc -target "$(uname -m)-linux-musl" -static -O2 -s -o "$floor" bench/floor.c
say "static: $sf ($(file -b "$sf" | cut -d, -f1-2 | tr -d '\n'))"
say "npm:    $sf_npm -> $(readlink -f "$sf_npm")"
say "cargo:  $sf_cargo"
bkt=$(command -v bkt)
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

# Prints the hyperfine export's figures, then the ratios asked for as A/B,... pairs.
ratios() {
    python3 - "$@" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
labels = sys.argv[2].split(",")
by = dict(zip(labels, results))
def ms(r, key): return r[key] * 1000
for label in labels:
    r = by[label]
    print(f"  {label:6} mean {ms(r, 'mean'):7.3f} ms ± {ms(r, 'stddev'):.3f}  "
          f"median {ms(r, 'median'):7.3f} ms  min {ms(r, 'min'):7.3f} ms")
for pair in sys.argv[3].split(","):
    a, b = (by[x] for x in pair.split("/"))
    print(f"{pair:13} {a['median'] / b['median']:.2f}x (median), "
          f"{a['mean'] / b['mean']:.2f}x (mean), {a['min'] / b['min']:.2f}x (min)")
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
    -n static "$sf bench --ttl 1h -- cat $small" \
    -n npm "$sf_npm bench --ttl 1h -- cat $small" \
    -n cargo "$sf_cargo bench --ttl 1h -- cat $small" \
    -n cat "cat $small" \
    -n floor "$floor $small" \
    -n keyed "$sf keyed --key-cwd --key-env HOME --key-file $small --ttl 1h -- cat $small" \
    -n bkt "$bkt --ttl=1h -- cat $small" >&2

echo
echo "== 10 KiB result, $runs runs each (hyperfine -N), $(uname -sr), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg) =="
ratios "$work/small.json" static,npm,cargo,cat,floor,keyed,bkt \
    static/floor,static/cat,npm/static,cargo/cat,cargo/static,keyed/static,static/bkt
echo "max RSS: static $(max_rss_kib "$sf" bench --ttl 1h -- cat "$small") KiB," \
    "npm $(max_rss_kib "$sf_npm" bench --ttl 1h -- cat "$small") KiB," \
    "cargo $(max_rss_kib "$sf_cargo" bench --ttl 1h -- cat "$small") KiB," \
    "cat $(max_rss_kib cat "$small") KiB," \
    "floor $(max_rss_kib "$floor" "$small") KiB," \
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
    -n cat "cat $large" \
    -n floor "$floor $large" >&2
echo
echo "== 100 MiB result, 20 runs each (hyperfine -N) =="
ratios "$work/large.json" hit,cat,floor hit/floor,hit/cat
echo "max RSS: hit $(max_rss_kib "$sf" large --ttl 1h -- cat "$large") KiB," \
    "cat $(max_rss_kib cat "$large") KiB"
