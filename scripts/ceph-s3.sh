#!/usr/bin/env bash
# A throw-away single-node Ceph (one mon, one OSD on memstore, one radosgw) on 127.0.0.1, for the tests.
#
#   scripts/ceph-s3.sh start DIR PORT   start it; prints `export NAME=value` lines (S3 endpoint and keys)
#   scripts/ceph-s3.sh stop DIR         stop the daemons by their pid files and remove DIR
#   scripts/ceph-s3.sh status DIR       rc 0 if all three daemons run
#
# Needs Debian's ceph-mon ceph-osd radosgw ceph-common (no ceph-mgr) and curl, python3, uuidgen.
# Everything (config, data, logs, pid files) lives in DIR; nothing in /etc/ceph; auth is off: test boxes only.
# What works on these machines, and why each setting is here, is recorded in ../shared/ceph/README.md.
set -euo pipefail

ACCESS_KEY=${CEPH_S3_ACCESS_KEY:-DACLAKETESTACCESSKEY}
SECRET_KEY=${CEPH_S3_SECRET_KEY:-daclaketestsecretkey00000000000000000000}
DAEMONS="client.rgw osd.0 mon.a"          # stop order
MARKER="# dac-lake scripts/ceph-s3.sh test cluster"
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

die() { echo "ceph-s3: $*" >&2; exit 1; }
alive() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$st" ] && [ "$st" != Z ]; }
# pid of daemon $2 of cluster $1, only if its command line names our ceph.conf (pids get recycled)
our_pid() {
    local pid; pid=$(cat "$1/run/$2.pid" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1/ceph.conf" || return 1
    echo "$pid"
}
launch() { # DIR NAME CMD...: Ceph daemons fork; wait for the child's pid file
    local dir=$1 name=$2; shift 2
    "$@" </dev/null >>"$dir/log/$name.out" 2>&1 || die "$name failed to start (see $dir/log)"
    for _ in $(seq 200); do our_pid "$dir" "$name" >/dev/null && return 0; sleep 0.05; done
    die "$name wrote no pid file (see $dir/log/$name.log)"
}
stop_daemons() {
    local pid n
    for n in $DAEMONS; do
        pid=$(our_pid "$1" "$n") || continue
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 200); do alive "$pid" || break; sleep 0.05; done
        if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
    done
}

start() {
    local dir=$1 port=$2 mon_port fsid osd_uuid t0=$SECONDS
    [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number"
    for b in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph curl python3 uuidgen; do
        command -v "$b" >/dev/null || die "$b not found: apt-get install ceph-mon ceph-osd radosgw ceph-common curl uuid-runtime"
    done
    [ -z "$(ls -A "$dir" 2>/dev/null)" ] || die "$dir is not empty (stop that cluster first)"
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && die "127.0.0.1:$port is in use"
    mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
    mkdir -p "$dir"/{mon,osd/osd.0,rgw,run,log,crash}
    : >"$dir/keyring"
    mon_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fsid=$(uuidgen); osd_uuid=$(uuidgen)
    cat >"$dir/ceph.conf" <<EOF
$MARKER
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$mon_port]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_ipv6 = false
# auth off needs every messenger mode at crc, else radosgw hangs asking for cephx
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
ms_mon_cluster_mode = crc
ms_mon_service_mode = crc
ms_client_mode = crc
ms_cluster_mode = crc
ms_service_mode = crc
keyring = $dir/keyring
run_dir = $dir/run
crash_dir = $dir/crash
log_file = $dir/log/\$name.log
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.asok
mon_data = $dir/mon/\$name
osd_data = $dir/osd/\$name
no_mon_config = true
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_max_pg_per_osd = 1000
mon_data_avail_crit = 1
[mon]
paxos_propose_interval = 0.1
paxos_min_wait = 0.01
[osd]
osd_objectstore = memstore
memstore_device_bytes = $(( ${CEPH_S3_STORE_GB:-8} * 1024 * 1024 * 1024 ))
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
osd_fast_shutdown = true
[client.rgw]
# tcp_nodelay: small GETs take ~44 ms without it (Nagle + delayed ACK)
rgw_frontends = beast endpoint=127.0.0.1:$port tcp_nodelay=1
rgw_data = $dir/rgw
rgw_thread_pool_size = 64
EOF
    cat >"$dir/env.sh" <<EOF
export CEPH_S3_DIR=$dir
export CEPH_CONF=$dir/ceph.conf
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export S3_ENDPOINT=127.0.0.1:$port
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
export AWS_REGION=us-east-1
export AWS_REQUEST_CHECKSUM_CALCULATION=when_required
export AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
export AWS_EC2_METADATA_DISABLED=true
export DAC_TEST_S3=1
EOF
    export CEPH_CONF=$dir/ceph.conf
    trap 'rc=$?; [ $rc -eq 0 ] || { stop_daemons "$dir"; echo "ceph-s3: start failed, logs in $dir/log" >&2; }' EXIT
    monmaptool --create --addv a "[v2:127.0.0.1:$mon_port]" --fsid "$fsid" "$dir/monmap" >/dev/null
    ceph-mon -i a --mkfs --monmap "$dir/monmap" >"$dir/log/mkfs-mon.log" 2>&1 || die "ceph-mon --mkfs failed"
    launch "$dir" mon.a ceph-mon -c "$CEPH_CONF" -i a
    ceph --connect-timeout 30 osd new "$osd_uuid" 0 >"$dir/log/osd-new.log" 2>&1 || die "ceph osd new failed"
    ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/mkfs-osd.log" 2>&1 || die "ceph-osd --mkfs failed"
    launch "$dir" osd.0 ceph-osd -c "$CEPH_CONF" -i 0
    launch "$dir" client.rgw radosgw -c "$CEPH_CONF" -n client.rgw
    local deadline=$((SECONDS + ${CEPH_S3_TIMEOUT:-120}))
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/" || true)" = 200 ]; do
        [ $SECONDS -lt $deadline ] || die "radosgw did not answer (see $dir/log)"
        sleep 0.1
    done
    radosgw-admin -n client.rgw user create --uid=dac --display-name="dac-lake tests" \
        --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >"$dir/log/user.json" 2>&1 || die "user create failed"
    until [ "$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
               -H "x-amz-content-sha256: $EMPTY_SHA256" --user "$ACCESS_KEY:$SECRET_KEY" \
               "http://127.0.0.1:$port/" || true)" = 200 ]; do
        [ $SECONDS -lt $deadline ] || die "S3 did not accept the keys (see $dir/log)"
        sleep 0.1
    done
    trap - EXIT
    echo "ceph-s3: S3 ready on 127.0.0.1:$port in $((SECONDS - t0)) s" >&2
    cat "$dir/env.sh"
}

stop() {
    local dir=$1
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd)
    head -1 "$dir/ceph.conf" 2>/dev/null | grep -qF "$MARKER" || die "$dir was not made by this script; not touching it"
    stop_daemons "$dir"
    rm -rf "$dir"
}

status() {
    local rc=0 n pid
    for n in $DAEMONS; do
        if pid=$(our_pid "$1" "$n"); then echo "$n running (pid $pid)"; else echo "$n not running"; rc=1; fi
    done
    return $rc
}

case "${1:-}" in
    start) [ $# -eq 3 ] || die "usage: $0 start DIR PORT"; start "$2" "$3" ;;
    stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
    status) [ $# -eq 2 ] || die "usage: $0 status DIR"; status "$(cd "$2" && pwd)" ;;
    *) die "usage: $0 start DIR PORT | stop DIR | status DIR" ;;
esac
