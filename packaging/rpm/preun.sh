# %preun: what %systemd_preun does: on erase (not upgrade), disable and stop.
if [ $1 -eq 0 ] && [ -x /usr/bin/systemctl ]; then
    /usr/bin/systemctl --no-reload disable --now kvm-manager-agent.service >/dev/null 2>&1 || :
fi
