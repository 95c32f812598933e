# shellcheck shell=bash
# /var/vcap/jobs/postgresql-ha/helpers/repmgr_utils.sh of the simulated a9s-pg job, in the
# other convention seen on a9s-pg clusters: every function drops privileges ITSELF (wraps its
# repmgr/psql call in `chpst -u postgres:vcap`), so it must be called as root:
#   bash -c 'source .../vars.sh; source .../repmgr_utils.sh; register_master_node'
# Called as postgres (the runbook's literal text), chpst fails with
# `chpst: fatal: unable to setgroups: permission denied` (ClusterConfig.helper_privileges).

# Registers this node as the repmgr primary (`--force`: replaces an existing record).
register_master_node() {
    chpst -u postgres:vcap repmgr -f "$REPMGR_CONFIG" primary register --force
}

# Registers this (cloned, possibly not yet running) standby with the primary
# <node-id> <address>.
register_standby_node() {
    chpst -u postgres:vcap repmgr -f "$REPMGR_CONFIG" -h "$2" -p "$PGPORT" -U "$REPMGR_USER" \
        -d "$REPMGR_DB" standby register --force --upstream-node-id "$1"
}

# Prints "<node_id> <address>" of a peer registered as the active primary in its own
# repmgr.nodes and not in recovery; returns 1 if there is none right now.
find_registered_primary() {
    local peer row
    for peer in $PEER_ADDRESSES; do
        [ "$peer" = "$NODE_ADDRESS" ] && continue
        row=$(chpst -u postgres:vcap psql -X -q -t -A \
            "host=$peer port=$PGPORT dbname=$REPMGR_DB user=$REPMGR_USER connect_timeout=1" \
            -c "SELECT node_id FROM repmgr.nodes
                 WHERE type = 'primary' AND active
                   AND conninfo LIKE 'host=$peer %'
                   AND NOT pg_is_in_recovery()" 2>/dev/null) || continue
        if [ -n "$row" ]; then
            echo "$row $peer"
            return 0
        fi
    done
    return 1
}
