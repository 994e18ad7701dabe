#!/usr/bin/env bash
# Set up xdpflow on a fresh Debian 12 / Ubuntu 22.04+ machine, as root, then optionally run
# the demo or the tests:
#   bash setup.sh          set up only
#   bash setup.sh demo     set up, then run the agent on a demo lab (xdpflow-lab demo)
#   bash setup.sh test     set up, then run the whole test suite (all tiers, .ci/tiers)
#   bash setup.sh test ARGS...   set up, then pytest ARGS (e.g. -m unit)
# Running it twice is quick and changes nothing the second time (it says so).
# Works without a terminal (CI: no stdin, CI=true).
#
# set -E: the ERR trap also fires inside functions and command substitutions, where a
# failing command would otherwise end the script without a word.
set -Eeuo pipefail
cd "$(dirname "$0")"
here=$(pwd)
venv="$here/.venv"
# Output of the quiet commands (apt, pip), shown when one of them fails.
log=$(mktemp /tmp/xdpflow-setup.XXXXXX)
trap 'rm -f "$log"' EXIT

step="start"
changed=()   # what this run changed, for the closing line

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: step "%s": %s\n' "$step" "$*" >&2; exit 1; }
on_error() {
  local rc=$1 line=$2 cmd=$3 where=""
  # In a command substitution the shell that runs it reports the whole command, once.
  [ "$BASH_SUBSHELL" -eq 0 ] || exit "$rc"
  # Inside a function, name the call chain so the line can be found from either end.
  if [ "${#FUNCNAME[@]}" -gt 2 ]; then
    where=" (in ${FUNCNAME[1]}, called from line ${BASH_LINENO[1]})"
  fi
  printf 'setup: error: step "%s" failed (exit %s) at line %s%s: %s\n' \
    "$step" "$rc" "$line" "$where" "${failed_cmd:-$cmd}" >&2
  exit "$rc"
}
trap 'on_error "$?" "$LINENO" "$BASH_COMMAND"' ERR

# quiet CMD...: run CMD with its output kept in $log; when it fails, show the end of that
# output (apt's and pip's reason) and leave CMD for the ERR trap to name (which would
# otherwise see only the call of quiet, or its return).
failed_cmd=""
quiet() {
  local rc=0
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    failed_cmd="$*"
    # (this image's pip config names local mirrors that may be absent: not the reason)
    grep -v "^WARNING: Location" "$log" | tail -n 25 | sed 's/^/  | /' >&2 || true
    return "$rc"
  fi
}

case "${1:-}" in
  ""|demo|test) ;;
  *) die "unknown command '$1' (use: demo, test, or nothing)" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages, mounts bpffs and attaches XDP programs)"
command -v apt-get >/dev/null || die "no apt-get: xdpflow's setup supports Debian 12 and Ubuntu 22.04+"
export DEBIAN_FRONTEND=noninteractive
# A fresh Ubuntu runs unattended-upgrades at boot: wait for apt's locks instead of failing.
apt_opts=(-o DPkg::Lock::Timeout=300)

# --- packages -------------------------------------------------------------------------
step="packages"
# promtool (package prometheus) checks the metrics and the alert rules; shellcheck checks
# this script; git and unshare (util-linux) make the fresh-machine test's clean clone.
pkgs=(python3 python3-venv python3-pip python3-bpfcc iproute2 iptables nftables
      ethtool netsniff-ng tcpdump iputils-ping systemd prometheus procps kmod util-linux
      shellcheck git)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
apt_updated=0
apt_update() {
  [ "$apt_updated" = 0 ] || return 0
  say "apt-get update"
  quiet apt-get "${apt_opts[@]}" update
  apt_updated=1
}
# Whether the archive has a package (after one update, so a fresh machine's empty lists
# do not read as "no such package").
available() {
  apt-cache show "$1" >/dev/null 2>&1 && return 0
  [ "$apt_updated" = 1 ] && return 1
  apt_update
  apt-cache show "$1" >/dev/null 2>&1
}
apt_install() {
  apt_update
  say "installing: $*"
  quiet apt-get "${apt_opts[@]}" install -y -q --no-install-recommends "$@"
  changed+=("installed $*")
}
missing=()
for p in "${pkgs[@]}"; do
  installed "$p" || missing+=("$p")
done
# libbpf is libbpf1 on Debian 12 / Ubuntu 24.04 and libbpf0 on Ubuntu 22.04: which one
# the archive has is only known after an update.
if ! installed libbpf1 && ! installed libbpf0; then
  if available libbpf1; then missing+=(libbpf1); else missing+=(libbpf0); fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
else
  say "packages: all ${#pkgs[@]} present"
fi
# Debian's prometheus package starts a server on install; xdpflow only needs promtool.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
  changed+=("stopped the prometheus server the package started")
fi

# --- kernel headers for BCC ---------------------------------------------------------
step="kernel headers"
kver=$(uname -r)
mod="/lib/modules/$kver"
if [ -e "$mod/build/include/linux/kconfig.h" ] || [ -e "$mod/build/include/generated/autoconf.h" ]; then
  say "kernel $kver: headers found at $mod/build"
elif available "linux-headers-$kver"; then
  apt_install "linux-headers-$kver"
  say "kernel $kver: installed its own headers"
else
  generic=""
  for cand in linux-headers-amd64 linux-headers-arm64 linux-headers-generic; do
    if available "$cand"; then generic=$cand; break; fi
  done
  [ -n "$generic" ] || die "kernel $kver has no headers package and no distribution headers package (linux-headers-amd64/-arm64/-generic) was found"
  installed "$generic" || apt_install "$generic"
  # The newest arch-specific header tree (…-amd64 on Debian, …-generic on Ubuntu).
  # nullglob: a pattern that matches nothing expands to nothing (ls would exit 2 on it).
  shopt -s nullglob
  trees=(/usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-arm64 /usr/src/linux-headers-*-generic)
  shopt -u nullglob
  [ "${#trees[@]}" -gt 0 ] || die "no header tree (/usr/src/linux-headers-*-amd64|-arm64|-generic) after installing $generic"
  build=$(printf '%s\n' "${trees[@]}" | sort -V | tail -n 1)
  ver=${build#/usr/src/linux-headers-}
  base=${ver%-*}
  # Debian splits the headers: the arch tree (build) and the common one (source).
  if [ -d "/usr/src/linux-headers-$base-common" ]; then src="/usr/src/linux-headers-$base-common"
  elif [ -d "/usr/src/linux-headers-$base" ]; then src="/usr/src/linux-headers-$base"
  else src="$build"; fi
  mkdir -p "$mod"
  ln -sfn "$build" "$mod/build"
  ln -sfn "$src" "$mod/source"
  changed+=("linked $mod/build and source to the $ver headers")
  say "kernel $kver has no headers package; using $ver headers ($build): fine for XDP, which only uses UAPI structs"
fi

# --- filesystems --------------------------------------------------------------------
step="filesystems"
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
  changed+=("mounted bpffs")
  say "mounted bpffs on /sys/fs/bpf"
fi
if [ -d /sys/kernel/tracing ] && ! mountpoint -q /sys/kernel/tracing; then
  mount -t tracefs tracefs /sys/kernel/tracing
  changed+=("mounted tracefs")
  say "mounted tracefs on /sys/kernel/tracing"
fi

# --- python environment ---------------------------------------------------------------
step="python environment"
# Debian's python3 (not a pyenv one) so that BCC from python3-bpfcc is importable.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  rm -rf "$venv"
  quiet /usr/bin/python3 -m venv --system-site-packages "$venv"
  changed+=("made $venv")
  say "made virtual environment $venv (sees Debian's bcc)"
fi
stamp="$venv/.xdpflow-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  quiet "$venv/bin/pip" install --disable-pip-version-check -e ".[test]"
  echo "$want" > "$stamp"
  changed+=("installed xdpflow into $venv")
  say "installed xdpflow and its test extras into $venv"
else
  say "xdpflow already installed in $venv"
fi

step="done"
if [ "${#changed[@]}" -eq 0 ]; then
  say "nothing changed: already set up"
else
  printf -v joined '%s; ' "${changed[@]}"
  say "changed: ${joined%; }"
fi
rm -f "$log"   # exec below skips the EXIT trap
case "${1:-}" in
  "") say "done. Run: bash setup.sh demo   or   bash setup.sh test" ;;
  demo) shift; step="demo"; exec "$venv/bin/xdpflow-lab" demo "$@" ;;
  test)
    shift; step="test"
    # With pytest arguments, one pytest run of what they select; without, every tier, the
    # lab tier beside the others (.ci/tiers says why).
    if [ "$#" -gt 0 ]; then exec "$venv/bin/python" -m pytest "$@"; fi
    exec bash "$here/.ci/tiers" "$venv/bin/python" ;;
esac
