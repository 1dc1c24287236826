#!/usr/bin/env bash
# Instructions per proxied request on each side of the tunnel, counted by
# callgrind: deterministic, so a change's effect shows on a busy machine
# where wall-clock numbers drown in noise.
#
#   client (curl, keep-alive) ──► uplink-hub ══tunnel══► uplink ──► nginx
#                                 (callgrind)            (callgrind)
#
# Usage: tests/benches/callgrind.sh [BINDIR]   (default target/prof/release)
# Build BINDIR with symbols, e.g.
#   CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
#     cargo build --release --bins --target-dir target/prof
# Env: N (requests measured, default 2000), P (concurrent connections,
# default 1), PER_THREAD=1 (with WRK: figures per thread), KEEP=1 keeps the work dir with
# the callgrind.out files for callgrind_annotate, HTTP1=1 makes curl speak
# HTTP/1.1 to the hub (as the e2e bench's client and wrk do; kubectl and
# curl otherwise negotiate h2).
# Needs nginx, valgrind, openssl, curl, python3.
set -euo pipefail
BIN=$(realpath "${1:-target/prof/release}")
N=${N:-2000}
dir=$(mktemp -d /tmp/uplink-callgrind.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$dir"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# nginx with a private CA, serving the 2.5 KB JSON answer.
cd "$dir"
chmod 755 "$dir" # nginx workers run as another user
mkdir -p www tmp
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem \
    -subj /CN=bench-ca -days 2 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem -out leaf.csr \
    -subj /CN=127.0.0.1 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >ext
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 -extfile ext 2>/dev/null
python3 -c '
import json
items=[{"metadata":{"name":"web-%05d"%i,"namespace":"default","labels":{"app":"web"}},
        "status":{"phase":"Running","podIP":"10.42.0.%d"%(10+i)}} for i in range(12)]
b=json.dumps({"apiVersion":"v1","kind":"PodList","items":items})
open("www/small.json","w").write(b.ljust(2500))'
ngport=$(free_port)
cat >nginx.conf <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx.err warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/tmp;
    keepalive_requests 10000000;
    server {
        listen 127.0.0.1:$ngport ssl;
        ssl_certificate $dir/cert.pem;
        ssl_certificate_key $dir/key.pem;
        root $dir/www;
        default_type application/json;
    }
}
EOF
nginx -p "$dir" -e "$dir/nginx.err" -c "$dir/nginx.conf" &
pids+=($!)

# The hub, under callgrind.
hubport=$(free_port)
hub="https://127.0.0.1:$hubport"
vg() { # $1 side, then the command: under callgrind unless WRK is set
    local side=$1
    shift
    if [ -n "${WRK:-}" ]; then exec "$@"; else exec valgrind --tool=callgrind --callgrind-out-file="$dir/$side.cg" "$@"; fi
}
vg hub "$BIN/uplink-hub" serve \
    --listen "127.0.0.1:$hubport" --public-url "$hub" --data-dir "$dir/hub" >hub.out 2>hub.log &
pids+=($!)
hubpid=$!
for _ in $(seq 600); do grep -q '^hub CA:' hub.out 2>/dev/null && break; sleep 0.1; done
admin=$(sed -n 's/^admin token.*: //p' hub.out)
api() { curl -sf --cacert "$dir/hub/ca.pem" -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' "$@"; }
api -X POST -d '{"name":"bench"}' "$hub/api/v1/clusters" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["systemd_activation"])' >activation.json
token=$(api -X POST -d '{"name":"bench","groups":["bench"]}' "$hub/api/v1/users" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
api -X POST -d '{"user":"bench","clusters":"bench"}' "$hub/api/v1/grants" >/dev/null
echo bench-agent-token >kube-token

# The agent, under callgrind.
vg agent "$BIN/uplink" run \
    --activation activation.json --state state --kube-url "https://127.0.0.1:$ngport" \
    --kube-token-file kube-token --kube-ca ca.pem --health-addr "127.0.0.1:$(free_port)" 2>agent.log &
pids+=($!)
agentpid=$!
for _ in $(seq 600); do
    api "$hub/api/v1/clusters/bench" | grep -q '"ACTIVE"' && break
    sleep 0.2
done

get() { # $1 requests on one keep-alive connection (P of them with P=N)
    curl -sf ${HTTP1:+--http1.1} ${P:+--parallel --parallel-max "$P"} --cacert "$dir/hub/ca.pem" -H "Authorization: Bearer $token" \
        "$hub/k8s/clusters/bench/small.json?[1-$1]" >/dev/null
}
get 200 # warm up: pools, caches, allocator
if [ -n "${WRK:-}" ]; then
    # Wall clock instead: wrk with WRK connections for 5 s, syscalls and
    # context switches per request on each side from perf stat.
    for side in hub agent; do
        pid=$([ $side = hub ] && echo "$hubpid" || echo "$agentpid")
        perf stat -x, ${PER_THREAD:+--per-thread} -e raw_syscalls:sys_enter,context-switches,task-clock -p "$pid" -o "$dir/$side.stat" -- sleep 5 &
        [ -z "${STRACE:-}" ] || timeout -s INT 5 strace -c -f -p "$pid" -o "$STRACE.$side" &
        [ -z "${PERF_RECORD:-}" ] || perf record -F 2000 -g -p "$pid" -o "$PERF_RECORD.$side" -- sleep 5 2>/dev/null &
    done
    wrk -t$((WRK < 2 ? 1 : 2)) -c"$WRK" -d5s -H "Authorization: Bearer $token" "$hub/k8s/clusters/bench/small.json" | tee wrk.out
    wait %% 2>/dev/null || sleep 1
    sleep 1
    reqs=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' wrk.out)
    for side in hub agent; do
        if [ -n "${PER_THREAD:-}" ]; then
            awk -F, -v side=$side -v n="$reqs" '$4 ~ /sys_enter|context-switches|task-clock/ {printf "%s %s: %s %.4f per request\n", side, $1, $4, $2 / n}' "$dir/$side.stat"
        else
            awk -F, -v side=$side -v n="$reqs" '$3 ~ /sys_enter|context-switches|task-clock/ {printf "%s: %s %.4f per request\n", side, $3, $1 / n}' "$dir/$side.stat"
        fi
    done
    exit 0
fi
callgrind_control -z "$hubpid" >/dev/null
callgrind_control -z "$agentpid" >/dev/null
get "$N"
callgrind_control -d "$hubpid" >/dev/null
callgrind_control -d "$agentpid" >/dev/null
sleep 1
for side in hub agent; do
    f=$(ls -t "$dir/$side.cg"* | grep -v '\.cg$' | head -1)
    ir=$(sed -n 's/^summary: //p' "$f" | awk '{print $1}')
    echo "$side: $((ir / N)) instructions per request ($N requests; $f)"
done
