"""migrator.core.errors: one distinct exit code per error class, readable CommandFailed messages."""

from __future__ import annotations

import pytest

from migrator.core import errors
from migrator.core.errors import ALL_ERRORS, CommandFailed, MigratorError


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
