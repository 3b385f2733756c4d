#!/usr/bin/env bash
# The npm packages as a user installs them: `npm install -g` of the packed tarballs into a
# temporary prefix, offline, with an empty npm cache. Checks that
#   1. with install scripts, `singleflight` on that PATH is the native executable (ELF),
#      not node running the launcher, and a herd of callers through it gives one run;
#   2. with --ignore-scripts, the JavaScript launcher that stays passes the exit status
#      through, and SIGTERM to it stops the run's whole process tree, the launcher then
#      dying of SIGTERM itself.
# Needs the Linux packages of this machine's CPU: dist/build.sh <arch>-unknown-linux-musl npm.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dist="${CARGO_TARGET_DIR:-$root/target}/dist"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
case $(uname -m) in
x86_64) platform=linux-x64 ;;
aarch64) platform=linux-arm64 ;;
*) echo "test-npm: FAILED: no npm package for $(uname -m)" >&2; exit 1 ;;
esac
main_tgz="$dist/npm/singleflight-cli-singleflight-$version.tgz"
platform_tgz="$dist/npm/singleflight-cli-$platform-$version.tgz"
fail() { echo "test-npm: FAILED: $*" >&2; exit 1; }
for f in "$main_tgz" "$platform_tgz"; do
    [[ -f $f ]] || fail "no $f: run dist/build.sh $(uname -m)-unknown-linux-musl npm"
done
command -v npm > /dev/null || fail "npm is not installed"

work=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2> /dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
# Only this test's npm: no user config, an empty cache, no network.
export npm_config_userconfig="$work/npmrc" npm_config_cache="$work/npm-cache"
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false
: > "$work/npmrc"

install() { # PREFIX [npm options]...
    local prefix=$1
    shift
    npm install -g --prefix "$prefix" --offline "$@" "$platform_tgz" "$main_tgz" \
        > "$work/npm.log" 2>&1 || fail "npm install -g $*: $(cat "$work/npm.log")"
}

# Waits until the shell test [ "$@" ] holds: the deadline only bounds a failure.
wait_for() {
    local what=$1 i
    shift
    for ((i = 0; i < 3000; i++)); do
        if "$@"; then return 0; fi
        sleep 0.02
    done
    fail "gave up waiting for: $what"
}

# ---- 1. with install scripts: the native executable, one run for a herd ----------------
install "$work/p1" --allow-scripts=@singleflight-cli/singleflight
sf=$(PATH="$work/p1/bin:$PATH" command -v singleflight)
[[ $sf == "$work/p1/bin/singleflight" ]] || fail "singleflight on PATH is $sf"
real=$(readlink -f "$sf")
[[ $(head -c 4 "$real" | od -An -c | tr -d ' ') == '177ELF' ]] ||
    fail "$sf -> $real is not a native executable: $(head -c 40 "$real")"
cmp -s "$real" "$work/p1/lib/node_modules/@singleflight-cli/$platform/bin/singleflight" ||
    fail "$real is not the binary of @singleflight-cli/$platform"
"$sf" --version | grep -qx "singleflight $version" || fail "--version: $("$sf" --version)"
echo "test-npm: singleflight on PATH is the native executable ($real)"

export SINGLEFLIGHT_CACHE_DIR="$work/cache"
runs="$work/runs" gate="$work/gate"
script="echo run >> '$runs'; while [ ! -e '$gate' ]; do sleep 0.01; done; echo herd-output"
for i in $(seq 12); do
    PATH="$work/p1/bin:$PATH" singleflight herd --ttl 1h -- sh -c "$script" > "$work/herd$i" 2>&1 &
    pids+=($!)
done
wait_for "the herd's run to start" test -s "$runs"
touch "$gate"
for pid in "${pids[@]}"; do wait "$pid" || fail "a caller of the herd exited $?"; done
pids=()
[[ $(wc -l < "$runs") == 1 ]] || fail "$(wc -l < "$runs") runs for 12 callers"
for i in $(seq 12); do
    [[ $(cat "$work/herd$i") == herd-output ]] || fail "caller $i printed: $(cat "$work/herd$i")"
done
echo "test-npm: 12 callers through it, 1 run, all served"

# ---- 2. --ignore-scripts: the launcher stays, and behaves ------------------------------
install "$work/p2" --ignore-scripts
sf="$work/p2/bin/singleflight"
[[ $(head -n 1 "$(readlink -f "$sf")") == '#!/usr/bin/env node' ]] ||
    fail "with --ignore-scripts, $sf is not the launcher"
status=0
"$sf" exit7 --ttl 1h --cache-failures -- sh -c 'echo seven; exit 7' > "$work/out" || status=$?
[[ $status == 7 && $(cat "$work/out") == seven ]] || fail "launcher: exit $status, printed $(cat "$work/out")"
status=0
"$sf" exit7 --ttl 1h --cache-failures -- sh -c 'echo seven; exit 7' > "$work/out" || status=$?
[[ $status == 7 && $(cat "$work/out") == seven ]] || fail "launcher, hit: exit $status"
echo "test-npm: the launcher passes exit status 7 through (a run and a hit)"

# SIGTERM to the launcher (node) while a run is in flight: the command, its child and
# singleflight are gone, and the launcher died of SIGTERM (not merely exited 143).
tree="echo \$\$ > '$work/sh.pid'; sleep 600 & echo \$! > '$work/sleep.pid'; wait"
python3 - "$sf" "$tree" "$work" << 'PY' || fail "the launcher and SIGTERM (see above)"
import os, signal, subprocess, sys, time
sf, tree, work = sys.argv[1:]
def pid(name):
    with open(os.path.join(work, name)) as f:
        return int(f.read())
def alive(p):
    try:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
tree_pids = []
def give_up(why):
    # Leave nothing behind: the tree this test started, and the launcher.
    for p in tree_pids + [launcher.pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(f"test-npm: {why}")
def wait_for(what, cond):
    for _ in range(3000):   # 60 s: bounds a failure only
        if cond():
            return
        time.sleep(0.02)
    give_up(f"gave up waiting for: {what}")
launcher = subprocess.Popen([sf, "tree", "--timeout", "10m", "--kill-after", "2s", "--", "sh", "-c", tree])
wait_for("the run's tree", lambda: os.path.exists(os.path.join(work, "sleep.pid"))
         and os.path.getsize(os.path.join(work, "sleep.pid")) > 0)
tree_pids += [pid("sh.pid"), pid("sleep.pid")]
launcher.send_signal(signal.SIGTERM)
try:
    status = launcher.wait(timeout=60)
except subprocess.TimeoutExpired:
    give_up("the launcher did not end within 60 s of SIGTERM")
if status != -signal.SIGTERM:
    give_up(f"the launcher ended with {status}, not killed by SIGTERM")
wait_for(f"the run's tree {tree_pids} to be gone", lambda: not any(alive(p) for p in tree_pids))
print(f"test-npm: SIGTERM to the launcher: the run's tree {tree_pids} stopped, the launcher died of SIGTERM")
PY
echo "test-npm: ok"
