#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian bookworm machine, as root.
# Idempotent: each step checks first, so a second run takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "setup-host.sh must run as root" >&2; exit 1; }

APT_PKGS=(lxc python3-lxc iptables btrfs-progs python3-btrfsutil zfs-fuse rsync
          openssh-server openssh-client debootstrap busybox-static uidmap zstd iproute2
          python3-venv python3-dev gcc bc acl attr strace)
export DEBIAN_FRONTEND=noninteractive

# Trixie is added for CRIU only (bookworm's 3.17 fails on this 6.x kernel: vDSO), pinned low
# so nothing else is ever pulled from it unless asked with -t trixie.
if [ ! -f /etc/apt/sources.list.d/migrator-trixie.sources ]; then
  log "adding Debian trixie (pinned low) for CRIU 4.x"
  cat > /etc/apt/sources.list.d/migrator-trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat > /etc/apt/preferences.d/migrator-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
  rm -f /var/lib/apt/lists/.migrator-updated
fi

need=()
for p in "${APT_PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p"); done
criu_ok() { command -v criu >/dev/null && criu --version 2>/dev/null | grep -qE 'Version: [4-9]'; }
# pycriu from trixie moves /usr/bin/python3 to 3.13, and with it python3-lxc and LXC (6.0.x);
# 3.13's venv needs trixie's pip wheel. All of this is one consistent trixie set.
pycriu_ok() { /usr/bin/python3 -c 'import pycriu, lxc, btrfsutil' 2>/dev/null; }
pipwhl_ok() { dpkg-query -W -f='${Version}' python3-pip-whl 2>/dev/null | grep -qvE '^2[0-3]\.'; }
if [ ${#need[@]} -gt 0 ] || ! criu_ok || ! pycriu_ok || ! pipwhl_ok; then
  log "apt-get update"
  apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    log "installing: ${need[*]}"
    apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
  if ! criu_ok || ! pycriu_ok || ! pipwhl_ok; then
    log "installing CRIU 4.x, python3-pycriu and their python3 set from trixie"
    apt-get install -y -qq --no-install-recommends -t trixie criu python3-pycriu \
      python3-lxc python3-btrfsutil python3-venv python3-pip-whl python3-setuptools-whl
  fi
fi

# Root owns unprivileged containers: it needs a subordinate id range.
grep -q '^root:' /etc/subuid 2>/dev/null || echo 'root:100000:1000000000' >> /etc/subuid
grep -q '^root:' /etc/subgid 2>/dev/null || echo 'root:100000:1000000000' >> /etc/subgid

# CRIU post-copy needs big pipes.
sysctl -qw fs.pipe-max-size=16777216 || true

# zfs-fuse: the daemon serves every zfs/zpool command (no kernel module); started here, once.
zfs_up() { zpool list >/dev/null 2>&1; }
if ! pgrep -x zfs-fuse >/dev/null; then
  # A daemon killed without cleaning up (reboot, OOM, kill -9) leaves its pid file and
  # socket behind, and zfs-fuse then refuses to start: clear them when nothing runs.
  rm -f /run/zfs-fuse.pid /var/run/zfs/zfs_socket
  log "starting zfs-fuse"
  zfs-fuse -p /run/zfs-fuse.pid || { echo "zfs-fuse failed to start (is /dev/fuse there? try: modprobe fuse)" >&2; exit 1; }
fi
for _ in $(seq 1 50); do zfs_up && break; sleep 0.2; done
zfs_up || { echo "zfs-fuse did not answer within 10 s" >&2; exit 1; }

# The Python environment: Debian's python so lxc, pycriu and btrfsutil import.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import lxc, btrfsutil' 2>/dev/null; then
  log "creating .venv from /usr/bin/python3 with system site packages"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  log "installing the project and its Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
log "ready: $(criu --version | head -1), $(lxc-start --version 2>/dev/null | head -1 | sed 's/^/lxc /')"
