"""A full disk, whoever meets it, is one DiskFullError naming the file, and one line from the command.

The real writes run in a child process under a file-size limit (`ulimit -f`): past it a write
fails with EFBIG, the same way a full file system fails one with ENOSPC, without privileges.
"""

import errno
import os
import pickle
import signal
import subprocess
import sys

import pytest

from runtime.files import DiskFullError, full_disk_is_an_error, no_room_errno, writing
from tests.conftest import file_size_limit

# replaces a file with 100 kB under a command's full-disk handling
WRITER = """
import sys
from runtime.files import full_disk_is_an_error, write_text
with full_disk_is_an_error("tool", "run it again"):
    write_text(sys.argv[1], "x" * 100_000)
"""


def test_a_write_past_the_limit_is_one_line_exit_1_and_the_old_file_stays(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("the old content")
    run = subprocess.run(
        [sys.executable, "-c", WRITER, str(path)], capture_output=True, text=True, preexec_fn=file_size_limit(10_000)
    )
    assert run.returncode == 1, run.stderr  # not killed by SIGXFSZ (-25)
    assert run.stderr == (
        f"tool: error: file too large writing {path}: raise the file size limit (ulimit -f) "
        "or write to another file system and run it again\n"
    )
    assert path.read_text() == "the old content"
    assert os.listdir(tmp_path) == ["out.txt"], "the temporary file was left behind"


def _raised_while_handling(inner: BaseException, outer: BaseException) -> BaseException:
    """`outer` with `inner` as its context, as a library that catches and raises its own leaves it."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 (the implicit context is the point)
    except BaseException as e:
        return e


def test_a_full_disk_is_found_behind_the_errors_libraries_wrap_it_in():
    torch_like = _raised_while_handling(OSError(errno.ENOSPC, "No space left on device"), RuntimeError("bad pos"))
    assert no_room_errno(torch_like) == errno.ENOSPC
    rust_like = RuntimeError("Error while serializing: I/O error: File too large (os error 27)")
    assert no_room_errno(rust_like) == errno.EFBIG
    assert no_room_errno(OSError(errno.EDQUOT, "Disk quota exceeded")) == errno.EDQUOT
    assert no_room_errno(OSError(errno.ENOENT, "No such file")) is None
    assert no_room_errno(RuntimeError("I/O error: not found (os error 2)")) is None
    assert no_room_errno(ValueError("bad")) is None


def test_writing_names_its_path_and_keeps_a_nested_writes_path(tmp_path):
    with pytest.raises(DiskFullError) as raised, writing(tmp_path / "outer"):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".outer.tmp"))
    assert raised.value.filename == str(tmp_path / "outer")
    assert str(raised.value) == f"no space left on device writing {tmp_path / 'outer'}"
    with pytest.raises(DiskFullError) as raised, writing(tmp_path / "outer"), writing(tmp_path / "inner"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.filename == str(tmp_path / "inner")
    with pytest.raises(FileNotFoundError), writing(tmp_path / "outer"):
        raise FileNotFoundError(errno.ENOENT, "No such file")


def test_a_disk_full_error_pickles_whole_from_a_worker_process():
    error = pickle.loads(pickle.dumps(DiskFullError(errno.EFBIG, "File too large", "/out/x.png")))
    assert isinstance(error, DiskFullError)
    assert (error.errno, error.filename, error.remedy) == (
        errno.EFBIG,
        "/out/x.png",
        "raise the file size limit (ulimit -f) or write to another file system",
    )


def test_the_command_reports_a_full_disk_in_one_line_and_lets_other_errors_through(capsys):
    with pytest.raises(SystemExit) as exited, full_disk_is_an_error("tool", "run it again"):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/x")  # met outside any `writing`
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "tool: error: no space left on device writing /data/x: free space on that file system and run it again\n"
    )
    with pytest.raises(ValueError), full_disk_is_an_error("tool", "run it again"):
        raise ValueError("not ours")


def test_the_command_ignores_sigxfsz_while_it_runs_and_puts_it_back():
    """CPython ignores SIGXFSZ at start-up anyway; the command does not count on it."""
    before = signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    try:
        with full_disk_is_an_error("tool", "run it again"):
            assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGXFSZ, before)
