"""migrator.core.errors: one distinct exit code per error class, readable CommandFailed messages."""

from __future__ import annotations

import importlib
import io
import pkgutil

import pytest

import migrator
from migrator.core import errors
from migrator.core.errors import ALL_ERRORS, CommandFailed, MigratorError
from migrator.transport.frames import ProtocolError, read_json, write_json
from migrator.transport.replies import error_reply, parse_reply


def every_error_class() -> list[type[MigratorError]]:
    """Every ``MigratorError`` subclass in the tree, wherever it is defined: all modules of
    ``migrator`` imported, then the subclasses walked."""
    for module in pkgutil.walk_packages(migrator.__path__, "migrator."):
        importlib.import_module(module.name)
    found, todo = [], [MigratorError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: c.__name__)


EVERY_ERROR = every_error_class()
#: these describe this side's own failures and come back as RemoteError (transport/replies.py)
LOCAL_ONLY = (CommandFailed, ProtocolError)


def test_base_error_exit_code_is_one() -> None:
    assert MigratorError.exit_code == 1


def test_every_error_is_a_migrator_error() -> None:
    for cls in ALL_ERRORS:
        assert issubclass(cls, MigratorError), cls


def test_all_error_classes_of_the_module_are_listed() -> None:
    defined = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, MigratorError)
    }
    assert defined == set(ALL_ERRORS)


def test_exit_codes_are_unique() -> None:
    codes = [cls.exit_code for cls in ALL_ERRORS]
    dupes = {c for c in codes if codes.count(c) > 1}
    assert not dupes, {c: [k.__name__ for k in ALL_ERRORS if k.exit_code == c] for c in dupes}


def test_subclasses_do_not_inherit_the_base_code() -> None:
    for cls in ALL_ERRORS:
        if cls is not MigratorError:
            assert cls.exit_code != 1, cls.__name__
            # the code is defined on the class itself, not inherited from a parent
            assert "exit_code" in vars(cls), cls.__name__


@pytest.mark.parametrize("reserved", [0, 2, 130])
def test_no_error_uses_a_reserved_exit_code(reserved: int) -> None:
    # 0 is success, 2 is the usage error of the CLI parser, 130 is Ctrl-C
    assert all(cls.exit_code != reserved for cls in ALL_ERRORS)


def test_exit_codes_fit_in_a_process_status() -> None:
    assert all(0 < cls.exit_code < 256 for cls in ALL_ERRORS)


def test_hint_override_and_default() -> None:
    e = errors.MissingDependency("no lxc")
    assert e.hint == errors.MissingDependency.hint != ""
    e2 = errors.MissingDependency("no lxc", "install lxc")
    assert e2.hint == "install lxc"
    # overriding the hint on an instance leaves the class default alone
    assert errors.MissingDependency.hint != "install lxc"
    assert str(e2) == "no lxc" == e2.message


def test_nospace_is_a_storage_error() -> None:
    assert issubclass(errors.NoSpace, errors.StorageError)
    assert errors.NoSpace.exit_code != errors.StorageError.exit_code


def test_retryable_flags() -> None:
    assert errors.CommandTimeout.retryable is True
    assert errors.InvalidInput.retryable is False


def test_command_failed_names_the_command_and_exit_code() -> None:
    e = CommandFailed(["lxc-start", "-n", "web-1"], 1, "lxc-start: failed to start\n")
    msg = str(e)
    assert "'lxc-start'" in msg
    assert "exit code 1" in msg
    assert "failed to start" in msg
    assert e.argv == ["lxc-start", "-n", "web-1"]
    assert e.returncode == 1
    assert e.exit_code == 8


def test_command_failed_shows_only_the_stderr_tail() -> None:
    stderr = "\n".join(f"line {i}" for i in range(20)) + "\n"
    e = CommandFailed(["btrfs", "subvolume", "create"], 3, stderr)
    msg = str(e)
    for i in range(15, 20):
        assert f"line {i}" in msg
    assert "line 14" not in msg
    assert "line 0\n" not in msg and not msg.endswith("line 0")
    # the full stderr is kept on the exception
    assert e.stderr == stderr


def test_command_failed_without_stderr() -> None:
    e = CommandFailed(["true"], 5, "   \n")
    assert str(e) == "command 'true' failed with exit code 5"


def test_command_failed_hint() -> None:
    e = CommandFailed(["zfs"], 1, "boom", hint="load the zfs module")
    assert e.hint == "load the zfs module"


# every class, wherever it is defined ---------------------------------------------------------
def test_the_walk_finds_classes_defined_outside_the_errors_module() -> None:
    names = {c.__name__ for c in EVERY_ERROR}
    assert {"ProtocolError", "ConfigRefused", "BackupFormatError"} <= names
    assert set(ALL_ERRORS) <= set(EVERY_ERROR)


def test_error_class_names_are_unique_in_the_tree() -> None:
    names = [c.__name__ for c in EVERY_ERROR]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("cls", EVERY_ERROR, ids=lambda c: c.__name__)
def test_every_error_class_is_registered(cls: type[MigratorError]) -> None:
    """In ALL_ERRORS with a code of its own, or a refinement that keeps the code of its
    nearest registered parent; either way known by name to the wire."""
    assert errors.error_classes()[cls.__name__] is cls
    if cls not in ALL_ERRORS:
        assert "exit_code" not in vars(cls), cls.__name__
        parent = next(c for c in cls.__mro__[1:] if c in ALL_ERRORS)
        assert cls.exit_code == parent.exit_code


def _over_the_wire(e: MigratorError) -> MigratorError:
    """``e`` as the agent sends it (``error_reply`` in a JSON frame), read back by the
    client's reply gate."""
    buf = io.BytesIO()
    write_json(buf.write, error_reply(e))
    reply = read_json(io.BytesIO(buf.getvalue()).read)
    with pytest.raises(MigratorError) as got:
        parse_reply("host-b", "hello", reply)
    return got.value


@pytest.mark.parametrize("cls", EVERY_ERROR, ids=lambda c: c.__name__)
def test_every_error_crosses_the_wire_with_its_class_and_exit_code(
        cls: type[MigratorError]) -> None:
    e = cls(["lxc-start"], 1, "boom") if cls is CommandFailed else cls("boom", "try again")
    back = _over_the_wire(e)
    assert back.message == f"on host-b: {e.message}"
    assert back.hint == e.hint
    if cls in LOCAL_ONLY:
        assert type(back) is errors.RemoteError and back.exit_code == 18
    else:
        assert type(back) is cls and back.exit_code == cls.exit_code
