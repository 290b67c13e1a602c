"""The post-copy page link as the target receives it (``live_target._page_link``: every value
checked before criu is pointed at it) and the TLS files criu gets (``CriuTls``)."""

from __future__ import annotations

import base64

import pytest

from migrator.checkpoint.base import CriuTls
from migrator.core import errors
from migrator.pipelines.live_target import _page_link
from migrator.transport.link import Identity


def _cert() -> str:
    return Identity().encoded()


@pytest.mark.parametrize("link", [
    None, "1.2.3.4:5", {"address": "example.org", "port": 1, "cert": "x"},
    {"address": "198.51.100.1; rm -rf /", "port": 1, "cert": "x"},
    {"address": "198.51.100.1", "port": True, "cert": "x"},
    {"address": "198.51.100.1", "port": 70000, "cert": "x"},
    {"address": "198.51.100.1", "port": "22", "cert": "x"},
])
def test_the_target_refuses_a_malformed_link(link) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.InvalidInput):
        _page_link(link)


def test_the_target_refuses_a_malformed_certificate() -> None:
    bad = base64.b64encode(b"not a certificate").decode()
    with pytest.raises(errors.MigratorError):
        _page_link({"address": "198.51.100.1", "port": 4000, "cert": bad})
    assert _page_link({"address": "198.51.100.1", "port": 4000, "cert": _cert()})[:2] == \
        ("198.51.100.1", 4000)


def test_criu_tls_files_are_private(tmp_path) -> None:  # type: ignore[no-untyped-def]
    me, peer = Identity(), Identity()
    tls = CriuTls.write(tmp_path / "pl", me.key_pem(), me.der, peer.der)
    assert (tmp_path / "pl").stat().st_mode & 0o777 == 0o700
    for name in ("key.pem", "cert.pem", "peer.pem"):
        assert (tmp_path / "pl" / name).stat().st_mode & 0o777 == 0o600
    assert tls.argv()[:2] == ["--tls", "--tls-cacert"] and "--tls-no-cn-verify" in tls.argv()
    tls.remove()
    assert not (tmp_path / "pl").exists()
    with pytest.raises(errors.CheckpointError):
        CriuTls.write(tmp_path / "with blank", me.key_pem(), me.der)
