#!/usr/bin/env bash
# Install customs-edge on a unit or a hub machine (Raspberry Pi OS / Debian), as root:
#   sudo systemd/install.sh NAME...        an agent per unit config: customs-edge@NAME
#   sudo systemd/install.sh --hub [NAME...]  the hub (customs-edge-hub), and agents if names follow
# NAME.yaml is copied from configs/ unless /etc/customs-edge/NAME.yaml already exists; likewise hub.yaml.
set -euo pipefail
hub=no
if [ "${1:-}" = "--hub" ]; then hub=yes; shift; fi
[ "$hub" = yes ] || [ $# -gt 0 ] || { echo "usage: install.sh [--hub] NAME... (a file configs/NAME.yaml or /etc/customs-edge/NAME.yaml)" >&2; exit 2; }
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
systemctl daemon-reload
for name in "$@"; do
  systemctl enable --now "customs-edge@$name"
  echo "installed: journalctl -u customs-edge@$name -f"
done
if [ "$hub" = yes ]; then
  systemctl enable --now customs-edge-hub
  echo "installed: journalctl -u customs-edge-hub -f"
fi
