#!/usr/bin/env bash
# Writes dist/hit-path.ld, the linker script that puts the code of a fresh hit together
# at the start of the static binaries' text (dist/build.sh links the two
# *-unknown-linux-musl targets with it).
#
# Why: a hit runs ~24,000 instructions, but spread over a 3 MB text they touched about
# 17 separate 64 KiB windows, and each one is a page fault (the kernel maps a file's
# pages 64 KiB at a time), ~3 µs apiece: more than the instructions. Gathered, the hit's
# code is two windows. See docs/benchmarks.md.
#
# How: a static build with symbols runs a plain, a keyed and a fleet-copy hit under
# callgrind; every function it saw becomes an input-section pattern of the script
# (rustc and zig's musl put each function in a section `.text.<symbol>`, or
# `.text.unlikely.<symbol>` for a cold one). Symbol hashes are replaced by `*`, so the
# script survives edits elsewhere; a pattern that matches nothing costs nothing, and a
# function that comes to the hit later (or a rename) only costs speed until this is run
# again: bench/hit.sh shows it. A few patterns are kept by hand (see `always`).
#
#   dist/hit-path.sh        # needs what dist/build.sh needs for musl, valgrind and etcd
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=x86_64-unknown-linux-musl
out=dist/hit-path.ld

command -v valgrind > /dev/null || { echo "hit-path: needs valgrind (apt install valgrind)" >&2; exit 1; }
command -v etcd > /dev/null || { echo "hit-path: needs etcd (apt install etcd-server)" >&2; exit 1; }
command -v cargo-zigbuild > /dev/null || { echo "hit-path: needs cargo-zigbuild (dist/build.sh installs it)" >&2; exit 1; }
target_dir="${CARGO_TARGET_DIR:-$root/target}/hit-path"
CARGO_PROFILE_RELEASE_STRIP=false CARGO_TARGET_DIR="$target_dir" \
    cargo zigbuild --release --locked --quiet --target "$target"
sf="$target_dir/$target/release/singleflight"

work=$(mktemp -d)
etcd_pid=
trap '[[ -z $etcd_pid ]] || { kill "$etcd_pid" && wait "$etcd_pid"; } 2> /dev/null; rm -rf "$work"' EXIT
read -r client peer < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
etcd --name hit-path --data-dir "$work/etcd" --log-level warn \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "hit-path=http://127.0.0.1:$peer" > "$work/etcd.log" 2>&1 &
etcd_pid=$!
backend="etcd://127.0.0.1:$client"
export SINGLEFLIGHT_CACHE_DIR="$work/cache"
unset SINGLEFLIGHT_BACKEND
head -c 10240 Cargo.lock > "$work/body"
cd "$work"
keyed=(keyed --key-cwd --key-env HOME --key-file body --ttl 1h -- cat body)
"$sf" plain --ttl 1h -- cat body > /dev/null
"$sf" "${keyed[@]}" > /dev/null
# The fleet: the call that runs keeps the copy a fleet hit serves (etcd may take a
# moment to start).
for _ in $(seq 50); do
    "$sf" --backend "$backend" fleet --ttl 1h -- cat body > /dev/null 2>&1 && break
    sleep 0.2
done
[[ -f $SINGLEFLIGHT_CACHE_DIR/fleet.fleet ]] || { echo "hit-path: no fleet copy: $(tail -3 "$work/etcd.log")" >&2; exit 1; }
profile() {
    local name=$1
    shift
    valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/$name.cg" "$sf" "$@" \
        > "$work/$name.out" 2> "$work/$name.err"
    cmp -s "$work/$name.out" body || { echo "hit-path: the $name hit did not print the body" >&2; exit 1; }
}
profile plain plain --ttl 1h -- cat body
profile keyed "${keyed[@]}"
profile fleet --backend "$backend" fleet --ttl 1h -- cat body
cd "$root"

python3 - "$work"/*.cg > "$out" <<'PY'
import re, sys
# Always in: the C library's start (its `_start` is in crt1.o's plain `.text`, and
# callgrind names `__libc_start_main` "(below main)"), and zig's memcpy and memset.
always = ["__libc_start_main", "*fastMemset*", "*memcpy*", "*memset*"]
names = []
for path in sys.argv[1:]:
    for line in open(path):
        m = re.match(r"^c?fn=\(\d+\)\s*(.+)$", line.rstrip("\n"))
        if not m:
            continue
        name = re.sub(r"'\d+$", "", m.group(1).strip())
        if name.startswith(("0x", "(")):
            continue
        # Legacy mangling ends in a hash (17h<16 hex>E); v0 names each crate with one.
        name = re.sub(r"17h[0-9a-f]{16}E$", "*", name)
        name = re.sub(r"Cs[0-9a-zA-Z]+_", "Cs*_", name)
        if name not in names:
            names.append(name)
print("/* The code of a fresh hit, first in the text: written by dist/hit-path.sh, */")
print("/* which says why. Used by dist/build.sh for the *-unknown-linux-musl targets. */")
print("SECTIONS {\n  .text.hit : {\n    *crt1.o(.text .text.*)")
for name in names + always:
    print(f"    *(.text.{name} .text.unlikely.{name})")
print("  }\n} INSERT BEFORE .text;")
PY
echo "hit-path: wrote $out ($(grep -c '^    \*(' "$out") patterns)" >&2
