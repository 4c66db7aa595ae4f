#!/bin/sh
# uninstall.sh: remove what install.sh installed.
#
#   ./uninstall.sh [--destdir DIR] [--purge]
#
# Stops and disables the unit, removes the binary, the man page and the unit.
# The configuration is removed when you never changed it; a changed one is
# kept unless --purge, which also removes /etc/kvm-manager-agent entirely and
# the agent's state and logs (/var/lib/kvm-manager-agent,
# /var/log/kvm-manager-agent). DESTDIR (also from the environment) works on
# another root, as install.sh --destdir.
set -eu

NAME=kvm-manager-agent
destdir=${DESTDIR:-}
purge=no

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
	case "$1" in
	--destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
	--destdir=*) destdir=${1#--destdir=}; shift ;;
	--purge) purge=yes; shift ;;
	-h|--help) usage; exit 0 ;;
	*) echo "uninstall.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
destdir=${destdir%/}

confdir=/etc/$NAME
unitdir=/etc/systemd/system
statedir=/var/lib/$NAME/tarball
say() { echo "uninstall.sh: $*"; }

if [ -z "$destdir" ] && [ "$(id -u)" != 0 ]; then
	echo "uninstall.sh: run as root (or give --destdir)" >&2
	exit 1
fi

if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
	systemctl disable --now "$NAME.service" >/dev/null 2>&1 || true
	say "stopped and disabled $NAME.service"
fi
rm -f "$destdir$unitdir/multi-user.target.wants/$NAME.service"

files=$destdir$statedir/files
if [ -e "$files" ]; then
	list=$(cat "$files")
else
	# No record (an older install.sh): the default prefix.
	list="/usr/local/bin/$NAME /usr/local/share/man/man8/$NAME.8.gz $unitdir/$NAME.service"
fi
for f in $list; do
	if [ -e "$destdir$f" ]; then
		rm -f "$destdir$f"
		say "removed $f"
	fi
done
if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
fi

conf=$destdir$confdir/config.toml
recorded=$destdir$statedir/config.toml.sha256
if [ "$purge" = yes ]; then
	rm -rf "$destdir$confdir" "$destdir/var/lib/$NAME" "$destdir/var/log/$NAME"
	say "purged $confdir, /var/lib/$NAME and /var/log/$NAME"
	exit 0
fi
if [ -e "$conf" ] && [ -e "$recorded" ] && [ "$(sha256sum "$conf" | cut -d' ' -f1)" = "$(cat "$recorded")" ]; then
	rm -f "$conf" "$conf.new"
	rmdir "$destdir$confdir" 2>/dev/null || true
	say "removed $confdir/config.toml (unchanged)"
elif [ -e "$conf" ]; then
	say "kept your changed $confdir/config.toml (--purge removes it)"
fi
rm -rf "$destdir$statedir"
rmdir "$destdir/var/lib/$NAME" 2>/dev/null || true
