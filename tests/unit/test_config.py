"""runtime.config (LXD-style keys) and runtime.host.parse_size."""

from __future__ import annotations

import os

import pytest

from migrator.errors import InvalidInput
from runtime import config as cfg
from runtime.host import parse_size


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


def test_user_keys_are_free_form() -> None:
    assert (
        cfg.validate("user.note", "anything = goes, even\nnewlines")
        == "anything = goes, even\nnewlines"
    )
    assert cfg.validate("user.x", "") == ""


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
