# shellcheck shell=bash
# /var/vcap/jobs/postgresql-ha/helpers/repmgr_utils.sh of the simulated a9s-pg job.
#
# Sourced after vars.sh. The runbook calls `register_master_node` exactly like this:
#   chpst -u postgres:vcap bash -c 'source .../vars.sh; source .../repmgr_utils.sh; \
#                                   register_master_node;'
# so these functions run as postgres and rely only on what vars.sh exports.

# Registers this node as the repmgr primary. `--force` overwrites an existing record, which is
# what a re-registration after the runbook's TRUNCATE of the repmgr schema needs.
register_master_node() {
    repmgr -f "$REPMGR_CONFIG" primary register --force
}

# Registers this (cloned, possibly not yet running) standby with the primary
# <node-id> <address>. `--force` registers a standby that is not running yet (repmgr then
# needs the primary's connection parameters) and replaces a stale record.
register_standby_node() {
    repmgr -f "$REPMGR_CONFIG" -h "$2" -p "$PGPORT" -U "$REPMGR_USER" -d "$REPMGR_DB" \
        standby register --force --upstream-node-id "$1"
}

# Prints "<node_id> <address>" of a peer that is registered as the active primary in its own
# repmgr.nodes and is not in recovery; returns 1 if there is none right now.
#
# Checking the registration, not only pg_is_in_recovery(), avoids a race seen in the
# prototype: a standby found a freshly started primary before it had registered, cloned it,
# and its `standby register` then failed.
find_registered_primary() {
    local peer row
    for peer in $PEER_ADDRESSES; do
        [ "$peer" = "$NODE_ADDRESS" ] && continue
        row=$(psql -X -q -t -A \
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
