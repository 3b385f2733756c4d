#!/usr/bin/env bash
# Four figures of the fleet backend, each measured side by side in one run, with ratios.
# Not a test: it prints figures and asserts nothing about speed. It starts its own two
# one-member etcds on free loopback ports in a temp dir (one plain HTTP; one with TLS and
# authentication on, its certificates made by openssl) and stops them at the end. The
# load average is printed with the figures.
#
# 1. A fresh fleet hit: `singleflight --backend etcd://… NAME --ttl 1h -- CMD` served
#    from the machine's copy of the fleet's result (`NAME.fleet`, kept by the call that
#    read it from etcd), against a local hit of the same 10 KiB result (the target:
#    within 1.2x), the same fleet hit read from etcd (the copy removed before each run,
#    as every fleet hit was before the copy) and `etcdctl get` of the same key
#    (hyperfine).
# 2. The same hit read from etcd over TLS with a login (`etcd+https://`, --etcd-cacert,
#    --etcd-user), against the plain-HTTP read and `etcdctl get` with the same TLS and
#    login (hyperfine). Each run has the local copy removed first, so it asks etcd. The
#    hit uses the token a call before kept; tls-auth-login has it removed too before
#    each run, so it logs in (etcd checks the password with bcrypt), as etcdctl does.
# 3. Waking waiters: 20 callers with nothing cached on 3 "machines" (3 cache dirs) wait
#    for a run in flight; the time from the run's end to each waiter's exit, p50/p95/max
#    over ROUNDS rounds, woken by the watch on the lock key and, side by side, by the
#    old look every 100 ms (SINGLEFLIGHT_BENCH_POLL_WAIT=1, which only this script sets).
# 4. The fleet's read load: MACHINES "machines" (cache dirs) each call the same NAME
#    CALLS times, one call every EVERY_MS ms (a status line), --ttl FLEET_TTL seconds,
#    the command counting its runs in a file. etcd's requests (its /metrics:
#    grpc_server_started_total, which counts the JSON gateway's requests too; Range,
#    and all methods; not etcd_mvcc_range_total, which also counts a transaction's
#    compares) are counted for the whole schedule, with the local copy of the fleet's result (NAME.fleet) kept as
#    singleflight keeps it, and, side by side with the same schedule, with the copy
#    removed before every call (every call reads etcd, as before the copy existed);
#    against the figure of one read per machine per TTL, and how the calls were served.
#
#   bench/etcd.sh              # 1000 runs per command (300 for the TLS hits), 5 rounds
#   RUNS=2000 TLS_RUNS=500 ROUNDS=10 bench/etcd.sh
#   MACHINES=20 CALLS=100 EVERY_MS=100 FLEET_TTL=2 bench/etcd.sh  # section 4's defaults
#   SF_BIN=/path/to/singleflight bench/etcd.sh  # measure that binary, build nothing
#   SKIP_HITS=1 bench/etcd.sh  # skip sections 1 and 2
#   SKIP_WAKE=1 bench/etcd.sh  # skip section 3
#   SKIP_LOAD=1 bench/etcd.sh  # skip section 4
#   SKIP_HITS=1 SKIP_WAKE=1 bench/etcd.sh  # the read load only (~25 s, 10 s per mode)
#
# Installs what is missing: hyperfine, etcd-server and etcd-client, python3, openssl (apt).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
runs=${RUNS:-1000}
tls_runs=${TLS_RUNS:-300}
rounds=${ROUNDS:-5}
machines=${MACHINES:-20}
calls=${CALLS:-100}
every_ms=${EVERY_MS:-100}
fleet_ttl=${FLEET_TTL:-2}

say() { printf '%s\n' "$*" >&2; }

# report JSON LABEL...: each command's figures from hyperfine's JSON export (its
# commands in the order of the labels), then the first against each of the others.
report() {
    python3 - "$@" <<'PY'
import json, sys
path, labels = sys.argv[1], sys.argv[2:]
results = dict(zip(labels, json.load(open(path))["results"]))
def ms(r, key): return r[key] * 1000
width = max(map(len, labels))
for label in labels:
    r = results[label]
    print(f"  {label:{width}} mean {ms(r, 'mean'):8.3f} ms ± {ms(r, 'stddev'):.3f}  "
          f"median {ms(r, 'median'):8.3f} ms  min {ms(r, 'min'):8.3f} ms")
first, base = labels[0], results[labels[0]]
for label in labels[1:]:
    r = results[label]
    print(f"{first}/{label}: {base['median'] / r['median']:.2f}x (median), "
          f"{base['mean'] / r['mean']:.2f}x (mean), {base['min'] / r['min']:.2f}x (min); "
          f"difference of medians {ms(base, 'median') - ms(r, 'median'):+.3f} ms")
PY
}

apt_install() {
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get install -y -qq "$@" > /dev/null 2>&1 ||
        { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq "$@" > /dev/null; }
}

command -v hyperfine > /dev/null || { say "installing hyperfine"; apt_install hyperfine; }
command -v python3 > /dev/null || { say "installing python3"; apt_install python3; }
command -v openssl > /dev/null || { say "installing openssl"; apt_install openssl; }
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
tls_pid=
cleanup() {
    for pid in $etcd_pid $tls_pid; do
        # etcd dies of the SIGTERM: its status (143) is not this script's.
        { kill "$pid" && wait "$pid"; } 2> /dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
export SINGLEFLIGHT_CACHE_DIR="$work/sf-cache"
mkdir -m 700 "$SINGLEFLIGHT_CACHE_DIR"
unset SINGLEFLIGHT_BACKEND SINGLEFLIGHT_ETCD_PREFIX
export ETCDCTL_API=3

# Four free loopback ports (client and peer of each etcd), bound at once and released.
read -r client peer tls_client tls_peer < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
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

say "making certificates; starting etcd with TLS and authentication on 127.0.0.1:$tls_client"
certs="$work/certs"
mkdir "$certs"
(
    cd "$certs"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
        -out ca.pem -days 2 -subj /CN=bench-ca 2> /dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key \
        -out server.csr -subj /CN=etcd 2> /dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out server.pem -days 2 -extfile ext 2> /dev/null
)
/usr/bin/etcd --name tls --data-dir "$work/etcd-tls" \
    --listen-client-urls "https://127.0.0.1:$tls_client" \
    --advertise-client-urls "https://127.0.0.1:$tls_client" \
    --listen-peer-urls "http://127.0.0.1:$tls_peer" --initial-advertise-peer-urls "http://127.0.0.1:$tls_peer" \
    --initial-cluster "tls=http://127.0.0.1:$tls_peer" \
    --cert-file "$certs/server.pem" --key-file "$certs/server.key" --logger zap --log-level warn \
    > "$work/etcd-tls.log" 2>&1 &
tls_pid=$!
tls_ctl=(etcdctl --endpoints "https://127.0.0.1:$tls_client" --cacert "$certs/ca.pem")
for _ in $(seq 100); do
    "${tls_ctl[@]}" endpoint health > /dev/null 2>&1 && break
    sleep 0.1
done
"${tls_ctl[@]}" user add root --new-user-password bench-pw > /dev/null
"${tls_ctl[@]}" auth enable > /dev/null 2>&1
tls_backend="etcd+https://127.0.0.1:$tls_client"
tls_env=(env SINGLEFLIGHT_ETCD_CACERT="$certs/ca.pem" SINGLEFLIGHT_ETCD_USER=root
    SINGLEFLIGHT_ETCD_PASSWORD=bench-pw)

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
"${tls_env[@]}" "$sf" --backend "$tls_backend" bench --ttl 1h -- cat "$small" > /dev/null
"${tls_env[@]}" "$sf" -v --backend "$tls_backend" bench --ttl 1h -- cat "$small" 2> "$work/decision" |
    cmp -s - "$small" || { say "a TLS hit did not print the cached bytes"; exit 1; }
grep -q '^singleflight.*fresh.*: served$' "$work/decision" ||
    { say "not a fresh TLS hit: $(cat "$work/decision")"; exit 1; }
"${tls_ctl[@]}" --user root:bench-pw get --print-value-only "$key" > "$work/value"
[[ $(stat -c %s "$work/value") -gt 10240 ]] || { say "etcdctl get (TLS) found no result"; exit 1; }

if [[ -z ${SKIP_HITS:-} ]]; then
say "measuring: $runs runs each"
copy="$SINGLEFLIGHT_CACHE_DIR/bench.fleet"
"$sf" --backend "$backend" bench --ttl 1h -- cat "$small" > /dev/null
[[ -f $copy ]] || { say "the fleet hit kept no local copy ($copy)"; exit 1; }
hyperfine -N --warmup 100 --runs "$runs" --style basic --export-json "$work/hit.json" \
    -p true -n fleet-hit "$sf --backend $backend bench --ttl 1h -- cat $small" \
    -p true -n local-hit "$sf bench --ttl 1h -- cat $small" \
    -p "rm -f $copy" -n fleet-hit-from-etcd "$sf --backend $backend bench --ttl 1h -- cat $small" \
    -p true -n etcdctl "etcdctl --endpoints 127.0.0.1:$client get --print-value-only $key" >&2

echo
echo "== 10 KiB result, $runs runs each (hyperfine -N), $(uname -sr), $(nproc) CPUs," \
    "load $(cut -d' ' -f1-3 /proc/loadavg), $(etcd --version | head -1) =="
echo "fleet-hit: from the local copy; fleet-hit-from-etcd: the copy removed before each run"
report "$work/hit.json" fleet-hit local-hit fleet-hit-from-etcd etcdctl

say "measuring the TLS hit: $tls_runs runs each"
# The login's token is kept in the cache dir between calls; removed before each run of
# tls-auth-login, that one logs in every time (as every call did before it was kept).
forget_token="sh -c 'rm -f $copy $SINGLEFLIGHT_CACHE_DIR/etcd-*.token'"
hyperfine -N --warmup 20 --runs "$tls_runs" --style basic --export-json "$work/tls.json" \
    -p "rm -f $copy" -n tls-auth-hit "${tls_env[*]} $sf --backend $tls_backend bench --ttl 1h -- cat $small" \
    -p "$forget_token" -n tls-auth-login "${tls_env[*]} $sf --backend $tls_backend bench --ttl 1h -- cat $small" \
    -p "rm -f $copy" -n plain-hit "$sf --backend $backend bench --ttl 1h -- cat $small" \
    -p true -n etcdctl-tls-auth "${tls_ctl[*]} --user root:bench-pw get --print-value-only $key" >&2

echo
echo "== the same hit read from etcd over TLS with a login, $tls_runs runs each =="
report "$work/tls.json" tls-auth-hit tls-auth-login plain-hit etcdctl-tls-auth

fi

if [[ -z ${SKIP_WAKE:-} ]]; then
say "measuring the waiters' wake-up: $rounds rounds of 20 waiters on 3 cache dirs, watch and poll"
echo
echo "== 20 waiters on 3 machines, the run's end to each waiter's exit, $rounds rounds each =="
python3 - "$sf" "$backend" "$work" "$rounds" "127.0.0.1:$client" <<'PY'
import base64, json, os, subprocess, sys, threading, time, urllib.request
sf, backend, work, rounds, metrics = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
caches = [os.path.join(work, f"machine{i}") for i in range(3)]
for d in caches:
    os.makedirs(d, mode=0o700, exist_ok=True)

def watchers():
    text = urllib.request.urlopen(f"http://{metrics}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith("etcd_debugging_mvcc_watcher_total "):
            return float(line.split()[1])
    return 0.0

def watch_release(name, seen):
    """Records when etcd tells a watcher that NAME's lock was deleted (the release)."""
    key = base64.b64encode(f"/singleflight/{name}/lock".encode()).decode()
    body = json.dumps({"create_request": {"key": key}}).encode()
    with urllib.request.urlopen(f"http://{metrics}/v3/watch", data=body) as stream:
        for line in stream:
            events = json.loads(line).get("result", {}).get("events", [])
            if any(e.get("type") == "DELETE" for e in events):
                seen.append(time.time_ns())
                return

def call(cache, name, script, poll, out):
    env = dict(os.environ, SINGLEFLIGHT_CACHE_DIR=cache, SINGLEFLIGHT_BACKEND=backend)
    env.pop("SINGLEFLIGHT_BENCH_POLL_WAIT", None)
    if poll:
        env["SINGLEFLIGHT_BENCH_POLL_WAIT"] = "1"
    with open(out, "wb") as stdout:
        return subprocess.Popen([sf, name, "--timeout", "1h", "--", "sh", "-c", script],
                                env=env, stdout=stdout, stderr=subprocess.STDOUT)

def round_of(mode, i):
    name, poll = f"wake-{mode}-{i}", mode == "poll"
    gate, end, started = (os.path.join(work, f"{name}.{x}") for x in ("gate", "end", "started"))
    script = (f"touch '{started}'; while [ ! -e '{gate}' ]; do sleep 0.002; done; "
              f"date +%s%N > '{end}'; echo out")
    outs = [os.path.join(work, f"{name}.out{k}") for k in range(21)]
    winner = call(caches[0], name, script, poll, outs[20])
    while not os.path.exists(started):
        time.sleep(0.005)
    waiters = [call(caches[k % 3], name, script, poll, outs[k]) for k in range(20)]
    seen = []
    watcher = threading.Thread(target=watch_release, args=(name, seen))
    watcher.start()
    # Every waiter is waiting: watching the lock, or (polling) given the same time.
    deadline = time.time() + 30
    while not poll and watchers() < 21 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)
    open(gate, "w").close()
    # One thread blocked in waitpid notes each exit as it happens (no reader threads
    # taking turns at the interpreter lock between an exit and its stamp).
    exited = {}
    while len(exited) < 21:
        pid, status = os.waitpid(-1, 0)
        exited[pid] = (time.time_ns(), os.waitstatus_to_exitcode(status))
    for proc, out in zip(waiters + [winner], outs[:20] + [outs[20]]):
        proc.returncode = exited[proc.pid][1]
        text = open(out, "rb").read()
        assert proc.returncode == 0 and text == b"out\n", (proc.returncode, text)
    exits = [exited[w.pid][0] for w in waiters]
    won = exited[winner.pid][0]
    watcher.join()
    ended = int(open(end).read())
    winners.append((won - ended) / 1e6)
    released.append((seen[0] - ended) / 1e6)
    after_release.setdefault(mode, []).extend((e - seen[0]) / 1e6 for e in exits)
    return [(e - ended) / 1e6 for e in exits]

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

figures, winners, released, after_release = {}, [], [], {}
for i in range(rounds):
    for mode in ("watch", "poll"):
        figures.setdefault(mode, []).extend(round_of(mode, i))
for mode in ("watch", "poll"):
    xs = figures[mode]
    print(f"  {mode:5}  n={len(xs)}  p50 {pct(xs, 50):7.1f} ms  p95 {pct(xs, 95):7.1f} ms  "
          f"max {max(xs):7.1f} ms")
print(f"  (the winner lets go of the lock p50 {pct(released, 50):.1f} ms after its run's end, "
      f"and itself exits p50 {pct(winners, 50):.1f} ms after that end: its guard and tree clean-up)")
w, p = figures["watch"], figures["poll"]
print(f"watch/poll: {pct(w, 50) / pct(p, 50):.2f}x (p50), {pct(w, 95) / pct(p, 95):.2f}x (p95)")
print("the lock's release (as a watcher saw it) to each waiter's exit:")
for mode in ("watch", "poll"):
    xs = after_release[mode]
    print(f"  {mode:5}  n={len(xs)}  p50 {pct(xs, 50):7.1f} ms  p95 {pct(xs, 95):7.1f} ms  "
          f"max {max(xs):7.1f} ms")
w, p = after_release["watch"], after_release["poll"]
print(f"watch/poll: {pct(w, 50) / pct(p, 50):.2f}x (p50), {pct(w, 95) / pct(p, 95):.2f}x (p95)")
PY

fi

if [[ -z ${SKIP_LOAD:-} ]]; then
say "measuring the fleet's read load: $machines machines x $calls calls every $every_ms ms," \
    "--ttl ${fleet_ttl}s, with the local copy and without"
echo
echo "== the fleet's read load: $machines machines x $calls calls, one every $every_ms ms each," \
    "--ttl ${fleet_ttl}s, load $(cut -d' ' -f1-3 /proc/loadavg) =="
python3 - "$sf" "$backend" "$work" "$small" "127.0.0.1:$client" \
    "$machines" "$calls" "$every_ms" "$fleet_ttl" <<'PY'
import os, re, subprocess, sys, threading, time, urllib.request
sf, backend, work, small, metrics = sys.argv[1:6]
machines, calls, every, ttl = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]) / 1000, float(sys.argv[9])
expected_out = open(small, "rb").read()
STARTED = re.compile(r'^grpc_server_started_total\{grpc_method="([^"]+)",grpc_service="([^"]+)"')

def requests():
    """etcd's gRPC requests so far by method (the JSON gateway's go through gRPC)."""
    text = urllib.request.urlopen(f"http://{metrics}/metrics").read().decode()
    counts = {}
    for line in text.splitlines():
        m = STARTED.match(line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + float(line.split()[-1])
    return counts

def kind(stderr, served_copy):
    """How a call was served, from its -v line (and whether NAME.fleet was left as it was)."""
    if "ran the command" in stderr:
        return "ran"
    if "waited for the run in flight" in stderr:
        return "waited"
    if re.search(r": fresh \(ttl [^)]*\): served$", stderr.strip()):
        return "copy" if served_copy else "etcd-fresh"
    return "other"

def machine(mode, name, counter, index, start, kinds, failures, others):
    cache = os.path.join(work, f"load-{mode}-{index}")
    os.makedirs(cache, mode=0o700)
    env = dict(os.environ, SINGLEFLIGHT_CACHE_DIR=cache)
    copy = os.path.join(cache, f"{name}.fleet")
    argv = [sf, "-v", "--backend", backend, name, "--ttl", f"{ttl:g}s", "--",
            "sh", "-c", f"echo run >> '{counter}'; cat '{small}'"]
    def stat():
        try:
            st = os.stat(copy)
            return (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            return None
    for k in range(calls):
        # The same schedule in both modes; machines spread over the interval.
        delay = start + index * every / machines + k * every - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if mode == "no-copy":
            try:
                os.remove(copy)
            except FileNotFoundError:
                pass
        before = stat()
        p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        err = p.stderr.decode(errors="replace")
        if p.returncode != 0 or p.stdout != expected_out:
            failures.append(f"{mode} machine {index} call {k}: exit {p.returncode}, "
                            f"{len(p.stdout)} bytes out; {err.strip()}")
        kinds.append(kind(err, before is not None and before == stat()))
        if kinds[-1] == "other":
            others.append(err.strip().replace(f"singleflight: {name}: ", ""))

figures = {}
for mode in ("copy", "no-copy"):
    name, counter = f"load-{mode}", os.path.join(work, f"load-{mode}.runs")
    open(counter, "w").close()
    kinds, failures, others = [], [], []
    before = requests()
    start = time.monotonic() + 0.2
    threads = [threading.Thread(target=machine,
                                args=(mode, name, counter, i, start, kinds, failures, others))
               for i in range(machines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.monotonic() - start
    after = requests()
    if failures:
        sys.exit(f"{len(failures)} calls failed, e.g. {failures[0]}")
    delta = {m: after.get(m, 0) - before.get(m, 0) for m in after}
    figures[mode] = dict(
        calls=len(kinds), runs=sum(1 for _ in open(counter)), duration=duration,
        range=delta.get("Range", 0), all=sum(delta.values()),
        methods={m: n for m, n in delta.items() if n},
        others={o: others.count(o) for o in sorted(set(others))},
        kinds={k: kinds.count(k) for k in ("copy", "etcd-fresh", "ran", "waited", "other")})

print(f"  {'mode':8} {'calls':>6} {'runs':>5} {'range':>7} {'all':>7} {'range/call':>11} "
      f"{'range/machine/TTL':>18} {'duration':>9}")
for mode, f in figures.items():
    ttls = f["duration"] / ttl
    print(f"  {mode:8} {f['calls']:6} {f['runs']:5} {f['range']:7.0f} {f['all']:7.0f} "
          f"{f['range'] / f['calls']:11.3f} {f['range'] / (machines * ttls):18.2f} "
          f"{f['duration']:8.2f}s")
for mode, f in figures.items():
    expected = machines * f["duration"] / ttl
    print(f"  {mode}: one read per machine per TTL would be {machines} x "
          f"{f['duration']:.2f} s / {ttl:g} s = {expected:.0f} range requests; "
          f"one per machine per result written, {machines} x {f['runs']} runs = "
          f"{machines * f['runs']}")
a, b = figures["copy"], figures["no-copy"]
print(f"no-copy/copy: {b['range'] / a['range']:.2f}x (range requests), "
      f"{b['all'] / a['all']:.2f}x (all requests)")
print("requests by method (copy / no-copy):")
for m in sorted(set(a["methods"]) | set(b["methods"])):
    print(f"  {m:14} {a['methods'].get(m, 0):6.0f} / {b['methods'].get(m, 0):6.0f}")
print("how the calls were served (copy / no-copy): from the local copy, a fresh result read "
      "from etcd, ran the command, waited for a run in flight, other:")
for k in ("copy", "etcd-fresh", "ran", "waited", "other"):
    print(f"  {k:10} {a['kinds'][k]:6} / {b['kinds'][k]:6}")
for mode, f in figures.items():
    for text, n in f["others"].items():
        print(f"  other ({mode}), {n}x: {text}")
PY
fi
