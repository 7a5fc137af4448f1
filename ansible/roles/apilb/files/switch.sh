#!/bin/sh
# The switch of a node's API endpoint between the old haproxy.service and
# apilb.service, as one command on the node: no Ansible round trip widens
# the gap in which the port refuses connections. Run by the apilb role
# (tasks/service.yml: the cut-over and its automatic rollback;
# tasks/absent.yml: the rollback), measured by scripts/test-migration.
#
#   switch.sh to-apilb PORT MASK_HAPROXY START_HAPROXY_ON_FAILURE
#   switch.sh to-haproxy PORT START_HAPROXY
#
# to-apilb: stops haproxy.service (its HAProxy closes the port at once: a
# hard stop, so its connections are cut), starts apilb.service, which
# returns once apilb's HAProxy accepts connections (Type=notify), then masks
# haproxy.service (when MASK_HAPROXY is yes) so nothing starts it again. If
# apilb does not start, it starts haproxy.service again (when
# START_HAPROXY_ON_FAILURE is yes; unmasked if it was masked), says why and
# exits 3.
#
# to-haproxy: unmasks haproxy.service, stops apilb (its HAProxy closes the
# port at once; then a second SIGTERM makes the agent stop HAProxy now
# instead of letting connections drain for up to 10s, which would delay
# the start of haproxy.service, ordered after the stop) and starts
# haproxy.service when START_HAPROXY is yes. If haproxy.service does not
# start, apilb is started again (the node keeps an endpoint) and it exits 3.
#
# apilb.service has Conflicts=haproxy.service and After=haproxy.service
# (starting one stops the other first); the explicit stops here keep the
# order the same with a unit from an older package.
set -eu

log() { echo "switch: $*" >&2; }
since=$(date +%s)

# True while a socket listens on PORT, on any address: a LISTEN (0A) line
# of /proc/net/tcp{,6} with that local port. grep stops at the first match;
# these files also list every connection, thousands on a busy node.
listening() {
    grep -qE ":$(printf '%04X' "$1") [0-9A-F]+:0000 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Waits until PORT listens (WANT=yes) or not (no), for at most SECONDS_MAX
# seconds; false on timeout.
wait_port() { # port want seconds_max
    deadline=$(($(date +%s) + $3 + 1))
    while :; do
        if listening "$1"; then [ "$2" = yes ] && return 0; else [ "$2" = no ] && return 0; fi
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.01
    done
}

# Waits until apilb.service is inactive or failed, at most SECONDS_MAX.
wait_apilb_stopped() { # seconds_max
    deadline=$(($(date +%s) + $1 + 1))
    while :; do
        case "$(systemctl show --property=ActiveState --value apilb.service)" in
            inactive | failed) return 0 ;;
        esac
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.01
    done
}

exists() { # unit: installed (loaded) or masked
    case "$(systemctl show --property=LoadState --value "$1" 2>/dev/null)" in
        loaded | masked) return 0 ;;
        *) return 1 ;;
    esac
}

kill_whom() {
    v=$(systemctl --version | awk 'NR == 1 { print $2 }')
    if [ "${v:-0}" -ge 252 ] 2>/dev/null; then echo --kill-whom=main; else echo --kill-who=main; fi
}

# Stops apilb.service and every process left in its cgroup (an HAProxy of an
# agent that died while starting). When apilb served PORT, waits until the
# port is free.
stop_apilb() { # port
    case "$(systemctl show --property=ActiveState --value apilb.service)" in
        inactive | failed) ;;
        *)
            served=no
            listening "$1" && served=yes
            systemctl stop --no-block apilb.service
            if [ "$served" = yes ]; then
                # The agent's HAProxy closes its listeners on the first SIGTERM ...
                wait_port "$1" no 15 || log "WARNING: port $1 still listens 15s after stopping apilb"
                # ... and stops at once on a second one (no drain of up to 10s).
                systemctl kill "$(kill_whom)" --signal=SIGTERM apilb.service 2>/dev/null || true
            fi
            wait_apilb_stopped 30 || log "WARNING: apilb.service is still $(systemctl show --property=ActiveState --value apilb.service) 30s after the stop"
            ;;
    esac
    systemctl kill --signal=SIGKILL apilb.service 2>/dev/null || true
    systemctl reset-failed apilb.service 2>/dev/null || true
}

case "${1:-}" in
    to-apilb)
        port=$2 mask=$3 restart_old=$4
        old=no
        if exists haproxy.service; then
            old=yes
            systemctl stop haproxy.service
        fi
        if systemctl start apilb.service; then
            # Masked once apilb serves: the daemon-reload a mask implies is
            # then outside the window in which the port refuses connections.
            if [ "$old" = yes ] && [ "$mask" = yes ]; then
                systemctl mask haproxy.service 2>/dev/null
            fi
            log "apilb serves port $port"
            exit 0
        fi
        result=$(systemctl show --property=Result --value apilb.service)
        # The old service first, the diagnosis after: every step here is
        # time in which the port refuses connections.
        stop_apilb "$port"
        wait_port "$port" no 10 || log "WARNING: port $port still listens after apilb stopped"
        if [ "$old" = yes ]; then
            if [ "$(systemctl show --property=LoadState --value haproxy.service)" = masked ]; then
                systemctl unmask haproxy.service >/dev/null 2>&1 || true
            fi
            if [ "$restart_old" = yes ]; then
                systemctl start haproxy.service
                wait_port "$port" yes 10 || log "WARNING: haproxy.service started but port $port does not listen"
                log "rolled back: haproxy.service serves port $port again"
            fi
        fi
        log "apilb did not start ($result); journalctl -u apilb:"
        journalctl -u apilb.service --since "@$since" -n 15 --no-pager -o cat >&2 || true
        exit 3
        ;;
    to-haproxy)
        port=$2 start_old=$3
        # Before the stop: the daemon-reload an unmask implies stays out of
        # the window in which the port refuses connections.
        if [ "$(systemctl show --property=LoadState --value haproxy.service)" = masked ]; then
            systemctl unmask haproxy.service >/dev/null 2>&1 || true
        fi
        stop_apilb "$port"
        if [ "$start_old" = yes ]; then
            if ! systemctl start haproxy.service || ! wait_port "$port" yes 10; then
                log "haproxy.service did not serve port $port; starting apilb again"
                journalctl -u haproxy.service --since "@$since" -n 15 --no-pager -o cat >&2 || true
                systemctl start apilb.service || log "WARNING: apilb did not start either: nothing serves port $port"
                exit 3
            fi
            log "haproxy.service serves port $port"
        fi
        exit 0
        ;;
    *)
        echo "usage: switch.sh to-apilb PORT MASK START_OLD_ON_FAILURE | to-haproxy PORT START_OLD" >&2
        exit 2
        ;;
esac
