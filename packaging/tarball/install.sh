#!/bin/sh
# install.sh: install kvm-manager-agent from this tarball, for distributions
# without a package manager that knows it (use the .deb or .rpm where you can).
#
#   ./install.sh [--prefix DIR] [--destdir DIR] [--no-start]
#
# Installs the binary (PREFIX/bin), the man page (PREFIX/share/man/man8), the
# configuration (/etc/kvm-manager-agent/config.toml) and the systemd unit
# (/etc/systemd/system), then enables the unit and (re)starts it when systemd
# is running. PREFIX defaults to /usr/local. DESTDIR (also from the
# environment) installs into another root, as for a chroot or an image: the
# unit is enabled there, nothing is started.
#
# Running it again is harmless: it installs the same files again. A
# configuration you changed is never overwritten: the new default is written
# beside it as config.toml.new. uninstall.sh removes what this installed.
set -eu

NAME=kvm-manager-agent
here=$(cd "$(dirname "$0")" && pwd)
prefix=/usr/local
destdir=${DESTDIR:-}
start=yes

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
	case "$1" in
	--prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
	--prefix=*) prefix=${1#--prefix=}; shift ;;
	--destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
	--destdir=*) destdir=${1#--destdir=}; shift ;;
	--no-start) start=no; shift ;;
	-h|--help) usage; exit 0 ;;
	*) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix must be absolute" >&2; exit 2 ;; esac
destdir=${destdir%/}

bindir=$prefix/bin
mandir=$prefix/share/man/man8
confdir=/etc/$NAME
unitdir=/etc/systemd/system
statedir=/var/lib/$NAME/tarball
say() { echo "install.sh: $*"; }

if [ -z "$destdir" ] && [ "$(id -u)" != 0 ]; then
	echo "install.sh: run as root (or give --destdir)" >&2
	exit 1
fi

sha() { sha256sum "$1" | cut -d' ' -f1; }

# Copy $1 to $2 with mode $3, through a temporary file renamed into place (a
# running binary is replaced, not overwritten).
put() {
	mkdir -p "$(dirname "$2")"
	cp "$1" "$2.tmp.$$"
	chmod "$3" "$2.tmp.$$"
	chown 0:0 "$2.tmp.$$" 2>/dev/null || true
	mv -f "$2.tmp.$$" "$2"
}

put "$here/bin/$NAME" "$destdir$bindir/$NAME" 0755
say "installed $bindir/$NAME"
put "$here/man/$NAME.8.gz" "$destdir$mandir/$NAME.8.gz" 0644

# The unit, with ExecStart pointing at this prefix.
mkdir -p "$destdir$unitdir"
sed "s|^ExecStart=/usr/bin/$NAME|ExecStart=$bindir/$NAME|" "$here/systemd/$NAME.service" >"$destdir$unitdir/$NAME.service.tmp.$$"
chmod 0644 "$destdir$unitdir/$NAME.service.tmp.$$"
mv -f "$destdir$unitdir/$NAME.service.tmp.$$" "$destdir$unitdir/$NAME.service"
say "installed $unitdir/$NAME.service"

# The configuration: installed when absent; replaced when it is still the
# one a previous install.sh wrote (its sha256 is recorded); otherwise kept,
# with the new default beside it.
conf=$destdir$confdir/config.toml
mkdir -p "$destdir$confdir" "$destdir$statedir"
chmod 0755 "$destdir$confdir"
recorded=$destdir$statedir/config.toml.sha256
if [ ! -e "$conf" ]; then
	put "$here/etc/config.toml" "$conf" 0644
	say "installed $confdir/config.toml"
elif [ "$(sha "$conf")" = "$(sha "$here/etc/config.toml")" ]; then
	rm -f "$conf.new"
	say "kept $confdir/config.toml (same as the new default)"
elif [ -e "$recorded" ] && [ "$(sha "$conf")" = "$(cat "$recorded")" ]; then
	put "$here/etc/config.toml" "$conf" 0644
	say "updated $confdir/config.toml (you had not changed it)"
else
	put "$here/etc/config.toml" "$conf.new" 0644
	say "kept your changed $confdir/config.toml; the new default is $confdir/config.toml.new"
fi
sha "$here/etc/config.toml" >"$recorded"
# What uninstall.sh removes.
printf '%s\n' "$bindir/$NAME" "$mandir/$NAME.8.gz" "$unitdir/$NAME.service" >"$destdir$statedir/files"

wants=$unitdir/multi-user.target.wants
if [ -n "$destdir" ]; then
	# Another root: enable by hand (what systemctl enable would do), start nothing.
	mkdir -p "$destdir$wants"
	ln -sfn "$unitdir/$NAME.service" "$destdir$wants/$NAME.service"
	say "enabled $NAME.service in $destdir"
elif [ -d /run/systemd/system ]; then
	systemctl daemon-reload
	systemctl enable "$NAME.service" >/dev/null 2>&1
	if [ "$start" = yes ]; then
		systemctl restart "$NAME.service"
		say "enabled and (re)started $NAME.service"
	else
		say "enabled $NAME.service (not started: --no-start)"
	fi
elif command -v systemctl >/dev/null 2>&1; then
	# systemd installed but not running (a chroot, an image being built).
	systemctl enable "$NAME.service" >/dev/null 2>&1 || {
		mkdir -p "$wants"
		ln -sfn "$unitdir/$NAME.service" "$wants/$NAME.service"
	}
	say "enabled $NAME.service (systemd is not running: it starts at the next boot)"
else
	say "systemd not found: start $bindir/$NAME with your init system"
fi
