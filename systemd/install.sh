#!/bin/bash
# Install the xdpflow agent as a systemd service, running from this checkout's venv.
#
#   systemd/install.sh               install (as root), then: systemctl enable --now xdpflow-agent
#   systemd/install.sh --uninstall   remove the unit and its sysusers/tmpfiles entries
#   systemd/install.sh --root DIR    install (or --uninstall) under DIR only: nothing is run,
#                                    no group made, no daemon reloaded (packaging, tests)
#
# Safe to run again: files whose content is unchanged are not touched, and an existing
# /etc/xdpflow/agent.toml is never overwritten.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
checkout="$(dirname "$here")"
agent="$checkout/.venv/bin/xdpflow-agent"
# The unit ships with this placeholder; it is replaced by $agent.
placeholder="/opt/xdpflow/.venv/bin/xdpflow-agent"

root=""
action=install

usage() {
  sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || { usage >&2; exit 2; }; root="$2"; shift 2 ;;
    --root=*) root="${1#--root=}"; shift ;;
    --uninstall) action=uninstall; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [ -n "$root" ]; then
  mkdir -p "$root"
  root="$(cd "$root" && pwd -P)"
  [ "$root" != / ] || root=""
fi
# Without a staging root this changes the system: groups, /run, /var/lib, systemd.
live=1
[ -z "$root" ] || live=0
if [ "$live" = 1 ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (or with --root DIR to stage the files)"
fi

unit_dest="$root/etc/systemd/system/xdpflow-agent.service"
sysusers_dest="$root/etc/sysusers.d/xdpflow.conf"
tmpfiles_dest="$root/etc/tmpfiles.d/xdpflow.conf"
config_dir="$root/etc/xdpflow"
config_dest="$config_dir/agent.toml"

systemd_running() { [ "$live" = 1 ] && [ -d /run/systemd/system ]; }

# put SRC DEST MODE: install SRC as DEST unless DEST already has the same bytes and mode,
# so a second run leaves even the timestamps alone.
put() {
  local src="$1" dest="$2" mode="$3"
  if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
    return 0
  fi
  install -D -m "$mode" "$src" "$dest"
  say "installed ${dest}"
}

rendered_unit() {
  # A unit file treats % as a specifier and whitespace as an argument separator, and sed
  # treats \ & and | specially in the replacement: refuse or escape each.
  case "$agent" in
    *[[:space:]]*) die "the checkout path has whitespace, which ExecStart= cannot take: $checkout" ;;
  esac
  local value
  value="$(printf '%s' "$agent" | sed -e 's/%/%%/g' -e 's/[\\&|]/\\&/g')"
  grep -q "^ExecStart=$placeholder " "$here/xdpflow-agent.service" \
    || die "xdpflow-agent.service has no 'ExecStart=$placeholder ...' line to rewrite"
  sed "s|^ExecStart=$placeholder |ExecStart=$value |" "$here/xdpflow-agent.service"
}

do_install() {
  [ -x "$agent" ] || say "warning: $agent does not exist yet; run ./setup.sh before starting the service"

  unit_tmp="$(mktemp)"
  trap 'rm -f "$unit_tmp"' EXIT
  rendered_unit >"$unit_tmp"
  put "$unit_tmp" "$unit_dest" 0644
  put "$here/xdpflow.sysusers" "$sysusers_dest" 0644
  put "$here/xdpflow.tmpfiles" "$tmpfiles_dest" 0644

  [ -d "$config_dir" ] || install -d -m 0755 "$config_dir"
  if [ -e "$config_dest" ]; then
    say "kept existing ${config_dest}"
  else
    install -m 0644 "$here/agent.toml.example" "$config_dest"
    say "installed ${config_dest} (from agent.toml.example; edit it)"
  fi

  [ "$live" = 1 ] || return 0

  # The group must exist before the directories are chowned to it and the unit starts.
  if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers "$sysusers_dest"
  elif ! getent group xdpflow >/dev/null; then
    groupadd --system xdpflow
  fi
  if command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --create "$tmpfiles_dest"
  else
    install -d -m 0750 -o root -g xdpflow /run/xdpflow /var/lib/xdpflow
  fi
  if systemd_running; then
    systemctl daemon-reload
    say "start it with: systemctl enable --now xdpflow-agent"
  else
    say "systemd is not running here; the unit is installed for when it is"
  fi
}

do_uninstall() {
  if systemd_running && [ -e "$unit_dest" ]; then
    systemctl disable --now xdpflow-agent.service || true
  fi
  local f
  for f in "$unit_dest" "$sysusers_dest" "$tmpfiles_dest"; do
    if [ -e "$f" ]; then
      rm -f "$f"
      say "removed $f"
    fi
  done
  # The config goes only if nobody edited it; the state in /var/lib/xdpflow, the pins in
  # bpffs and the group stay, as a package removal (not a purge) would leave them.
  if [ -f "$config_dest" ] && cmp -s "$config_dest" "$here/agent.toml.example"; then
    rm -f "$config_dest"
    say "removed unmodified $config_dest"
  elif [ -e "$config_dest" ]; then
    say "kept edited $config_dest"
  fi
  [ ! -d "$config_dir" ] || rmdir --ignore-fail-on-non-empty "$config_dir"
  if systemd_running; then
    systemctl daemon-reload
  fi
}

"do_$action"
