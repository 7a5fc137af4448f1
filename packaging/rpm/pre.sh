# %pre of apilb: the apilb system user that apilb.service runs as (the
# sysusers.d file in the package says the same, for systemd-sysusers).
getent group apilb >/dev/null || groupadd --system apilb
getent passwd apilb >/dev/null || useradd --system --gid apilb --no-create-home \
    --home-dir /nonexistent --shell /sbin/nologin --comment "apilb node-local Kubernetes API load balancer" apilb
exit 0
