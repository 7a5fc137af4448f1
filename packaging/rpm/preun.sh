# %preun of apilb ($1: 0 = erase, 1 = upgrade). On erase, stop and disable
# the service (this stops HAProxy gracefully). On upgrade it keeps running;
# the new package's %post hands it over to the new binary.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl disable --now apilb.service >/dev/null 2>&1 || true
    else
        systemctl disable apilb.service >/dev/null 2>&1 || true
    fi
fi
exit 0
