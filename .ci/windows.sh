#!/usr/bin/env bash
# The Windows target: cargo check, clippy of the crate and its tests (both feature sets;
# the tests are compiled, not run) and a release build of x86_64-pc-windows-gnu (the target
# and mingw-w64 are installed if missing). With SINGLEFLIGHT_WINE_SMOKE=1, also a smoke
# test of the built .exe under wine64: a miss, a hit, four concurrent callers sharing one
# run, a timeout that kills a command's child, singleflight killed with its tree, and
# `stop` of a --service instance (and its refusal when the creation time does not match).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-pc-windows-gnu

apt_install() {
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"
command -v x86_64-w64-mingw32-gcc >/dev/null || apt_install mingw-w64

cargo check --target "$TARGET"
# The tests too: they compile for Windows (the Unix-only ones are gated), but run on Linux.
cargo clippy --all-targets --target "$TARGET" -- -D warnings
cargo clippy --all-targets --no-default-features --target "$TARGET" -- -D warnings
# The release build and its .zip, by the script that builds the releases (dist/build.sh).
bash dist/build.sh "$TARGET"
exe="target/$TARGET/release/singleflight.exe"
echo "windows: built $exe ($(stat -c %s "$exe") bytes)"

[ "${SINGLEFLIGHT_WINE_SMOKE:-}" = 1 ] || exit 0

# ---- the smoke test under wine ----------------------------------------------------
[ -x /usr/lib/wine/wine64 ] || apt_install wine64
wine=/usr/lib/wine/wine64
work=$(mktemp -d)
export WINEPREFIX="$work/prefix" WINEDEBUG=-all
"$wine" wineboot -i >/dev/null 2>&1 || true
# wine 8 lacks bcryptprimitives.dll, which Rust's std imports (ProcessPrng): a stub.
x86_64-w64-mingw32-gcc -O2 -shared -o "$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll" \
    .ci/wine/bcryptprimitives.c -ladvapi32
x86_64-w64-mingw32-gcc -O2 -o "$work/tree.exe" .ci/wine/tree.c
tree="Z:${work//\//\\}\\tree.exe"
# The cache is in the prefix's %LOCALAPPDATA%\singleflight, the Windows default.
unset SINGLEFLIGHT_CACHE_DIR
sf() { "$wine" "$exe" "$@"; }
fail() { echo "wine smoke: FAILED: $*" >&2; exit 1; }
# Live processes running tree.exe (wine shows them by their Windows or Unix path).
tree_pids() { ps -eo pid=,stat=,args= | W="$work/tree.exe" Z="$tree" awk \
    '($3 == ENVIRON["W"] || $3 == ENVIRON["Z"]) && $2 !~ /^Z/ { print $1 }'; }

out=$(sf -v hit --ttl 1m -- cmd /c echo hello 2>"$work/err") || fail "miss exited $?"
[ "${out%$'\r'}" = hello ] || fail "miss printed '$out'"
grep -q 'ran the command' "$work/err" || fail "miss: $(cat "$work/err")"
out=$(sf -v hit --ttl 1m -- cmd /c echo hello 2>"$work/err") || fail "hit exited $?"
grep -q 'fresh (ttl 1m0s): served' "$work/err" || fail "hit: $(cat "$work/err")"
echo "wine smoke: miss then hit: ok"

runs="Z:${work//\//\\}\\runs.txt"
for i in 1 2 3 4; do
    sf conc --ttl 1m -- cmd /c "echo run>>$runs & ping -n 3 127.0.0.1 >nul & echo done" \
        >"$work/conc$i" 2>&1 &
done
wait
[ "$(wc -l <"$work/runs.txt")" = 1 ] || fail "$(wc -l <"$work/runs.txt") runs for 4 callers"
for i in 1 2 3 4; do grep -q done "$work/conc$i" || fail "caller $i: $(cat "$work/conc$i")"; done
echo "wine smoke: 4 concurrent callers, 1 run, all served: ok"

status=0
sf timeout --timeout 2s -- "$tree" parent >/dev/null 2>&1 || status=$?
[ "$status" = 124 ] || fail "timeout exited $status, not 124"
sleep 1
[ -z "$(tree_pids)" ] || fail "left alive after the timeout: $(tree_pids)"
echo "wine smoke: timeout (exit 124), command and its child killed: ok"

"$wine" "$exe" killed --timeout 60s -- "$tree" parent >/dev/null 2>&1 &
sf_pid=$!
for _ in $(seq 100); do [ "$(tree_pids | wc -l)" = 2 ] && break; sleep 0.1; done
[ "$(tree_pids | wc -l)" = 2 ] || fail "the tree did not start"
kill -9 "$sf_pid"
wait "$sf_pid" 2>/dev/null || true
for _ in $(seq 50); do [ -z "$(tree_pids)" ] && break; sleep 0.1; done
[ -z "$(tree_pids)" ] || fail "left alive after singleflight was killed: $(tree_pids)"
echo "wine smoke: singleflight SIGKILLed, its Job Object killed the tree: ok"

# stop: a --service instance (tree.exe and its child, in the supervisor's Job Object).
# Live singleflight.exe processes (a supervisor).
sf_pids() { ps -eo pid=,stat=,args= | awk '$3 ~ /singleflight\.exe$/ && $2 !~ /^Z/ { print $1 }'; }
sf --service svc -- "$tree" parent >"$work/svc" 2>&1 || fail "service: $(cat "$work/svc")"
for _ in $(seq 100); do [ "$(tree_pids | wc -l)" = 2 ] && break; sleep 0.1; done
[ "$(tree_pids | wc -l)" = 2 ] || fail "the service's tree did not start"
[ "$(sf_pids | wc -l)" = 1 ] || fail "not one supervisor: $(sf_pids)"
run=$(find "$WINEPREFIX/drive_c" -name svc.run)
[ -f "$run" ] || fail "no run record for svc"
grep -Eq '"owner_start_ticks":[1-9]' "$run" || fail "no creation time recorded: $(cat "$run")"
# A record whose creation time is not the supervisor's (its pid reused): nothing is killed.
cp "$run" "$work/run.kept"
sed -Ei 's/"owner_start_ticks":([0-9]+)/"owner_start_ticks":1\1/' "$run"
status=0
sf stop svc 2>"$work/err" || status=$?
[ "$status" != 0 ] || fail "stop of a reused pid exited 0"
grep -q 'is another process now.*nothing was signalled' "$work/err" || fail "stop: $(cat "$work/err")"
[ "$(tree_pids | wc -l)" = 2 ] && [ "$(sf_pids | wc -l)" = 1 ] ||
    fail "stop of a reused pid killed something"
echo "wine smoke: stop refuses a pid whose creation time is not the record's: ok ($(tr -d '\r' <"$work/err"))"
cp "$work/run.kept" "$run"
sf -v stop svc 2>"$work/err" || fail "stop exited $?: $(cat "$work/err")"
grep -Eq 'svc: stopped pid [0-9]+ \(its singleflight\), terminated' "$work/err" || fail "stop: $(cat "$work/err")"
said=$(tr -d '\r' <"$work/err")
for _ in $(seq 50); do [ -z "$(tree_pids)$(sf_pids)" ] && break; sleep 0.1; done
[ -z "$(tree_pids)" ] || fail "the instance is alive after stop: $(tree_pids)"
[ -z "$(sf_pids)" ] || fail "the supervisor is alive after stop: $(sf_pids)"
[ ! -e "$run" ] || fail "the run record is left after stop"
status=0
sf -v stop svc 2>"$work/err" || status=$?
[ "$status" = 1 ] || fail "second stop (nothing running) exited $status, not 1"
grep -q 'svc: nothing running' "$work/err" || fail "second stop: $(cat "$work/err")"
echo "wine smoke: stop of a --service instance: supervisor and its tree gone: ok ($said)"

/usr/lib/wine/wineserver64 -k 2>/dev/null || true
rm -rf "$work"
