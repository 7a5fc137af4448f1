# %post of apilb ($1: 1 = install, 2 or more = upgrade).
#
# Same policy as the .deb: apilb is enabled and started only when
# /etc/apilb/apilb.yaml differs from the shipped example and `apilb check`
# accepts it (the example's masters are placeholders). An upgrade hands a
# running agent over to the new binary (SIGUSR2; HAProxy keeps serving,
# Restart=always starts the new binary, which adopts it) instead of
# `systemctl try-restart`, which would stop HAProxy.
UNIT=apilb.service
CONFIG=/etc/apilb/apilb.yaml
EXAMPLE=/usr/share/apilb/apilb.yaml

log() { echo "apilb: $*" >&2; }

config_ready() {
    [ -f "$CONFIG" ] || return 1
    if cmp -s "$CONFIG" "$EXAMPLE"; then
        return 1
    fi
    if ! out=$(PATH="$PATH:/usr/sbin:/sbin" /usr/bin/apilb check --config "$CONFIG" 2>&1); then
        log "$CONFIG is not valid, so apilb is not enabled or started:"
        printf '%s\n' "$out" | sed 's/^/apilb:   /' >&2
        return 1
    fi
    return 0
}

handover() {
    old_pid=$(systemctl show --property=MainPID --value "$UNIT" 2>/dev/null || echo 0)
    version=$(systemctl --version 2>/dev/null | awk 'NR == 1 { print $2 }')
    who=--kill-who=main
    if [ "${version:-0}" -ge 252 ] 2>/dev/null; then
        who=--kill-whom=main
    fi
    log "handing the running agent (pid $old_pid) over to the new binary; HAProxy keeps serving"
    systemctl kill "$who" --signal=SIGUSR2 "$UNIT" || { log "WARNING: could not signal $UNIT"; return 0; }
    i=0
    while [ "$i" -lt 60 ]; do
        state=$(systemctl show --property=ActiveState --value "$UNIT" 2>/dev/null || true)
        pid=$(systemctl show --property=MainPID --value "$UNIT" 2>/dev/null || true)
        if [ "$state" = active ] && [ -n "$pid" ] && [ "$pid" != 0 ] && [ "$pid" != "$old_pid" ]; then
            log "the new agent (pid $pid) runs; HAProxy was not restarted"
            return 0
        fi
        sleep 1
        i=$((i + 1))
    done
    log "WARNING: apilb is not active 60s after the handover (HAProxy keeps serving); see journalctl -u apilb"
    return 0
}

if [ "$1" -eq 1 ] && [ -d /etc/apilb ]; then
    chmod 0750 /etc/apilb
fi
ready=no
if config_ready; then
    ready=yes
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    pid=$(systemctl show --property=MainPID --value "$UNIT" 2>/dev/null || echo 0)
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    if [ "$1" -ge 2 ] && systemctl --quiet is-active "$UNIT" 2>/dev/null && [ "$pid" != 0 ] && [ "$uid" = 0 ]; then
        # From a release that ran as root: the new agent (user apilb)
        # cannot adopt a root HAProxy. One restart, said loudly.
        log "apilb now runs as the apilb user, not root: restarting it once."
        log "  The node's connections through its endpoint drop once; later upgrades hand over."
        systemctl restart "$UNIT" || log "WARNING: apilb did not restart; see journalctl -u apilb"
    elif [ "$1" -ge 2 ] && systemctl --quiet is-active "$UNIT" 2>/dev/null; then
        handover
    elif [ "$1" -eq 1 ] && [ "$ready" = yes ]; then
        # Conflicts=haproxy.service: a running haproxy.service is stopped
        # first (docs/migration.md).
        systemctl enable --now "$UNIT" >/dev/null 2>&1 || log "WARNING: could not start $UNIT; see journalctl -u apilb"
        if [ "$(systemctl is-enabled haproxy.service 2>/dev/null || true)" = enabled ]; then
            log "WARNING: haproxy.service is still enabled; starting it stops apilb. Keep it stopped with:"
            log "  systemctl mask haproxy.service"
        fi
    fi
elif [ "$1" -eq 1 ] && [ "$ready" = yes ]; then
    systemctl enable "$UNIT" >/dev/null 2>&1 || true
fi
if [ "$1" -eq 1 ] && [ "$ready" = no ]; then
    log "installed but not enabled: edit $CONFIG (at least the masters),"
    log "  check it with: apilb check --config $CONFIG"
    log "  then run:      systemctl enable --now apilb"
fi
exit 0
