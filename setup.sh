#!/usr/bin/env bash
# Set up xdpflow on a fresh Debian 12 / Ubuntu 22.04+ machine, as root, then optionally run
# the demo or the tests:
#   bash setup.sh          set up only
#   bash setup.sh demo     set up, then run the agent on a demo lab (xdpflow-lab demo)
#   bash setup.sh test     set up, then run the whole test suite (all tiers)
# Running it twice is quick and changes nothing the second time.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)
venv="$here/.venv"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }
step="start"
# Under set -e a failing command would end the script without a word: name the step, the
# command and the line instead.
trap 'rc=$?; printf "setup: error: step \"%s\" failed (exit %s) at line %s: %s\n" "$step" "$rc" "$LINENO" "$BASH_COMMAND" >&2; exit "$rc"' ERR

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages, mounts bpffs and attaches XDP programs)"

# --- packages -------------------------------------------------------------------------
step="packages"
pkgs=(python3 python3-venv python3-pip python3-bpfcc iproute2 iptables nftables
      ethtool netsniff-ng tcpdump iputils-ping systemd prometheus procps kmod util-linux)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${pkgs[@]}"; do
  installed "$p" || missing+=("$p")
done
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    say "apt-get update"
    apt-get update -qq >/dev/null
    apt_updated=1
  fi
  say "installing: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# libbpf is libbpf1 on Debian 12 / Ubuntu 24.04 and libbpf0 on Ubuntu 22.04: which one
# the archive has is only known after an update.
if ! installed libbpf1 && ! installed libbpf0; then
  [ "$apt_updated" = 1 ] || { say "apt-get update"; apt-get update -qq >/dev/null; apt_updated=1; }
  if apt-cache show libbpf1 >/dev/null 2>&1; then missing+=(libbpf1); else missing+=(libbpf0); fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
else
  say "packages: all ${#pkgs[@]} present"
fi
# Debian's prometheus package starts a server on install; xdpflow only needs promtool.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# --- kernel headers for BCC ---------------------------------------------------------
step="kernel headers"
kver=$(uname -r)
mod="/lib/modules/$kver"
if [ -e "$mod/build/include/linux/kconfig.h" ] || [ -e "$mod/build/include/generated/autoconf.h" ]; then
  say "kernel $kver: headers found at $mod/build"
else
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1 ||
     { [ "$apt_updated" = 0 ] && apt-get update -qq >/dev/null && apt_updated=1 &&
       apt-cache show "linux-headers-$kver" >/dev/null 2>&1; }; then
    apt_install "linux-headers-$kver"
    say "kernel $kver: installed its own headers"
  else
    generic=""
    for cand in linux-headers-amd64 linux-headers-arm64 linux-headers-generic; do
      if apt-cache show "$cand" >/dev/null 2>&1; then generic=$cand; break; fi
    done
    [ -n "$generic" ] || die "kernel $kver has no headers package and no distribution headers package was found"
    dpkg-query -W -f='${Status}' "$generic" 2>/dev/null | grep -q "install ok installed" || apt_install "$generic"
    # The newest arch-specific header tree (…-amd64 on Debian, …-generic on Ubuntu).
    # (a glob that matches nothing expands to nothing, not to itself: ls would exit 2)
    trees=()
    shopt -s nullglob
    for t in /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 /usr/src/linux-headers-*-generic; do
      trees+=("$t")
    done
    shopt -u nullglob
    build=""
    [ "${#trees[@]}" -eq 0 ] || build=$(printf '%s\n' "${trees[@]}" | sort -V | tail -n 1)
    [ -n "$build" ] || die "no header tree under /usr/src after installing $generic"
    ver=${build#/usr/src/linux-headers-}
    base=${ver%-*}
    if [ -d "/usr/src/linux-headers-$base-common" ]; then src="/usr/src/linux-headers-$base-common"
    elif [ -d "/usr/src/linux-headers-$base" ]; then src="/usr/src/linux-headers-$base"
    else src="$build"; fi
    mkdir -p "$mod"
    ln -sfn "$build" "$mod/build"
    ln -sfn "$src" "$mod/source"
    say "kernel $kver has no headers package; using $ver headers ($build): fine for XDP, which only uses UAPI structs"
  fi
fi

# --- filesystems --------------------------------------------------------------------
step="filesystems"
if ! mountpoint -q /sys/fs/bpf; then mount -t bpf bpf /sys/fs/bpf; say "mounted bpffs on /sys/fs/bpf"; fi
if [ -d /sys/kernel/tracing ] && ! mountpoint -q /sys/kernel/tracing; then
  mount -t tracefs tracefs /sys/kernel/tracing && say "mounted tracefs on /sys/kernel/tracing"
fi

# --- python environment ---------------------------------------------------------------
step="python environment"
# Debian's python3 (not a pyenv one) so that BCC from python3-bpfcc is importable.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  say "made virtual environment $venv (sees Debian's bcc)"
fi
stamp="$venv/.xdpflow-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # (this image's pip config names local mirrors that may be absent: hide those warnings)
  "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test]" \
    2> >(grep -v "^WARNING: Location" >&2)
  echo "$want" > "$stamp"
  say "installed xdpflow and its test extras into $venv"
else
  say "xdpflow already installed in $venv"
fi

case "${1:-}" in
  "") say "done. Run: bash setup.sh demo   or   bash setup.sh test" ;;
  demo) shift; exec "$venv/bin/xdpflow-lab" demo "$@" ;;
  test) shift; exec "$venv/bin/python" -m pytest "$@" ;;
  *) die "unknown command '$1' (use: demo, test, or nothing)" ;;
esac
