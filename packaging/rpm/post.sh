# %post: what %systemd_post does (the macros are not available where this
# package is built), then start the agent on a first install when the
# preset enabled it, as the .deb does.
if [ $1 -eq 1 ] && [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl --no-reload preset kvm-manager-agent.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ]; then
        /usr/bin/systemctl daemon-reload >/dev/null 2>&1 || :
        if /usr/bin/systemctl -q is-enabled kvm-manager-agent.service; then
            /usr/bin/systemctl start kvm-manager-agent.service >/dev/null 2>&1 || :
        fi
    fi
fi
