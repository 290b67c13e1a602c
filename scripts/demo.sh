#!/usr/bin/env bash
# The main job on an embedded default: a test host in its own network namespace, an image
# built, dir/btrfs/zfs pools created, containers launched, exec'd into, snapshotted, restored,
# copied and refreshed, moved between pools while running, with a custom volume attached.
# Everything is torn down at the end (and on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
ROOT=/var/tmp/migrator-demo/host-a
m() { echo "+ migrate $*" >&2; migrate --root "$ROOT" "$@"; }
HOSTS=/var/tmp/migrator-demo/hosts
S3_BASE=/var/tmp/migrator-demo/s3
sw_pid=
cleanup() {
  # the S3 cluster of the backup part: the one this run started (by its PID: SIGTERM makes
  # it stop its weed processes), then any a killed run left under the demo's directory
  if [ -n "$sw_pid" ]; then kill "$sw_pid" 2>/dev/null || true; wait "$sw_pid" 2>/dev/null || true; fi
  python -m testrigs.seaweed clean "$S3_BASE" >/dev/null 2>&1 || true
  rm -rf "$S3_BASE"
  # the two-host part first: its running containers hold copies of host-a's zfs-fuse
  # mounts, which would keep host-a's zpool from being exported
  python -m testrigs.testhosts down --base "$HOSTS" >/dev/null 2>&1 || true
  migrate --root "$ROOT" teardown --yes --purge >/dev/null 2>&1 || true
  # a zpool whose disk was under the demo root and is still imported (a killed run)
  for p in $(zpool list -H -o name 2>/dev/null); do
    if zpool status "$p" 2>/dev/null | grep -q " /var/tmp/migrator-demo/"; then
      zpool destroy -f "$p" >/dev/null 2>&1 || true
    fi
  done
}
trap cleanup EXIT
cleanup

m init --netns migdemo-a --subnet 192.0.2.1/24
m image build busybox
m image build debian/bookworm
m pool create default --driver dir
m pool create fast --driver btrfs --size 4GiB
m pool create tank --driver zfs --size 1GiB
m launch busybox web-1
m launch debian/bookworm deb-1 --pool fast -c limits.memory=512MiB --wait
m exec web-1 -- sh -c 'echo "hello from $(hostname)" > /root/greeting; cat /root/greeting'
m exec deb-1 -- systemctl is-system-running
m exec web-1 -- ping -c 1 -W 2 192.0.2.11
m snapshot create web-1 before
m exec web-1 -- sh -c 'echo overwritten > /root/greeting'
m snapshot restore web-1/before
m exec web-1 -- cat /root/greeting
m snapshot create deb-1
m volume create shared --pool fast
m volume attach shared web-1 /srv/shared
m restart web-1
m exec web-1 -- sh -c 'echo on-a-volume > /srv/shared/note'
m copy web-1 web-2 --pool fast
m exec web-1 -- sh -c 'echo newer > /root/greeting'
m snapshot create web-1 after
m copy web-1 web-2 --refresh
m move web-1 --pool tank
m exec web-1 -- cat /srv/shared/note /root/greeting
m move web-2 --pool default --verify
m list
m list --format json > /dev/null
m pool list

# Two hosts on this machine (network namespaces on a private TEST-NET link, each with its
# own sshd, their container bridges joined into one network over VXLAN): a running
# unprivileged container is backed up, live-migrated with CRIU to host b while a client on
# host b keeps its TCP connection to it, and its backup restored on host a; then host a
# pushes a container to host b over SSH, refreshes it, and moves a running one (stateless:
# live copy, stop, final delta, start there).
echo "+ python -m testrigs.testhosts up --base $HOSTS --prefix md --network shared" >&2
python -m testrigs.testhosts up --base "$HOSTS" --prefix md --pools btrfs,zfs --network shared >&2
A="$HOSTS/a/root"; B="$HOSTS/b/root"
a() { echo "+ [host a] migrate $*" >&2; migrate --root "$A" "$@"; }
b() { echo "+ [host b] migrate $*" >&2; migrate --root "$B" "$@"; }
mkdir -p "$A/ssh" && cp "$HOSTS/client/known_hosts" "$A/ssh/known_hosts"
a host add host-b 198.51.100.11 --key "$HOSTS/client/id_ed25519" --remote-root "$B" \
  --command "$PWD/.venv/bin/migrate"
a host check host-b --probe-mib 64
# live1 (unprivileged, as launch makes them) runs a counter held only in a shell's memory,
# and serves a numbered stream on TCP port 7000; watch, on host b, reads it over the shared
# network into a file: one connection, which must survive live1's move.
a launch busybox live1 -p btrfs
a exec live1 -- sh -c 'setsid sh -c "i=0; while true; do i=\$((i+1)); echo \$i > /root/count; sleep 0.2; done" </dev/null >/dev/null 2>&1 &'
a exec live1 -- sh -c 'setsid sh -c "i=0; while true; do i=\$((i+1)); echo \$i; sleep 0.1; done | nc -l -p 7000" </dev/null >/dev/null 2>&1 &'
live1_ip=$(a info live1 --format json | python -c 'import json, sys; print(json.load(sys.stdin)["ipv4"])')
b launch busybox watch -p btrfs
sleep 1
# (nc's stdin must stay open: at its end busybox nc closes the connection)
b exec watch -- sh -c "setsid sh -c 'sleep 1000000 | nc $live1_ip 7000 > /root/stream' </dev/null >/dev/null 2>&1 &"
sleep 2
# A backup of the running container (from a snapshot taken while it is briefly frozen;
# zstd, every part checksummed), verified down to every tar member.
a backup create live1 --compression zstd:3 --format json > "$HOSTS/backup.json"
id=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$HOSTS/backup.json")
a backup list
a backup verify "$id" --deep
# ... and copied off-site into host b's repository, through host b's agent.
a backup copy "$id" --to ssh://host-b
a backup verify "$id" --repo ssh://host-b
# Live migration with CRIU: live1's counter keeps counting on host b, from where it was.
before=$(cat "$A/storage-pools/btrfs/containers/live1/rootfs/root/count")
streamed=$(b exec watch -- sh -c 'tail -n 1 /root/stream')
a live local host-b live1 --dry-run
a live local host-b live1
sleep 1
after=$(b exec live1 -- cat /root/count)
echo "counter before the migration: $before; on host b now: $after (the same shell, still counting)" >&2
[ "$after" -gt "$before" ] || { echo "the counter did not carry on" >&2; exit 1; }
b exec live1 -- cat /proc/self/uid_map
now=$(b exec watch -- sh -c 'tail -n 1 /root/stream')
gaps=$(b exec watch -- awk 'NR > 1 && $1 != prev + 1 { n++ } { prev = $1 } END { print n + 0 }' /root/stream)
echo "TCP stream read on host b: $streamed before the move, $now now, $gaps gaps (one connection)" >&2
[ "$now" -gt "$streamed" ] && [ "$gaps" -eq 0 ] || { echo "the connection did not survive" >&2; exit 1; }
# The backup taken before the move restores on host a as a new container (onto zfs: any
# pool driver), with the counter file as it was then.
a backup restore "$id" --name live1-restored --pool zfs
a start live1-restored
saved=$(a exec live1-restored -- cat /root/count)
echo "counter in the restored backup: $saved" >&2
[ "$saved" -le "$after" ] || { echo "the restored backup is wrong" >&2; exit 1; }
a delete --force live1-restored

a launch busybox app -p btrfs
a exec app -- sh -c 'echo "state from host a" > /root/state'
a snapshot create app s0
# Backups in object storage: a SeaweedFS cluster on 127.0.0.1 (master, two volume servers,
# filer, S3 gateway with a fresh key enforced), reached the standard AWS way (AWS_ENDPOINT_URL
# and the key variables; AWS S3, Ceph RGW or MinIO are the same with their own values). A
# chunked repository there: deduplicated, every chunk and index encrypted (AES-256-GCM, the
# key wrapped by the passphrase). The cluster listens on this namespace's loopback, which the
# hosts' namespaces cannot reach: host b's restore runs with b's state root from here.
echo "+ python -m testrigs.seaweed --bucket migrator-demo up" >&2
mkdir -p "$S3_BASE"
install -m 600 /dev/null "$S3_BASE/env"   # it will hold the cluster's secret key
TMPDIR="$S3_BASE" python -m testrigs.seaweed --bucket migrator-demo up > "$S3_BASE/env" &
sw_pid=$!
for _ in $(seq 1 600); do
  grep -q '^# bucket' "$S3_BASE/env" && break
  kill -0 "$sw_pid" 2>/dev/null || { echo "the SeaweedFS cluster did not start" >&2; exit 1; }
  sleep 0.1
done
. "$S3_BASE/env"   # export AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... (this run's key)
export AWS_CONFIG_FILE=/nonexistent AWS_SHARED_CREDENTIALS_FILE=/nonexistent
export MIGRATOR_PASSPHRASE="demo passphrase, not for real use"
S3=s3://migrator-demo/demo
a backup init "$S3"
a backup create app --repo "$S3" --format json > "$HOSTS/s3-1.json"
a backup create app --repo "$S3" --format json > "$HOSTS/s3-2.json"
python - "$HOSTS/s3-1.json" "$HOSTS/s3-2.json" >&2 <<'PY'
import json, sys
for n, f in enumerate(sys.argv[1:], 1):
    r = json.load(open(f))
    print(f"S3 backup {n} of app: raw {r['raw_bytes']} B, stored {r['stored_bytes']} B "
          f"(new after dedup and compression), {r['new_chunks']} of {r['chunks']} chunks new")
PY
s3id=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$HOSTS/s3-2.json")
b backup restore "$s3id" --name app-s3 --pool btrfs --repo "$S3"
b start app-s3
b exec app-s3 -- cat /root/state
b snapshot list app-s3
b delete --force app-s3
kill "$sw_pid"; wait "$sw_pid" || true; sw_pid=
unset AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION \
  AWS_CONFIG_FILE AWS_SHARED_CREDENTIALS_FILE MIGRATOR_PASSPHRASE
a copy app host-b:app-copy -p btrfs
a exec app -- sh -c 'echo "newer state" > /root/state'
a snapshot create app s1
a copy app host-b:app-copy --refresh
# A nightly schedule: one tick when the scheduler first sees app, one the next night, which
# takes the automatic snapshot (expiring after a week). The schedule and the snapshot's
# expiry move with the container.
a config set app snapshots.schedule=@daily "snapshots.pattern=auto-{date:%Y%m%d}" \
  snapshots.expiry=1w
a schedule tick --now "$(date +%Y-%m-%dT00:00)"
a schedule tick --now "$(date -d tomorrow +%Y-%m-%dT00:30)"
a move app host-b -p zfs
b list
b exec app -- cat /root/state
b snapshot list app
b schedule status

a operations --all
echo "demo OK" >&2
