# %postun: what %systemd_postun_with_restart does: reload systemd, and on an
# upgrade restart the agent if it was running (try-restart).
if [ -x /usr/bin/systemctl ] && [ -d /run/systemd/system ]; then
    /usr/bin/systemctl daemon-reload >/dev/null 2>&1 || :
    if [ $1 -ge 1 ]; then
        /usr/bin/systemctl try-restart kvm-manager-agent.service >/dev/null 2>&1 || :
    fi
fi
# On erase, remove what the agent left behind (RPM keeps a changed
# config.toml as config.toml.rpmsave, as it does for every %config file).
if [ $1 -eq 0 ]; then
    rm -rf /var/lib/kvm-manager-agent /var/log/kvm-manager-agent
fi
