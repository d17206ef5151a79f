#!/usr/bin/env bash
# Install customs-edge on a unit or a hub machine (Raspberry Pi OS / Debian), as root:
#   sudo systemd/install.sh NAME...        an agent per unit config: customs-edge@NAME
#   sudo systemd/install.sh --hub [NAME...]  the hub (customs-edge-hub), and agents if names follow
#   sudo systemd/install.sh --console [...]  the officers' console (customs-edge-console), with --hub or alone
# NAME.yaml is copied from configs/ unless /etc/customs-edge/NAME.yaml already exists; likewise hub.yaml and
# console.env.
set -euo pipefail
hub=no
console=no
while [ $# -gt 0 ]; do
  case "$1" in
    --hub) hub=yes; shift ;;
    --console) console=yes; shift ;;
    *) break ;;
  esac
done
[ "$hub" = yes ] || [ "$console" = yes ] || [ $# -gt 0 ] || { echo "usage: install.sh [--hub] [--console] NAME... (a file configs/NAME.yaml or /etc/customs-edge/NAME.yaml)" >&2; exit 2; }
# The console's first user (docs/console.md): `console user` run as the console's unit runs, with its identity
# (the hub's dynamic user) and its state directories, so its files belong to that user.
console_user_cmd='systemd-run --wait --pty --collect -p DynamicUser=yes -p User=customs-edge-hub -p "StateDirectory=customs-edge-hub customs-edge-console customs-edge-console-audit" -p StateDirectoryMode=0700 -p UMask=0077 /opt/customs-edge/.venv/bin/customs-edge console user NAME --role admin --state /var/lib/customs-edge-console/console.db --audit-key /var/lib/customs-edge-console-audit/audit.key'
src=$(cd "$(dirname "$0")/.." && pwd)
bin=/opt/customs-edge/.venv/bin
mkdir -p /opt/customs-edge /etc/customs-edge
python3 -m venv /opt/customs-edge/.venv
# Supply chain: every dependency (and the build backend) pinned with its hashes; pip refuses anything else.
# The project itself from this checkout, without resolving anything from the index.
"$bin/pip" install -q --require-hashes -r "$src/requirements.lock"
"$bin/pip" install -q --no-deps --no-build-isolation "$src"
for name in "$@"; do
  id -u customs-edge >/dev/null 2>&1 || useradd --system --home /var/lib/customs-edge --shell /usr/sbin/nologin customs-edge
  [ -f "/etc/customs-edge/$name.yaml" ] || install -m 0640 -g customs-edge "$src/configs/$name.yaml" "/etc/customs-edge/$name.yaml"
  "$bin/customs-edge" config validate "/etc/customs-edge/$name.yaml"
  install -m 0644 "$src/systemd/customs-edge@.service" /etc/systemd/system/
done
if [ "$hub" = yes ]; then
  # the hub runs as a dynamic user: its config is world-readable and holds no secret; secrets go in
  # hub-credentials/ (root only), which the unit's LoadCredential= hands to the hub alone
  [ -f /etc/customs-edge/hub.yaml ] || install -m 0644 "$src/configs/hub/hub.yaml" /etc/customs-edge/hub.yaml
  install -d -m 0700 /etc/customs-edge/hub-credentials
  # the unit's ExecStartPre (`hub --config ... --check-config`) checks hub.yaml with the credentials in place
  install -m 0644 "$src/systemd/customs-edge-hub.service" /etc/systemd/system/
fi
if [ "$console" = yes ]; then
  # console.env holds this site's settings (and may hold a broker password): root only, read by systemd
  [ -f /etc/customs-edge/console.env ] || install -m 0600 "$src/configs/console/console.env" /etc/customs-edge/console.env
  install -d -m 0700 /etc/customs-edge/console-credentials
  install -m 0644 "$src/systemd/customs-edge-console.service" /etc/systemd/system/
fi
systemctl daemon-reload
for name in "$@"; do
  systemctl enable --now "customs-edge@$name"
  echo "installed: journalctl -u customs-edge@$name -f"
done
if [ "$hub" = yes ]; then
  systemctl enable --now customs-edge-hub
  echo "installed: journalctl -u customs-edge-hub -f"
fi
if [ "$console" = yes ]; then
  systemctl enable customs-edge-console
  cert=$(sed -n 's/^CONSOLE_TLS_CERT=//p' /etc/customs-edge/console.env)
  key=$(sed -n 's/^CONSOLE_TLS_KEY=//p' /etc/customs-edge/console.env)
  creds=/etc/customs-edge/console-credentials
  if [ -f "$creds/$cert" ] && [ -f "$creds/$key" ] && [ -f /var/lib/customs-edge-console/console.db ]; then
    systemctl restart customs-edge-console
    echo "installed: journalctl -u customs-edge-console -f"
  else
    echo "console installed and enabled, not started; before: systemctl start customs-edge-console"
    echo "  1. its TLS certificate and key: $creds/$cert and $creds/$key (names in /etc/customs-edge/console.env)"
    echo "  2. its first user (asks the password):"
    echo "     $console_user_cmd"
  fi
fi
