"""Hostile configurations from a backup repository and from the agent wire, on a real host.

A value with a newline in a config that reaches LXC adds a line of the sender's choosing
(``lxc.hook.pre-start`` runs as root on this host when the container starts). These tests
plant such values where a config enters (a real backup's ``index.json``, a snapshot's config
in it, a ``commit_container`` request) and check from the outside that each is refused by
name and that nothing on the host changed: no marker file, no LXC config holding a hook, no
record, the other containers' config files byte for byte. Containers are named ``hc-*``.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pytest

from migrator.agent import serve
from migrator.backends import VolumeRef
from migrator.core.errors import CorruptBackup, InvalidInput
from migrator.pipelines.remote_target import RemoteTarget as Agent
from migrator.runtime.config import ConfigRefused
from migrator.transport.frames import read_json, write_json


def lxc_configs(th) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """Every LXC config file of the host, by container."""
    return {p.parent.name: p.read_bytes() for p in th.host.lxcpath.glob("*/config")}


def volumes(th) -> list[str]:  # type: ignore[no-untyped-def]
    base = th.host.backend("dir").path
    return sorted(str(p.relative_to(base)) for sub in ("containers", "containers-snapshots")
                  if (base / sub).exists() for p in (base / sub).iterdir())


def outside_view(th) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """What a refused input must not change: records, snapshots, configs, volumes."""
    return {"containers": [(c.name, c.config) for c in th.host.state.list_containers()],
            "snapshots": {c.name: [(s.name, s.config) for s in th.cts.snapshot_list(c.name)]
                          for c in th.host.state.list_containers()},
            "lxc": lxc_configs(th), "volumes": volumes(th),
            "lxcdirs": sorted(p.name for p in th.host.lxcpath.iterdir())}


def no_hook_anywhere(th) -> None:  # type: ignore[no-untyped-def]
    for name, text in lxc_configs(th).items():
        assert b"lxc.hook" not in text, name


def test_hostile_backup_repository_is_refused_and_changes_nothing(make_host, tmp_path) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("dir",))
    th.cts.create("busybox", "hc-other", "dir", {"user.team": "blue"})
    th.cts.create("busybox", "hc-src", "dir")
    (th.cts.rootfs(th.cts.get("hc-src")) / "root" / "data").write_text("backed up\n")
    th.cli("snapshot", "create", "hc-src", "s0", check=True)
    bid = th.cli("backup", "create", "hc-src", check=True).stdout.strip()
    index = th.root / "backups" / "backups" / bid / "index.json"
    pristine = index.read_text()
    doc = json.loads(pristine)
    assert doc["privileged"] is False and [s["name"] for s in doc["snapshots"]] == ["s0"]
    marker = tmp_path / "PWNED"
    hook = f"\nlxc.hook.pre-start = /bin/touch {marker}"
    mac = "aa:bb:cc:dd:ee:ff" + hook

    def container_mac(d: dict[str, Any]) -> None:
        d["config"]["volatile.eth0.hwaddr"] = mac

    def snapshot_mac(d: dict[str, Any]) -> None:
        d["snapshots"][0]["config"]["volatile.eth0.hwaddr"] = mac

    def user_line(d: dict[str, Any]) -> None:
        d["snapshots"][0]["config"]["user.note"] = "hello" + hook

    def raw_key(d: dict[str, Any]) -> None:
        d["config"]["raw.lxc"] = hook.strip()

    def mismatch(d: dict[str, Any]) -> None:  # the index says unprivileged, its config not
        d["config"]["security.privileged"] = "true"

    def privileged(d: dict[str, Any]) -> None:  # consistent, but nobody allowed it
        d["privileged"] = True
        d["config"]["security.privileged"] = "true"

    cases = [
        (container_mac, ConfigRefused, [f"backup index {bid}", "volatile.eth0.hwaddr",
                                        "control character"]),
        (snapshot_mac, ConfigRefused, [f"backup index {bid} (snapshot s0)",
                                       "volatile.eth0.hwaddr"]),
        (user_line, ConfigRefused, ["(snapshot s0)", "user.note", "control character"]),
        (raw_key, ConfigRefused, ["unknown configuration key 'raw.lxc'"]),
        (mismatch, CorruptBackup, ["privileged is false", "security.privileged='true'"]),
        (privileged, ConfigRefused, ["security.privileged=true", "--allow-privileged"]),
    ]
    before = outside_view(th)
    for plant, error, words in cases:
        d = json.loads(pristine)
        plant(d)
        index.write_text(json.dumps(d))  # the index checksums its parts, not itself
        for args in (["--name", "hc-new"], ["--force"]):  # a new one, and over hc-src
            r = th.cli("backup", "restore", bid, *args)
            assert r.returncode == error.exit_code, (plant.__name__, r.stderr)
            for w in words:
                assert w in r.stderr, (plant.__name__, w, r.stderr)
            assert not marker.exists()
            no_hook_anywhere(th)
            assert outside_view(th) == before, plant.__name__
        if error is CorruptBackup:  # a self-contradicting index is damage `verify` reports
            r = th.cli("backup", "verify", bid)
            assert r.returncode == CorruptBackup.exit_code and "security.privileged" in r.stderr

    # the same backup, unaltered, restores: the refusals came from the planted values
    index.write_text(pristine)
    th.cli("backup", "restore", bid, "--name", "hc-new", check=True)
    assert (th.cts.rootfs(th.cts.get("hc-new")) / "root" / "data").read_text() == "backed up\n"
    assert lxc_configs(th)["hc-other"] == before["lxc"]["hc-other"]
    no_hook_anywhere(th)
    assert not marker.exists()


def _wire(th, req: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """One request through the agent's real entry point (``serve``: frames in, frames out)."""
    inbox, outbox = io.BytesIO(), io.BytesIO()
    write_json(inbox.write, {"protocol": 1, **req})
    inbox.seek(0)
    serve(lambda: th.cts, inbox.read, outbox.write)
    outbox.seek(0)
    return read_json(outbox.read)


def test_hostile_commit_container_on_the_agent_wire_is_refused(make_host, tmp_path) -> None:  # type: ignore[no-untyped-def]
    th = make_host(pools=("dir",))
    th.cts.create("busybox", "hc-other", "dir")
    # a volume as a push leaves it before its commit
    th.host.backend("dir").create_volume(VolumeRef("container", "hc-wire"))
    marker = tmp_path / "PWNED"
    hook = f"\nlxc.hook.pre-start = /bin/touch {marker}"
    snap = {"name": "s0", "created": 1.0, "expires": None, "uuid": "u1",
            "config": {"volatile.eth0.hwaddr": "00:16:3e:00:00:01" + hook}}
    commits = [
        ({"volatile.eth0.hwaddr": "aa:bb:cc:dd:ee:ff" + hook}, [], "volatile.eth0.hwaddr"),
        ({"image.init": "systemd" + hook}, [], "image.init"),
        ({"volatile.last_state.idmap": "[]"}, [], "volatile.last_state.idmap"),
        ({"user.a": "b"}, [snap], "(snapshot s0)"),
    ]
    before = outside_view(th)
    for config, snaps, word in commits:
        reply = _wire(th, {"op": "commit_container", "name": "hc-wire", "pool": "dir",
                           "image": None, "config": config, "snapshots": snaps})
        assert reply["ok"] is False, reply
        err = reply["error"]
        assert err["type"] == "ConfigRefused" and word in err["message"], err
        assert "refused from the client's commit_container" in err["message"]
        assert outside_view(th) == before
    # a pull's calls come from the source host, which may not make a privileged container
    agent = Agent(th.cts)
    agent.peer = "host b"
    with pytest.raises(ConfigRefused, match="--allow-privileged|security.privileged") as ei:
        agent.commit_container({"name": "hc-wire", "pool": "dir", "image": None,
                                "config": {"security.privileged": "true"}}, lambda n: b"")
    assert "host b's commit_container" in str(ei.value)
    with pytest.raises(InvalidInput, match="image"):
        agent.commit_container({"name": "hc-wire", "pool": "dir", "image": ["x"],
                                "config": {}}, lambda n: b"")
    assert outside_view(th) == before
    no_hook_anywhere(th)
    assert not marker.exists()
    # a clean commit of the same volume is recorded and rendered
    reply = _wire(th, {"op": "commit_container", "name": "hc-wire", "pool": "dir",
                       "image": None, "config": {"volatile.eth0.hwaddr": "00:16:3E:00:00:02",
                                                 "image.init": "busybox"}, "snapshots": []})
    assert reply["ok"] is True, reply
    text = (th.host.lxcpath / "hc-wire" / "config").read_text()
    assert "lxc.net.0.hwaddr = 00:16:3e:00:00:02" in text
    assert os.path.exists(th.host.lxcpath / "hc-other" / "config")
    assert lxc_configs(th)["hc-other"] == before["lxc"]["hc-other"]
