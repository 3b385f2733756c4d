#!/usr/bin/env bash
# The PostgreSQL backend's cached hit, side by side in one hyperfine run: a local hit of a
# 10 KiB result; the same hit through PostgreSQL served from the machine's local copy
# (`NAME.fleet`) and read from the server (the copy removed before each run; TCP on
# loopback, scram-sha-256 login, no TLS); `psql -c 'select 1'` to the same server the
# same way; and the same hit through a plain-HTTP etcd, from the copy and from etcd. Not a test: it prints figures and asserts nothing about speed. It
# starts its own PostgreSQL (Debian's, initdb as the postgres user into a temp dir) and
# etcd on free loopback ports and stops them at the end.
#
#   bench/postgres.sh                     # 300 runs each
#   RUNS=1000 SF_BIN=/path/to/singleflight bench/postgres.sh
#   LOCAL_ONLY_BIN=/path/to/local-only/singleflight bench/postgres.sh
#       # adds the local hit of a --no-default-features build beside the default one
#
# Needs hyperfine, postgresql, etcd-server (apt-get install hyperfine postgresql etcd-server).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
runs=${RUNS:-300}
bin=${SF_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release -q
    bin=$root/target/release/singleflight
fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tmp=$(mktemp -d /tmp/sf-pgbench.XXXX)
chmod 755 "$tmp"
pgdir=$tmp/pg
mkdir "$pgdir"
echo bench > "$pgdir/pw"
chown -R postgres:postgres "$pgdir"
pgport=$(free_port)
etcdport=$(free_port)
etcdpeer=$(free_port)
cleanup() {
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$pgdir/data" -m immediate stop >/dev/null 2>&1 || true
    [ -n "${etcd_pid:-}" ] && kill "$etcd_pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
(cd /tmp && runuser -u postgres -- "$pgbin/initdb" -D "$pgdir/data" -U postgres \
    --auth-local=trust --auth-host=scram-sha-256 --pwfile="$pgdir/pw" >/dev/null)
(cd /tmp && runuser -u postgres -- "$pgbin/pg_ctl" -w -D "$pgdir/data" -l "$pgdir/log" \
    -o "-p $pgport -k $pgdir -c listen_addresses=127.0.0.1" start >/dev/null)
etcd --data-dir "$tmp/etcd" --listen-client-urls "http://127.0.0.1:$etcdport" \
    --advertise-client-urls "http://127.0.0.1:$etcdport" \
    --listen-peer-urls "http://127.0.0.1:$etcdpeer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcdpeer" \
    --initial-cluster "default=http://127.0.0.1:$etcdpeer" >"$tmp/etcd.log" 2>&1 &
etcd_pid=$!
export PGPASSWORD=bench PGPASSFILE=/dev/null
pg="postgres://postgres@127.0.0.1:$pgport/postgres?sslmode=disable"
etcd="etcd://127.0.0.1:$etcdport"
head -c 7500 /dev/urandom | base64 -w 100 > "$tmp/result"
cmd=(cat "$tmp/result")
for i in $(seq 50); do "$bin" --backend "$etcd" status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin" --cache-dir "$tmp/c1" bench --ttl 1h -- "${cmd[@]}" >/dev/null
"$bin" --cache-dir "$tmp/c2" --backend "$pg" bench --ttl 1h -- "${cmd[@]}" >/dev/null
"$bin" --cache-dir "$tmp/c3" --backend "$etcd" bench --ttl 1h -- "${cmd[@]}" >/dev/null
extra=()
if [ -n "${LOCAL_ONLY_BIN:-}" ]; then
    "$LOCAL_ONLY_BIN" --cache-dir "$tmp/c4" bench --ttl 1h -- "${cmd[@]}" >/dev/null
    extra=(-p true -n local-hit-without-backends "$LOCAL_ONLY_BIN --cache-dir $tmp/c4 bench --ttl 1h -- ${cmd[*]}")
fi
echo "load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
# Each command has its own --prepare: the from-server ones remove the local copy first.
hyperfine -N -w 20 -r "$runs" \
    -p true -n local-hit "$bin --cache-dir $tmp/c1 bench --ttl 1h -- ${cmd[*]}" \
    "${extra[@]}" \
    -p true -n postgres-hit "$bin --cache-dir $tmp/c2 --backend $pg bench --ttl 1h -- ${cmd[*]}" \
    -p "rm -f $tmp/c2/bench.fleet" -n postgres-hit-from-server \
    "$bin --cache-dir $tmp/c2 --backend $pg bench --ttl 1h -- ${cmd[*]}" \
    -p true -n psql-select-1 "psql $pg -Atc 'select 1'" \
    -p true -n etcd-hit "$bin --cache-dir $tmp/c3 --backend $etcd bench --ttl 1h -- ${cmd[*]}" \
    -p "rm -f $tmp/c3/bench.fleet" -n etcd-hit-from-etcd \
    "$bin --cache-dir $tmp/c3 --backend $etcd bench --ttl 1h -- ${cmd[*]}"
