#!/usr/bin/env bash
# Entry point of the deltabkp image (docker/Dockerfile): one role per container.
#
#   keygen              create the shared cluster key $DELTABKP_KEY_FILE once (it lives in the
#                       cluster-key volume that every container mounts); never replace one
#   manager             deltabkp-server on 0.0.0.0:7470 over the catalog $BKP_CATALOG and the
#                       store $BKP_STORE (compose: the shared postgres and s3 services, S3
#                       endpoint and keys in the AWS_* variables, PGPASSWORD; lease TTL
#                       $BKP_LEASE_TTL); without them, SQLite + archives in /var/lib/deltabkp
#   echosv              an echo node: the echo app (port 7000, files in $ECHO_DATA_DIR), its
#                       deltabkp-agent (on $ECHO_NODE, default `hostname`:7471, the name the
#                       managers reach it by; allowed on $ECHO_DATA_DIR only, announcing
#                       itself to every manager in $BKP_SERVERS) and a load generator; then
#                       registers the app ONCE, through whichever manager of $BKP_SERVERS
#                       answers (`deltabkp ctl --server m1,m2,… register`): they share a catalog
#   healthcheck-echosv  exit 0 iff the echo app echoes and the agent accepts connections
#   anything else       run as given (e.g. `bash`)
#
# Invariants: an echo node runs while both its app and its agent run (if one dies the container
# exits and compose restarts it); registration retries until a manager accepts it, and a target
# that is already registered (a restarted node, or an answer lost on the way) counts as done;
# SIGTERM stops every child.
set -euo pipefail

KEY_FILE=${DELTABKP_KEY_FILE:-/etc/deltabkp/cluster.key}
export DELTABKP_KEY_FILE=$KEY_FILE
ECHO_DATA_DIR=${ECHO_DATA_DIR:-/data/echo}
ECHO_APP_DIR=${ECHO_APP_DIR:-/opt/deltabkp/echo}
ECHO_PORT=${ECHO_PORT:-7000}
AGENT_PORT=${AGENT_PORT:-7471}
# Inside a container every port is on the compose network; the tests run this script as plain
# local processes with LISTEN_HOST=127.0.0.1.
LISTEN_HOST=${LISTEN_HOST:-0.0.0.0}

log() { echo "[$(date -u +%FT%TZ)] $*" >&2; }

wait_for_key() {
    # The keygen container runs first (depends_on), but a hand-started container may not wait.
    for _ in $(seq 1 60); do
        [ -s "$KEY_FILE" ] && return 0
        sleep 1
    done
    log "no cluster key at $KEY_FILE (is the cluster-key volume mounted and initialised?)"
    exit 1
}

keygen() {
    if [ -s "$KEY_FILE" ]; then
        log "cluster key $KEY_FILE exists; kept"
        return 0
    fi
    mkdir -p "$(dirname "$KEY_FILE")"
    umask 077
    python -c 'import secrets; print(secrets.token_hex(32))' >"$KEY_FILE.tmp"
    mv "$KEY_FILE.tmp" "$KEY_FILE"
    log "created cluster key $KEY_FILE"
}

manager() {
    wait_for_key
    local shared=()
    # The catalog and store every manager shares (compose sets both); unset: SQLite + local files.
    [ -n "${BKP_CATALOG:-}" ] && shared+=(--catalog "$BKP_CATALOG")
    [ -n "${BKP_STORE:-}" ] && shared+=(--store "$BKP_STORE")
    [ -n "${BKP_S3_ENDPOINT:-}" ] && shared+=(--s3-endpoint "$BKP_S3_ENDPOINT")
    [ -n "${BKP_LEASE_TTL:-}" ] && shared+=(--lease-ttl "$BKP_LEASE_TTL")
    exec deltabkp-server --listen "$LISTEN_HOST:${MANAGER_PORT:-7470}" \
        --data-dir "${MANAGER_DATA_DIR:-/var/lib/deltabkp}" --key-file "$KEY_FILE" "${shared[@]}"
}

register_once() {
    # One registration for the whole cluster: the managers share one catalog, so whichever
    # answers first (ctl tries the comma-separated list in turn) registers it for all of them.
    local servers=$1 node=$2 out
    until out=$(deltabkp ctl --server "$servers" register "$node" "$ECHO_DATA_DIR" \
                    --every "${BKP_EVERY:-1}" 2>&1); do
        case $out in
            *"already registered"*)
                log "$node $ECHO_DATA_DIR was already registered (managers $servers)"
                return 0 ;;
        esac
        log "registering $node $ECHO_DATA_DIR through $servers failed: $out; retrying in 5 s"
        sleep 5
    done
    log "registered once, through $servers: $out"
}

echosv() {
    wait_for_key
    local node=${ECHO_NODE:-$(hostname):$AGENT_PORT}
    local servers=() s
    for s in ${BKP_SERVERS:-}; do servers+=(--server "$s"); done
    mkdir -p "$ECHO_DATA_DIR"

    python "$ECHO_APP_DIR"/echo_app.py --listen "$LISTEN_HOST:$ECHO_PORT" \
        --data-dir "$ECHO_DATA_DIR" --rotate-bytes "${ECHO_ROTATE_BYTES:-262144}" &
    local app=$!
    # The agent listens on the very name it is registered under (echosvN:7471 resolves to this
    # container's address): it announces that host:port, and the managers match the
    # announcement against registered node names, so pending retries run as soon as it is up.
    deltabkp-agent --listen "${AGENT_LISTEN:-$node}" --allow "$ECHO_DATA_DIR" \
        --key-file "$KEY_FILE" --cache-dir "${AGENT_CACHE_DIR:-/var/cache/deltabkp/agent}" \
        "${servers[@]}" &
    local agent=$!
    python "$ECHO_APP_DIR"/echo_load.py "127.0.0.1:$ECHO_PORT" --client "$(hostname)" \
        --rate "${ECHO_LOAD_RATE:-5}" --duration "${ECHO_LOAD_DURATION:-86400}" -q &
    local load=$!
    local registrars=() list
    # shellcheck disable=SC2086  # word-split on purpose: one comma between names
    list=$(echo ${BKP_SERVERS:-} | tr ' ' ',')
    if [ -n "$list" ]; then
        register_once "$list" "$node" &
        registrars+=($!)
    fi

    # shellcheck disable=SC2064  # expand the pids now
    trap "kill -TERM $app $agent $load ${registrars[*]} 2>/dev/null; wait; exit 0" TERM INT
    log "echo node $node: app pid $app, agent pid $agent, load pid $load; managers: ${BKP_SERVERS:-none}"
    # Either daemon ending ends the node (compose restarts it); the load generator may end.
    local rc=0
    wait -n "$app" "$agent" || rc=$?
    log "the echo app or the agent exited ($rc); stopping the node"
    kill -TERM "$app" "$agent" "$load" "${registrars[@]}" 2>/dev/null || true
    wait || true
    exit 1
}

healthcheck_echosv() {
    python "$ECHO_APP_DIR"/echo_load.py "127.0.0.1:$ECHO_PORT" --count 1 --timeout 3 \
        --connect-tries 1 --client healthcheck -q >/dev/null
    local node=${ECHO_NODE:-$(hostname):$AGENT_PORT}
    python -c "import socket, sys; h, _, p = sys.argv[1].rpartition(':'); socket.create_connection((h, int(p)), 3).close()" \
        "${AGENT_LISTEN:-$node}"
}

role=${1:-manager}
case $role in
    keygen) keygen ;;
    manager) manager ;;
    echosv) echosv ;;
    healthcheck-echosv) healthcheck_echosv ;;
    *) exec "$@" ;;
esac
