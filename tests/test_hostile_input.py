"""Hostile and careless input (issue 25): nothing hangs, nothing is lost or doubled, nothing outside the output is
touched, and a bad config fails in one line. Each test would fail on the code before its fix."""

from __future__ import annotations

import os
import threading

import pytest

from stylid_core.storage import StorageError, read_bytes


def _read_within(uri: str, seconds: float = 5.0, **kwargs) -> BaseException | bytes:
    """``read_bytes(uri)`` in a thread; what it returned or raised, or fails the test if it is still running."""
    box: list = []

    def target() -> None:
        try:
            box.append(read_bytes(uri, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"read_bytes({uri!r}) still running after {seconds} s"
    return box[0]


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_a_fifo_is_refused_unread_instead_of_hanging(tmp_path, prefix):
    fifo = tmp_path / "style.png"
    os.mkfifo(fifo)
    result = _read_within(f"{prefix}{fifo}", max_bytes=1000)
    assert isinstance(result, StorageError) and result.status == "missing"
    assert str(result).startswith(f"{prefix}{fifo}: ") and "FIFO" in str(result)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_device_files_are_refused_unread(device):
    for max_bytes in (1000, None):
        result = _read_within(device, max_bytes=max_bytes)
        assert isinstance(result, StorageError) and result.status == "missing", result
        assert str(result).startswith(f"{device}: not a regular file (a character device)")


def test_a_read_is_bounded_by_the_bytes_read_not_the_size_reported(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/hostile/big.bin", b"x" * 5000)
    fs.size = lambda path: 0  # a server (or a special file) that reports no size
    try:
        result = _read_within("memory://hostile/big.bin", max_bytes=1000)
    finally:
        del fs.size
        fs.rm("/hostile/big.bin")
    assert isinstance(result, StorageError) and result.status == "too_large", result
    assert str(result).startswith("memory://hostile/big.bin: ")
    # a regular local file within the limit still reads whole, one over it is refused
    ok = tmp_path / "ok.bin"
    ok.write_bytes(b"y" * 1000)
    assert _read_within(str(ok), max_bytes=1000) == b"y" * 1000
    assert _read_within(str(ok), max_bytes=999).status == "too_large"


def test_storage_errors_start_with_the_uri(tmp_path):
    missing = str(tmp_path / "nope.jpg")
    assert str(_read_within(missing)).startswith(f"{missing}: not found")
    assert str(_read_within(str(tmp_path))).startswith(f"{tmp_path}: is a directory")


def test_image_keys_are_distinct_for_distinct_ids():
    from pipelines.schema import object_key

    first = object_key("a/b")
    assert object_key(first) != first  # the file-safe form of a/b, itself a valid id, no longer shares its file
    ids = ["a/b", first, "a_b", "a_b-c14cddc0", "a\\b", "a b", "a/b/", "../../escape", "/abs", "x\x00y", "\u202eabc",
           "é", "e\u0301", "A", "a", ".", "..", "id", "x" * 5000, "x" * 5001, "x" * 128, "x" * 129]  # fmt: skip
    keys = [object_key(i) for i in ids]
    assert len(set(keys)) == len(ids), [k for k in keys if keys.count(k) > 1]
    for key in keys:
        assert "/" not in key and "\\" not in key and key not in (".", "..") and len(key) <= 128
    assert object_key("plain-id_1.v2") == "plain-id_1.v2"  # an ordinary safe id is its own key
