"""Data a pull receives (``FrameStream`` as the agent builds it for a pull): a LINK offer is
refused without connecting anywhere, and tar members go through the restore's tar guard
before the consumer sees a byte of them."""

from __future__ import annotations

import io
import os
import socket
import tarfile

import pytest

from migrator.core import errors
from migrator.pipelines.remote_target import volume_tar_checker as _tar_checker
from migrator.transport.datapath import FrameStream
from migrator.transport.frames import DATA, pack, write_end, write_link


def framed(payload: bytes, offer: dict | None = None) -> bytes:
    buf = io.BytesIO()
    if offer is not None:
        write_link(buf.write, offer)
    for i in range(0, len(payload), 4096):
        buf.write(pack(DATA, payload[i:i + 4096]))
    write_end(buf.write, {"bytes": len(payload)})
    return buf.getvalue()


def drain(fs: FrameStream) -> bytes:
    out = bytearray()
    while chunk := os.read(fs.fileno(), 1 << 16):
        out += chunk
    return bytes(out)


def volume_tar(*extra: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in (".", "./rootfs", "./rootfs/etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        data = b"root:x:0:0::/root:/bin/sh\n"
        info = tarfile.TarInfo("./rootfs/etc/passwd")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for member in extra:
            tar.addfile(member)
    return buf.getvalue()


def test_a_link_offer_is_refused_and_nothing_is_connected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import migrator.transport.link

    def connect(offer: object) -> None:
        pytest.fail(f"a pull connected to {offer}")

    monkeypatch.setattr(migrator.transport.link, "connect", connect)
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: pytest.fail("a socket was opened"))
    offer = {"address": "203.0.113.9", "port": 4444, "cipher": "aes-256-gcm",
             "secret": "AAAA"}
    fs = FrameStream(io.BytesIO(framed(b"x" * 100, offer)).read, "tar", "s0", None, "none",
                     follow_link=False)
    assert drain(fs) == b""
    with pytest.raises(errors.CallRefused, match=r"data link offer to '203\.0\.113\.9:4444'"):
        fs.close()
    assert fs.link == "channel"


def test_a_malformed_link_offer_is_refused_too() -> None:
    buf = io.BytesIO()
    buf.write(pack(b"L", b"\xff not json"))
    fs = FrameStream(io.BytesIO(buf.getvalue()).read, "tar", "s0", None, "none",
                     follow_link=False)
    drain(fs)
    with pytest.raises(errors.CallRefused, match="an address the sender named"):
        fs.close()


def test_a_clean_volume_tar_passes_the_guard() -> None:
    data = volume_tar()
    fs = FrameStream(io.BytesIO(framed(data)).read, "tar", "s0", None, "none",
                     _tar_checker(False), follow_link=False)
    got = drain(fs)
    fs.close()
    assert fs.raw == len(data)
    with tarfile.open(fileobj=io.BytesIO(got)) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        passwd = tar.extractfile(members["rootfs/etc/passwd"])
        assert passwd is not None and passwd.read().startswith(b"root:")


def _device() -> tarfile.TarInfo:
    dev = tarfile.TarInfo("./rootfs/etc/sda")
    dev.type, dev.devmajor, dev.devminor, dev.mode = tarfile.BLKTYPE, 8, 0, 0o666
    return dev


def _escape() -> tarfile.TarInfo:
    link = tarfile.TarInfo("./rootfs/etc/cron")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/cron.d"
    return link


def _outside() -> tarfile.TarInfo:
    f = tarfile.TarInfo("./hook.sh")
    return f


@pytest.mark.parametrize(("member", "why"), [(_device, "block device"),
                                              (_escape, "cron"),
                                              (_outside, "hook.sh")],
                         ids=["device", "escaping-link", "outside-rootfs"])
def test_a_hostile_member_is_refused_before_the_consumer_sees_it(member, why) -> None:  # type: ignore[no-untyped-def]
    data = volume_tar(member())
    fs = FrameStream(io.BytesIO(framed(data)).read, "tar", "s0", None, "none",
                     _tar_checker(False), follow_link=False)
    got = drain(fs)
    with pytest.raises(errors.UnsafeArchive, match=why):
        fs.close()
    assert member().name.encode() not in got  # its header never reached the pipe


def test_devices_pass_for_a_privileged_container() -> None:
    data = volume_tar(_device())
    fs = FrameStream(io.BytesIO(framed(data)).read, "tar", "s0", None, "none",
                     _tar_checker(True), follow_link=False)
    got = drain(fs)
    fs.close()
    with tarfile.open(fileobj=io.BytesIO(got)) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        assert members["rootfs/etc/sda"].isblk()


def test_a_tar_cut_between_members_is_refused() -> None:
    data = volume_tar().rstrip(b"\0")  # without its end-of-archive blocks
    data += bytes(-len(data) % 512)
    fs = FrameStream(io.BytesIO(framed(data)).read, "tar", "s0", None, "none",
                     _tar_checker(False), follow_link=False)
    drain(fs)
    with pytest.raises(errors.CorruptBackup, match="truncated"):
        fs.close()


def test_an_images_standard_dev_nodes_pass_for_an_unprivileged_container() -> None:
    null = tarfile.TarInfo("./rootfs/dev/null")
    null.type, null.devmajor, null.devminor, null.mode = tarfile.CHRTYPE, 1, 3, 0o666
    dev = tarfile.TarInfo("./rootfs/dev")
    dev.type, dev.mode = tarfile.DIRTYPE, 0o755
    fs = FrameStream(io.BytesIO(framed(volume_tar(dev, null))).read, "tar", "s0", None,
                     "none", _tar_checker(False), follow_link=False)
    drain(fs)
    fs.close()
    mem = tarfile.TarInfo("./rootfs/dev/mem")  # /dev/mem is no such harmless node
    mem.type, mem.devmajor, mem.devminor, mem.mode = tarfile.CHRTYPE, 1, 1, 0o666
    fs = FrameStream(io.BytesIO(framed(volume_tar(dev, mem))).read, "tar", "s0", None,
                     "none", _tar_checker(False), follow_link=False)
    drain(fs)
    with pytest.raises(errors.UnsafeArchive, match="dev/mem"):
        fs.close()
