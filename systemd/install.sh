#!/usr/bin/env bash
# Install customs-edge on a unit (Raspberry Pi OS / Debian), as root:  sudo systemd/install.sh NAME
# NAME.yaml is copied from configs/ unless /etc/customs-edge/NAME.yaml already exists.
set -euo pipefail
name=${1:?usage: install.sh NAME (a file configs/NAME.yaml or /etc/customs-edge/NAME.yaml)}
src=$(cd "$(dirname "$0")/.." && pwd)
id -u customs-edge >/dev/null 2>&1 || useradd --system --home /var/lib/customs-edge --shell /usr/sbin/nologin customs-edge
mkdir -p /opt/customs-edge /etc/customs-edge
python3 -m venv /opt/customs-edge/.venv
/opt/customs-edge/.venv/bin/pip install -q "$src"
[ -f "/etc/customs-edge/$name.yaml" ] || install -m 0640 -g customs-edge "$src/configs/$name.yaml" "/etc/customs-edge/$name.yaml"
/opt/customs-edge/.venv/bin/customs-edge config validate "/etc/customs-edge/$name.yaml"
install -m 0644 "$src/systemd/customs-edge@.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now "customs-edge@$name"
echo "installed: journalctl -u customs-edge@$name -f"
