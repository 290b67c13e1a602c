"""migrator.runtime.config (LXD-style keys) and migrator.runtime.host.parse_size."""

from __future__ import annotations

import os

import pytest

from migrator.core.errors import InvalidInput
from migrator.runtime import config as cfg
from migrator.runtime.host import parse_size


# booleans -------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ["true", "TRUE", "1", "yes", "on", " On "])
def test_bool_true_canonicalised(raw: str) -> None:
    assert cfg.validate("security.privileged", raw) == "true"


@pytest.mark.parametrize("raw", ["false", "False", "0", "no", "off"])
def test_bool_false_canonicalised(raw: str) -> None:
    assert cfg.validate("security.protection.delete", raw) == "false"


@pytest.mark.parametrize("raw", ["", "maybe", "2", "truee"])
def test_bool_garbage_refused(raw: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        cfg.validate("security.privileged", raw)
    assert ei.value.hint


def test_is_true() -> None:
    assert cfg.is_true({"security.privileged": "true"}, "security.privileged")
    assert not cfg.is_true({"security.privileged": "false"}, "security.privileged")
    assert not cfg.is_true({}, "security.privileged")


# limits.memory --------------------------------------------------------------------------------
def test_memory_parsed_to_bytes() -> None:
    assert cfg.validate("limits.memory", "256MiB") == str(256 * 2**20)
    assert cfg.validate("limits.memory", "1GiB") == str(2**30)
    assert cfg.validate("limits.memory", "16MiB") == str(16 * 2**20)
    assert cfg.validate("limits.memory", str(32 * 2**20)) == str(32 * 2**20)


@pytest.mark.parametrize("raw", ["15MiB", "1024", "16383KiB", "0"])
def test_memory_below_16mib_refused(raw: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        cfg.validate("limits.memory", raw)
    assert "16MiB" in str(ei.value)
    assert ei.value.hint


def test_memory_garbage_refused() -> None:
    with pytest.raises(InvalidInput):
        cfg.validate("limits.memory", "lots")


# limits.cpu -----------------------------------------------------------------------------------
def test_cpu_within_host() -> None:
    avail = os.cpu_count() or 1
    assert cfg.validate("limits.cpu", "1") == "1"
    assert cfg.validate("limits.cpu", str(avail)) == str(avail)


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", ""])
def test_cpu_out_of_range_or_garbage(raw: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        cfg.validate("limits.cpu", raw)
    assert ei.value.hint


def test_cpu_above_host_count_refused() -> None:
    avail = os.cpu_count() or 1
    with pytest.raises(InvalidInput) as ei:
        cfg.validate("limits.cpu", str(avail + 1))
    assert f"1..{avail}" in ei.value.hint


# key classes ----------------------------------------------------------------------------------
def test_unknown_key_lists_known_keys() -> None:
    with pytest.raises(InvalidInput) as ei:
        cfg.validate("limits.disk", "1G")
    hint = ei.value.hint
    for key in cfg.KEYS:
        assert key in hint
    assert "user.*" in hint
    assert "limits.disk" in str(ei.value)


def test_user_keys_are_free_form_single_line_text() -> None:
    assert cfg.validate("user.note", "anything = goes, even 'quotes' and ünïcode") == (
        "anything = goes, even 'quotes' and ünïcode")
    assert cfg.validate("user.x", "") == ""


@pytest.mark.parametrize("value", ["two\nlines", "tab\there", "nul\x00", "cr\r", "del\x7f",
                                   "esc\x1b[31m", "c1\x85", "sep\u2028"])
def test_user_values_with_control_characters_are_refused(value: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        cfg.validate("user.note", value)
    assert "user.note" in str(ei.value) and "control character" in str(ei.value)


def test_user_keys_with_control_characters_are_refused() -> None:
    with pytest.raises(InvalidInput, match="control character"):
        cfg.validate("user.a\nlxc.hook.pre-start", "x")


def test_bare_user_prefix_is_not_a_key() -> None:
    with pytest.raises(InvalidInput):
        cfg.validate("user.", "x")


@pytest.mark.parametrize("key", ["image.os", "image.init", "volatile.eth0.hwaddr"])
def test_read_only_keys_refused(key: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        cfg.validate(key, "debian")
    assert key in str(ei.value)


def test_parse_assignments() -> None:
    out = cfg.parse_assignments(
        ["limits.memory=256MiB", "security.privileged=yes", "user.a=b=c", " limits.cpu =1"]
    )
    assert out == {
        "limits.memory": str(256 * 2**20),
        "security.privileged": "true",
        "user.a": "b=c",
        "limits.cpu": "1",
    }


@pytest.mark.parametrize("item", ["limits.memory", "=5", ""])
def test_parse_assignments_needs_key_and_equals(item: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        cfg.parse_assignments([item])
    assert "KEY=VALUE" in str(ei.value)


def test_parse_assignments_validates_each_value() -> None:
    with pytest.raises(InvalidInput):
        cfg.parse_assignments(["security.privileged=true", "limits.memory=1MiB"])
    with pytest.raises(InvalidInput):
        cfg.parse_assignments(["image.os=evil"])


# parse_size -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("10GiB", 10 * 2**30),
        ("512M", 512 * 2**20),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 2**20),
        ("1T", 2**40),
        ("1.5G", int(1.5 * 2**30)),
        ("4k", 4096),
        ("100", 100),
        ("100B", 100),
        (" 2 GiB ", 2 * 2**30),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "", "G", "-1G", "1P", "1.G", "10 GiBs", "1e9"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(InvalidInput) as ei:
        parse_size(text)
    assert ei.value.hint


# the gate for configs that arrive from elsewhere (admit_config) ------------------------------
HOSTILE_MAC = "aa:bb:cc:dd:ee:ff\nlxc.hook.pre-start = /bin/touch /tmp/PWNED"
ORIGIN = "backup index web-20260101T000000Z-abcdef"


def admit(config: dict[str, object], allow_privileged: bool = False) -> dict[str, str]:
    return cfg.admit_config(config, ORIGIN, allow_privileged=allow_privileged)


def test_admit_canonicalises_every_known_family() -> None:
    got = admit({
        "security.privileged": "no", "security.protection.delete": "ON",
        "limits.memory": "256MiB", "limits.cpu": "1", "snapshots.schedule": "@daily",
        "snapshots.expiry": "2w", "backups.incremental": "yes", "user.owner": "ops",
        "image.os": "debian", "image.release": "bookworm", "image.init": "systemd",
        "image.description": "Debian bookworm (minbase, systemd)",
        "volatile.eth0.hwaddr": "00:16:3E:12:34:56"})
    assert got["security.privileged"] == "false"
    assert got["security.protection.delete"] == "true"
    assert got["limits.memory"] == str(256 << 20)
    assert got["backups.incremental"] == "true"
    assert got["volatile.eth0.hwaddr"] == "00:16:3e:12:34:56"  # lower case, as LXC writes
    assert got["image.init"] == "systemd" and got["user.owner"] == "ops"
    assert admit(got) == got  # canonical: a second pass changes nothing


def test_hostile_mac_with_a_hook_line_is_refused_naming_key_and_origin() -> None:
    with pytest.raises(cfg.ConfigRefused) as ei:
        admit({"user.a": "b", "volatile.eth0.hwaddr": HOSTILE_MAC})
    msg = str(ei.value)
    assert msg.startswith(f"refused from {ORIGIN}: volatile.eth0.hwaddr")
    assert "control character (\\n)" in msg
    assert ei.value.exit_code == InvalidInput.exit_code and ei.value.hint


@pytest.mark.parametrize("mac", ["aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:ff:00", "gg:bb:cc:dd:ee:ff",
                                 "aa-bb-cc-dd-ee-ff", "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff",
                                 "00:00:00:00:00:00", " 00:16:3e:12:34:56", ""])
def test_volatile_hwaddr_must_be_a_unicast_mac(mac: str) -> None:
    with pytest.raises(cfg.ConfigRefused, match="volatile.eth0.hwaddr"):
        admit({"volatile.eth0.hwaddr": mac})


@pytest.mark.parametrize("key", ["volatile.last_state.idmap", "volatile.idmap.base",
                                 "volatile.eth1.hwaddr", "volatile.last_state.power",
                                 "image.serial", "image.architecture", "raw.lxc",
                                 "lxc.hook.pre-start", "limits.processes", "security.nesting",
                                 "user.", "environment.PATH"])
def test_keys_nobody_here_writes_are_refused(key: str) -> None:
    with pytest.raises(cfg.ConfigRefused) as ei:
        admit({key: "[]"})
    assert key in str(ei.value) and ORIGIN in str(ei.value)
    assert "user.*" in ei.value.hint


@pytest.mark.parametrize(("key", "value"), [
    ("image.init", "upstart"), ("image.init", "systemd\nlxc.init.cmd = /bin/sh"),
    ("image.os", ""), ("image.os", "debian; rm -rf /"), ("image.os", "x" * 65),
    ("image.release", "bookworm\n"), ("image.description", "d" * 257),
    ("image.description", "ok\tbut a tab"), ("limits.memory", "1MiB"),
    ("limits.memory", "256MiB\nlxc.hook.start = /bin/sh"), ("limits.cpu", "1\n"),
    ("security.privileged", "maybe"), ("snapshots.schedule", "@daily\n"),
    ("user.note", "line\nlxc.hook.pre-start = /bin/sh"),
])
def test_each_value_is_parsed_by_its_type(key: str, value: str) -> None:
    with pytest.raises(cfg.ConfigRefused) as ei:
        admit({key: value})
    assert key in str(ei.value)


@pytest.mark.parametrize("config", [{"limits.cpu": 1}, {"user.a": None}, {1: "x"},
                                    {"user.a": ["b"]}])
def test_only_text_is_admitted(config: dict[object, object]) -> None:
    with pytest.raises(cfg.ConfigRefused, match="must be text"):
        admit(config)  # type: ignore[arg-type]


def test_not_a_mapping_is_refused() -> None:
    with pytest.raises(cfg.ConfigRefused, match="not a mapping"):
        cfg.admit_config(["user.a=b"], ORIGIN, allow_privileged=True)  # type: ignore[arg-type]


def test_oversized_values_are_refused() -> None:
    with pytest.raises(cfg.ConfigRefused, match="characters long"):
        admit({"user.blob": "x" * (cfg.MAX_VALUE + 1)})
    with pytest.raises(cfg.ConfigRefused, match="characters long"):
        admit({"user." + "k" * cfg.MAX_KEY: "x"})


def test_image_and_volatile_stay_read_only_for_operators() -> None:
    for key, value in (("image.init", "busybox"), ("volatile.eth0.hwaddr", "00:16:3e:00:00:01")):
        assert admit({key: value}) == {key: value}
        with pytest.raises(InvalidInput, match="set by the runtime"):
            cfg.validate(key, value)


# privilege: one decision --------------------------------------------------------------------
def test_privileged_config_needs_the_operators_flag() -> None:
    with pytest.raises(cfg.ConfigRefused) as ei:
        admit({"security.privileged": "true"})
    assert "security.privileged=true" in str(ei.value) and ORIGIN in str(ei.value)
    assert "--allow-privileged" in ei.value.hint
    assert admit({"security.privileged": "1"}, allow_privileged=True) == {
        "security.privileged": "true"}
    assert admit({}) == {}  # unprivileged by default: no flag needed


@pytest.mark.parametrize(("config", "claimed"), [
    ({"security.privileged": "true"}, False), ({}, True),
    ({"security.privileged": "false"}, True)])
def test_a_source_that_contradicts_itself_is_refused(config: dict[str, str],
                                                     claimed: bool) -> None:
    with pytest.raises(cfg.ConfigRefused, match="security.privileged") as ei:
        cfg.privilege_of(config, ORIGIN, allow_privileged=True, claimed=claimed)
    assert f"privileged={str(claimed).lower()}" in str(ei.value)


def test_privilege_of_agrees_with_its_source() -> None:
    assert cfg.privilege_of({"security.privileged": "true"}, ORIGIN, allow_privileged=True,
                            claimed=True)
    assert not cfg.privilege_of({}, ORIGIN, allow_privileged=False, claimed=False)


def test_an_lxd_exports_config_keeps_only_what_passes_the_gate() -> None:
    from migrator.exchange.lxd_config import convert_config

    conf, dropped = convert_config({
        "user.user-data": "#cloud-config\npackages: [x]", "user.ok": "fine",
        "image.os": "Debian", "image.serial": "20260101", "image.init": "openrc\n",
        "volatile.eth0.hwaddr": "aa:bb:cc:dd:ee:ff\nlxc.hook.pre-start = /bin/sh",
        "volatile.last_state.idmap": "[]", "raw.lxc": "lxc.hook.pre-start = /bin/sh"})
    assert conf == {"user.ok": "fine", "image.os": "Debian"}
    reasons = {d.split("=")[0]: d for d in dropped}
    assert set(reasons) == {"user.user-data", "image.serial", "image.init", "raw.lxc"}
    assert "control character" in reasons["user.user-data"]
    assert "\n" not in "".join(dropped)  # shown escaped: a report line stays one line


def test_without_volatile_drops_only_volatile_keys() -> None:
    conf = {"volatile.eth0.hwaddr": "02:00:00:00:00:01", "user.note": "volatile.x",
            "limits.cpu": "1", "volatile.last_state.idmap": "[]"}
    assert cfg.without_volatile(conf) == {"user.note": "volatile.x", "limits.cpu": "1"}
    assert "volatile.eth0.hwaddr" in conf  # the caller's config is left as it was
