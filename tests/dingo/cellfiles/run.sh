#!/bin/bash
# Entrypoint of the simulated Dingo PostgreSQL container (image dingo-postgresql:15), started by
# the cell's `docker` stand-in as its own process group, as root, with the container's
# environment (like dingo-postgresql-release's images/postgresql95-patroni/scripts/run.sh):
#   NAME, PATRONI_SCOPE (the service instance GUID), ETCD_HOST_PORT, WAL_S3_BUCKET,
#   WALE_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, PG_PORT,
#   DATA_DIR (the host path of the container's /data volume).
#
# What Patroni + restore_leader_if_missing.sh do for a solo instance, in one script:
#   - local database exists            -> start it; /initialize must match its system id
#   - no local database, no leader:
#       no base backup in the archive  -> initdb, /initialize := sysid (the first base
#                                         backup and sysids/sysid follow, see below)
#       base backups exist             -> /initialize := sysids/sysid when absent ("preparing
#                                         patroni to restore this container from wal-e
#                                         backups"), backup-fetch LATEST, replay the archive
#   - a restored or started database whose system id differs from /initialize is refused
#     (Patroni: "system ID mismatch, node belongs to a different cluster"), and so is one
#     behind /optime/leader (it would not take the leader lock); the container exits 1.
#   - then it holds /leader (ttl, refreshed) and /optime/leader; SIGTERM stops PostgreSQL
#     (fast) and releases /leader.
set -uo pipefail

: "${NAME:?}" "${PATRONI_SCOPE:?}" "${ETCD_HOST_PORT:?}" "${WAL_S3_BUCKET:?}" \
    "${WALE_S3_ENDPOINT:?}" "${PG_PORT:?}" "${DATA_DIR:?}"
IMAGE_DIR=/var/vcap/packages/dingo-postgresql-image
PG_BIN=/usr/lib/postgresql/15/bin
PG_DATA_DIR=$DATA_DIR/postgres0
SOCKET_DIR=$DATA_DIR/run
export WALE_ENV_DIR=$DATA_DIR/wal-e/env
export WALE_S3_PREFIX="s3://${WAL_S3_BUCKET}/backups/${PATRONI_SCOPE}/wal/"
ETCD="http://${ETCD_HOST_PORT}/v2/keys/service/${PATRONI_SCOPE}"
LEADER_TTL=10
PG_PID=

log() { echo "$1> $(date --iso-8601=seconds) ${*:2}"; }
as_postgres() { chpst -u postgres:postgres "$@"; }
wale() { as_postgres "$IMAGE_DIR/wal-e" "$@"; }

etcd_get() { # value of key $1, exit 1 when absent
    local out
    out=$(curl -sS --max-time 5 "$ETCD/$1") || return 2
    jq -er '.node.value // empty' <<<"$out" 2>/dev/null
}
etcd_put() { # key value [ttl]
    curl -sS --max-time 5 -XPUT "$ETCD/$1" --data-urlencode "value=$2" ${3:+-d "ttl=$3"} \
        >/dev/null
}
etcd_del() { curl -sS --max-time 5 -XDELETE "$ETCD/$1" >/dev/null; }

sysid_of() { "$PG_BIN/pg_controldata" "$1" | awk -F': *' '/Database system identifier/ {print $2}'; }
psql_c() { as_postgres "$PG_BIN/psql" -X -qtA -h "$SOCKET_DIR" -p "$PG_PORT" -d postgres -c "$1"; }
lsn_int() { # current WAL position as a byte number (Patroni's xlog_location)
    psql_c "SELECT (pg_current_wal_lsn() - '0/0')::bigint"
}

die() {
    log startup "FATAL: $*"
    stop_postgres
    exit 1
}

stop_postgres() {
    if [ -n "$PG_PID" ] && kill -0 "$PG_PID" 2>/dev/null; then
        kill -INT "$PG_PID" 2>/dev/null # fast shutdown
        wait "$PG_PID" 2>/dev/null
    fi
    PG_PID=
}

write_envdir() {
    install -d -m 0700 -o postgres -g postgres "$DATA_DIR/wal-e" "$WALE_ENV_DIR"
    local var
    for var in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION WALE_S3_ENDPOINT \
        WALE_S3_PREFIX WAL_S3_BUCKET PATRONI_SCOPE ETCD_HOST_PORT; do
        printf '%s\n' "${!var:-}" >"$WALE_ENV_DIR/$var"
    done
    chown postgres:postgres "$WALE_ENV_DIR"/*
    chmod 0600 "$WALE_ENV_DIR"/*
}

write_config() {
    # Container settings in an include file (the data directory comes from a base backup,
    # which carries no configuration: tar partitions exclude the config files).
    cat >"$PG_DATA_DIR/container.conf" <<EOF
listen_addresses = '*'
port = $PG_PORT
unix_socket_directories = '$SOCKET_DIR'
max_connections = 30
shared_buffers = 16MB
wal_level = replica
archive_mode = on
archive_command = '/usr/bin/python3 $IMAGE_DIR/walcmd.py --envdir $WALE_ENV_DIR push "%p" "%f"'
archive_timeout = 60
restore_command = '/usr/bin/python3 $IMAGE_DIR/walcmd.py --envdir $WALE_ENV_DIR fetch "%f" "%p"'
max_wal_size = 128MB
min_wal_size = 32MB
EOF
    grep -q "^include_if_exists = 'container.conf'" "$PG_DATA_DIR/postgresql.conf" 2>/dev/null ||
        echo "include_if_exists = 'container.conf'" >>"$PG_DATA_DIR/postgresql.conf"
    [ -f "$PG_DATA_DIR/pg_hba.conf" ] || cat >"$PG_DATA_DIR/pg_hba.conf" <<EOF
local all all trust
host all all 0.0.0.0/0 scram-sha-256
EOF
    chown postgres:postgres "$PG_DATA_DIR/container.conf" "$PG_DATA_DIR/postgresql.conf" \
        "$PG_DATA_DIR/pg_hba.conf"
}

start_postgres() {
    install -d -m 0700 -o postgres -g postgres "$SOCKET_DIR"
    # In the foreground of this process group (no pg_ctl: it would setsid the postmaster out
    # of the container, and `docker stop`'s SIGKILL must reach it).
    # chpst directly, not through a function: a backgrounded function is a subshell, and
    # $! must be the postmaster itself (chpst execs it).
    chpst -u postgres:postgres "$PG_BIN/postgres" -D "$PG_DATA_DIR" &
    PG_PID=$!
    local _
    for _ in $(seq 600); do
        "$PG_BIN/pg_isready" -q -U postgres -h "$SOCKET_DIR" -p "$PG_PORT" && return 0
        kill -0 "$PG_PID" 2>/dev/null || die "postgres exited during start-up"
        sleep 0.2
    done
    die "postgres did not accept connections within 120 s"
}

wait_promoted() {
    local _
    for _ in $(seq 1800); do
        [ "$(psql_c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ] && return 0
        kill -0 "$PG_PID" 2>/dev/null || die "postgres exited during recovery"
        sleep 0.2
    done
    die "recovery did not finish within 360 s"
}

on_term() {
    log patroni "SIGTERM received; shutting down"
    stop_postgres
    [ "$(etcd_get leader)" = "$NAME" ] && etcd_del leader
    etcd_del "members/$NAME"
    log patroni "stopped"
    exit 0
}
trap on_term TERM

log startup "container $NAME for service $PATRONI_SCOPE, data $PG_DATA_DIR, port $PG_PORT"
write_envdir

mode=start
leader=$(etcd_get leader)
if [ -d "$PG_DATA_DIR/global" ]; then
    log restore_leader_if_missing "local database exists; no additional preparation required" \
        "to restart container"
elif [ -n "$leader" ] && [ "$leader" != "$NAME" ]; then
    die "leader $leader exists; a solo container cannot clone from it"
else
    backups=$(wale backup-list) || die "cannot list the archive $WALE_S3_PREFIX"
    if [ "$(wc -l <<<"$backups")" -lt 2 ]; then
        log restore_leader_if_missing "new cluster, no existing backup to restore"
        mode=init
    else
        if ! etcd_get initialize >/dev/null; then
            log restore_leader_if_missing "etcd missing /initialize system ID, fetching from" \
                "${WALE_S3_PREFIX}sysids"
            sysid=$(wale sysid-fetch) ||
                die "Target ${WALE_S3_PREFIX} missing /sysids/sysid for original 'Database system identifier'"
            etcd_put initialize "$sysid" || die "cannot write /initialize"
        fi
        log restore_leader_if_missing "preparing patroni to restore this container from wal-e backups"
        mode=restore
    fi
fi

case $mode in
init)
    if etcd_get initialize >/dev/null; then
        die "cluster is initialized (/initialize set) but has no leader and no backup to restore"
    fi
    rm -rf "$PG_DATA_DIR"
    install -d -m 0700 -o postgres -g postgres "$PG_DATA_DIR"
    as_postgres "$PG_BIN/initdb" -D "$PG_DATA_DIR" -U postgres --auth-local=trust \
        >/dev/null || die "initdb failed"
    write_config
    start_postgres
    sysid=$(sysid_of "$PG_DATA_DIR")
    etcd_put initialize "$sysid" || die "cannot write /initialize"
    # The image's regular_backup.sh takes the first base backup (and writes sysids/sysid)
    # once the database runs; here that is the test world's base-backup maker
    # (tests/wale/archive.py: make_base_backup), driven by the host (tests/dingo/cell.py).
    ;;
restore)
    rm -rf "$PG_DATA_DIR"
    install -d -m 0700 -o postgres -g postgres "$PG_DATA_DIR"
    wale backup-fetch "$PG_DATA_DIR" LATEST || die "backup-fetch LATEST failed"
    chown -R postgres:postgres "$PG_DATA_DIR"
    chmod 0700 "$PG_DATA_DIR"
    write_config
    touch "$PG_DATA_DIR/recovery.signal"
    chown postgres:postgres "$PG_DATA_DIR/recovery.signal"
    start_postgres
    wait_promoted
    log patroni "restored from the archive and promoted"
    ;;
start)
    write_config
    start_postgres
    ;;
esac

sysid=$(sysid_of "$PG_DATA_DIR")
if initialize=$(etcd_get initialize); then
    [ "$initialize" = "$sysid" ] ||
        die "system ID mismatch, node $NAME belongs to a different cluster: $sysid != $initialize"
else
    etcd_put initialize "$sysid"
fi
position=$(lsn_int)
if optime=$(etcd_get optime/leader) && [ "$optime" -gt "$position" ]; then
    die "WAL position $position is behind the last leader's $optime (/optime/leader);" \
        "refusing to take the leader lock"
fi
log patroni "acquired the leader lock as $NAME (system id $sysid)"
while :; do
    etcd_put leader "$NAME" "$LEADER_TTL" || log patroni "cannot refresh /leader"
    etcd_put "members/$NAME" "{\"role\":\"master\",\"state\":\"running\",\"port\":$PG_PORT}" \
        "$LEADER_TTL"
    position=$(lsn_int 2>/dev/null) && etcd_put optime/leader "$position"
    kill -0 "$PG_PID" 2>/dev/null || die "postgres exited"
    sleep 2 &
    wait $!
done
