# %postun of apilb ($1: 0 = erase, 1 = upgrade). No try-restart on upgrade:
# the new package's %post already handed the agent over without stopping
# HAProxy. rpm keeps an edited /etc/apilb/apilb.yaml as .rpmsave on erase;
# /var/lib/apilb (HAProxy's server state) is left in place like other
# packages' data.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
