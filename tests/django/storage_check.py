#!/usr/bin/env python3
"""Django's FileSystemStorage on a cutoverfs mount (issue 5).

Usage: storage_check.py MEDIA_ROOT UPLOAD_TEMP_DIR [--existing REL=SHA256]...
           [--delete-existing REL] [--overwrite-existing REL] [--report PATH]

MEDIA_ROOT is the mount; UPLOAD_TEMP_DIR must be on another filesystem, so that moving an
upload into the storage takes Django's copy fallback (os.rename fails with EXDEV) exactly as
in production, where uploads are spooled to /tmp. Every step asserts its result with the
observed values in the message; the first failure exits non-zero. On success a one-line
summary is printed, and --report writes what the storage now holds (relative path -> sha256,
plus the names deleted) for the caller to check through the mount, in the local tree and at
the dest.

Standalone: Django is configured in-process, no project, no database.
"""

import argparse
import errno
import hashlib
import io
import json
import os
import re
import stat
import sys
import threading
import time
import traceback
from datetime import datetime, timezone

import django
from django.conf import settings

STEPS = []


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def step(name):
    """Runs the decorated function at once as one named step (steps run in file order)."""

    def run(fn):
        started = time.monotonic()
        try:
            fn()
        except CheckFailed as e:
            fail(f"step '{name}': {e}")
        except Exception:  # an unexpected errno from the mount is a failure too
            fail(f"step '{name}' raised:\n{traceback.format_exc()}")
        STEPS.append((name, time.monotonic() - started))
        return fn

    return run


def fail(message):
    print(f"storage_check: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def pseudo_random(length, seed):
    """Deterministic incompressible bytes (a hash chain), so a misplaced chunk shows."""
    out = bytearray()
    block = seed.to_bytes(8, "little")
    while len(out) < length:
        block = hashlib.sha256(block).digest()
        out += block * 64  # 2 KiB per hash keeps 5 MiB quick; chunk offsets still differ
    return bytes(out[:length])


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("media_root")
    p.add_argument("upload_temp_dir")
    p.add_argument("--existing", action="append", default=[], metavar="REL=SHA256")
    p.add_argument("--delete-existing", action="append", default=[], metavar="REL")
    p.add_argument("--overwrite-existing", action="append", default=[], metavar="REL")
    p.add_argument("--report")
    return p.parse_args()


args = parse_args()
MEDIA_ROOT = os.path.abspath(args.media_root)
TEMP_DIR = os.path.abspath(args.upload_temp_dir)

settings.configure(
    DEBUG=False,
    USE_TZ=True,
    TIME_ZONE="UTC",
    MEDIA_ROOT=MEDIA_ROOT,
    MEDIA_URL="/media/",
    FILE_UPLOAD_TEMP_DIR=TEMP_DIR,
    # Anything above 64 KiB goes to a temporary file, as with a real upload of a photo.
    FILE_UPLOAD_MAX_MEMORY_SIZE=64 * 1024,
    DATA_UPLOAD_MAX_MEMORY_SIZE=None,
    FILE_UPLOAD_PERMISSIONS=0o644,
    FILE_UPLOAD_DIRECTORY_PERMISSIONS=0o755,
    FILE_UPLOAD_HANDLERS=[
        "django.core.files.uploadhandler.MemoryFileUploadHandler",
        "django.core.files.uploadhandler.TemporaryFileUploadHandler",
    ],
    ALLOWED_HOSTS=["testserver"],
    INSTALLED_APPS=[],
)
django.setup()

from django.core.files import File  # noqa: E402
from django.core.files.base import ContentFile  # noqa: E402
from django.core.files.storage import FileSystemStorage  # noqa: E402
from django.core.files.uploadedfile import (  # noqa: E402
    InMemoryUploadedFile,
    TemporaryUploadedFile,
)
from django.test import RequestFactory  # noqa: E402

storage = FileSystemStorage()  # MEDIA_ROOT and the permission settings from above
expected = {}  # relative path -> sha256 of what the storage must hold at the end
deleted = []

# Every os.rename Django attempts, with its outcome: proves which path of file_move_safe ran.
renames = []
_real_rename = os.rename


def _recording_rename(src, dst, *a, **kw):
    try:
        _real_rename(src, dst, *a, **kw)
    except OSError as e:
        renames.append((str(src), str(dst), e.errno))
        raise
    renames.append((str(src), str(dst), 0))


os.rename = _recording_rename


def read(name):
    with storage.open(name, "rb") as f:
        return f.read()


def assert_stored(name, content, what):
    check(storage.exists(name), f"{what}: exists({name!r}) is False")
    check(
        storage.size(name) == len(content),
        f"{what}: size({name!r}) = {storage.size(name)}, wrote {len(content)}",
    )
    got = read(name)
    check(
        got == content,
        f"{what}: {name!r} reads back {len(got)} bytes (sha256 {sha256(got)[:12]}), "
        f"wrote {len(content)} (sha256 {sha256(content)[:12]})",
    )
    # And the plain file system agrees with the storage API.
    st = os.stat(storage.path(name))
    check(stat.S_ISREG(st.st_mode), f"{what}: {name!r} is not a regular file")
    check(
        stat.S_IMODE(st.st_mode) == 0o644,
        f"{what}: {name!r} has mode {oct(stat.S_IMODE(st.st_mode))}, "
        "FILE_UPLOAD_PERMISSIONS is 0o644",
    )
    expected[name] = sha256(content)


def listdir(path):
    dirs, files = storage.listdir(path)
    return sorted(dirs), sorted(files)


class settings_override:
    def __init__(self, **values):
        from django.test.utils import override_settings

        self._o = override_settings(**values)

    def __enter__(self):
        self._o.enable()

    def __exit__(self, *exc):
        self._o.disable()


def overwrite_storage():
    """A storage that replaces files: allow_overwrite (Django 5.1+, O_TRUNC without O_EXCL),
    or on older versions the documented OS_OPEN_FLAGS idiom doing the same."""
    if django.VERSION >= (5, 1):
        return FileSystemStorage(allow_overwrite=True)

    class Overwrite(FileSystemStorage):
        OS_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

        def get_available_name(self, name, max_length=None):
            return name

    return Overwrite()


@step("the storage root is the mount and the temp dir is another file system")
def _():
    check(os.path.isdir(MEDIA_ROOT), f"{MEDIA_ROOT} is not a directory")
    check(os.path.isdir(TEMP_DIR), f"{TEMP_DIR} is not a directory")
    check(storage.location == MEDIA_ROOT, f"location {storage.location} != {MEDIA_ROOT}")
    root_dev = os.stat(MEDIA_ROOT).st_dev
    temp_dev = os.stat(TEMP_DIR).st_dev
    check(
        root_dev != temp_dev,
        f"{TEMP_DIR} is on the same file system as {MEDIA_ROOT} (st_dev {root_dev}): "
        "the cross-file-system move would not be exercised",
    )


@step("files that were there before the mount are served")
def _():
    for spec in args.existing:
        rel, want = spec.split("=", 1)
        check(storage.exists(rel), f"exists({rel!r}) is False")
        data = read(rel)
        check(
            sha256(data) == want,
            f"{rel!r} reads {len(data)} bytes with sha256 {sha256(data)}, expected {want}",
        )
        check(storage.size(rel) == len(data), f"size({rel!r}) {storage.size(rel)} != {len(data)}")
        parent, base = os.path.split(rel)
        check(base in listdir(parent)[1], f"{base!r} not in listdir({parent!r}): {listdir(parent)}")
        expected[rel] = want


@step("save with name collisions gets distinct names from get_available_name")
def _():
    names = []
    contents = [f"report version {i}\n".encode() * (i + 1) for i in range(3)]
    for content in contents:
        names.append(storage.save("reports/summary.txt", ContentFile(content)))
    check(names[0] == "reports/summary.txt", f"first save stored as {names[0]!r}")
    check(len(set(names)) == 3, f"three saves of one name gave {names}")
    for name in names[1:]:
        check(
            re.fullmatch(r"reports/summary_[A-Za-z0-9]{7}\.txt", name),
            f"{name!r} is not get_available_name's pattern summary_XXXXXXX.txt",
        )
    for name, content in zip(names, contents):
        assert_stored(name, content, "collision save")
    # What the next save would get: not any name already taken.
    nxt = storage.get_available_name("reports/summary.txt")
    check(nxt not in names and not storage.exists(nxt), f"get_available_name gave {nxt!r}")
    dirs, files = listdir("reports")
    check(dirs == [], f"reports has directories {dirs}")
    check(files == sorted(os.path.basename(n) for n in names), f"listdir(reports) = {files}")


@step("concurrent saves of one name each get their own file (O_CREAT|O_EXCL)")
def _():
    results, errors = {}, []
    barrier = threading.Barrier(8)

    def worker(i):
        try:
            content = f"writer {i}\n".encode() * 1000
            barrier.wait()
            results[storage.save("race/same.bin", ContentFile(content))] = content
        except Exception as e:  # reported below with the others
            errors.append(f"writer {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(not errors, f"concurrent saves failed: {errors}")
    check(len(results) == 8, f"8 concurrent saves gave {len(results)} names: {sorted(results)}")
    for name, content in results.items():
        assert_stored(name, content, "concurrent save")
    check(len(listdir("race")[1]) == 8, f"listdir(race) = {listdir('race')}")


def multipart_upload(field_name, file_name, content):
    """POSTs `content` as a multipart upload and lets Django's upload handlers parse it: in
    64 KiB chunks, spooled to FILE_UPLOAD_TEMP_DIR once it exceeds 64 KiB."""
    request = RequestFactory().post(
        "/upload/",
        {field_name: _NamedBytes(file_name, content)},
    )
    uploaded = request.FILES[field_name]
    return uploaded


class _NamedBytes(io.BytesIO):
    """What RequestFactory encodes as a file part: a readable object with a name."""

    def __init__(self, name, data):
        super().__init__(data)
        self.name = name


@step("a 5 MiB chunked upload is moved in from a temp dir on another file system")
def _():
    content = pseudo_random(5 * 1024 * 1024 + 12345, 1)
    uploaded = multipart_upload("document", "invoice.pdf", content)
    check(
        isinstance(uploaded, TemporaryUploadedFile),
        f"the upload is a {type(uploaded).__name__}, not a TemporaryUploadedFile",
    )
    temp_path = uploaded.temporary_file_path()
    check(
        os.path.dirname(temp_path) == TEMP_DIR,
        f"the upload was spooled to {temp_path}, not into {TEMP_DIR}",
    )
    check(uploaded.size == len(content), f"upload size {uploaded.size} != {len(content)}")
    temp_mtime = os.stat(temp_path).st_mtime_ns
    renames.clear()
    name = storage.save("documents/2025/01/19/invoice.pdf", uploaded)
    uploaded.close()
    check(name == "documents/2025/01/19/invoice.pdf", f"stored as {name!r}")
    # os.rename across file systems fails with EXDEV; Django then copies in 64 KiB chunks.
    check(
        renames and renames[0][2] == errno.EXDEV,
        f"expected os.rename to fail with EXDEV first, saw {renames}",
    )
    check(not os.path.exists(temp_path), f"the temp file {temp_path} is still there")
    assert_stored(name, content, "chunked upload")
    # file_move_safe copies the temp file's times with copystat (utimens on the mount).
    got_mtime = os.stat(storage.path(name)).st_mtime_ns
    check(
        got_mtime == temp_mtime,
        f"mtime after copystat is {got_mtime}, the temp file had {temp_mtime}",
    )
    for d in ("documents", "documents/2025", "documents/2025/01", "documents/2025/01/19"):
        mode = stat.S_IMODE(os.stat(storage.path(d)).st_mode)
        check(mode == 0o755, f"{d} has mode {oct(mode)}, FILE_UPLOAD_DIRECTORY_PERMISSIONS 0o755")


@step("the same upload again collides and is copied under a new name")
def _():
    content = pseudo_random(300 * 1024, 2)
    uploaded = multipart_upload("document", "invoice.pdf", content)
    check(isinstance(uploaded, TemporaryUploadedFile), f"got {type(uploaded).__name__}")
    name = storage.save("documents/2025/01/19/invoice.pdf", uploaded)
    uploaded.close()
    check(
        re.fullmatch(r"documents/2025/01/19/invoice_[A-Za-z0-9]{7}\.pdf", name),
        f"a colliding upload was stored as {name!r}",
    )
    assert_stored(name, content, "colliding upload")
    check(len(listdir("documents/2025/01/19")[1]) == 2, f"{listdir('documents/2025/01/19')}")


@step("an upload spooled on the mount itself is moved in by rename")
def _():
    # Some deployments put FILE_UPLOAD_TEMP_DIR below MEDIA_ROOT: then file_move_safe's
    # os.rename succeeds inside the mount.
    spool = storage.path("tmp-uploads")
    os.makedirs(spool, exist_ok=True)
    content = pseudo_random(200 * 1024, 3)
    # The settings are read when the temporary file is created.
    with settings_override(FILE_UPLOAD_TEMP_DIR=spool):
        upload = TemporaryUploadedFile("scan.png", "image/png", len(content), None)
    for off in range(0, len(content), 64 * 1024):
        upload.write(content[off : off + 64 * 1024])
    upload.flush()
    temp_path = upload.temporary_file_path()
    check(os.path.dirname(temp_path) == spool, f"spooled to {temp_path}, not {spool}")
    renames.clear()
    name = storage.save("avatars/scan.png", upload)
    upload.close()
    check(name == "avatars/scan.png", f"stored as {name!r}")
    check(renames == [(temp_path, storage.path(name), 0)], f"renames: {renames}")
    check(not os.path.exists(temp_path), f"{temp_path} still exists after the rename")
    assert_stored(name, content, "rename within the mount")
    check(listdir("tmp-uploads") == ([], []), f"tmp-uploads holds {listdir('tmp-uploads')}")
    storage.delete("tmp-uploads")  # FileSystemStorage.delete rmdirs a directory
    check(not storage.exists("tmp-uploads"), "tmp-uploads still exists after delete")


@step("a small upload stays in memory and is streamed in")
def _():
    content = b"\x89PNG\r\n\x1a\n" + pseudo_random(10_000, 4)
    uploaded = multipart_upload("avatar", "me.png", content)
    check(
        isinstance(uploaded, InMemoryUploadedFile),
        f"a 10 KB upload is a {type(uploaded).__name__}",
    )
    name = storage.save("avatars/me.png", uploaded)
    check(name == "avatars/me.png", f"stored as {name!r}")
    assert_stored(name, content, "in-memory upload")


@step("a Django File over a local file is saved and read back in chunks")
def _():
    content = pseudo_random(1024 * 1024 + 7, 5)
    src = os.path.join(TEMP_DIR, "export.csv")
    with open(src, "wb") as f:
        f.write(content)
    with open(src, "rb") as f:
        name = storage.save("exports/export.csv", File(f, name="export.csv"))
    os.unlink(src)
    check(name == "exports/export.csv", f"stored as {name!r}")
    assert_stored(name, content, "File save")
    with storage.open(name) as f:
        chunks = list(f.chunks(chunk_size=100_000))
    check(b"".join(chunks) == content, "chunks() does not reassemble the file")
    check(len(chunks) == 11, f"{len(chunks)} chunks of 100 kB for {len(content)} bytes")


@step("overwriting an existing file truncates it in place")
def _():
    for rel in args.overwrite_existing:
        content = b"replaced by django\n" * 50
        name = overwrite_storage().save(rel, ContentFile(content))
        check(name == rel, f"overwrite stored as {name!r}, not {rel!r}")
        assert_stored(name, content, "overwrite")


@step("listdir shows directories and files")
def _():
    dirs, _files = listdir("")
    for d in ("reports", "race", "documents", "avatars", "exports"):
        check(d in dirs, f"{d!r} not in listdir('') dirs {dirs}")
    check(listdir("documents") == (["2025"], []), f"listdir(documents) = {listdir('documents')}")
    check(listdir("documents/2025") == (["01"], []), f"{listdir('documents/2025')}")
    check(
        listdir("exports") == ([], ["export.csv"]),
        f"listdir(exports) = {listdir('exports')}",
    )
    # Everything this script expects is listed where it should be, and nothing more in the
    # directories it created.
    for name in expected:
        parent, base = os.path.split(name)
        check(base in listdir(parent)[1], f"{base!r} not in listdir({parent!r})")
    for d in ("reports", "race", "exports"):
        listed = {f"{d}/{f}" for f in listdir(d)[1]}
        mine = {n for n in expected if n.startswith(d + "/")}
        check(listed == mine, f"listdir({d}) = {sorted(listed)}, expected {sorted(mine)}")


@step("modified, accessed and created times are sensible")
def _():
    now = datetime.now(timezone.utc)
    name = storage.save("times/now.txt", ContentFile(b"now"))
    expected[name] = sha256(b"now")
    for getter in (storage.get_modified_time, storage.get_accessed_time, storage.get_created_time):
        t = getter(name)
        check(t.tzinfo is not None, f"{getter.__name__} is naive with USE_TZ: {t}")
        check(
            abs((t - now).total_seconds()) < 60,
            f"{getter.__name__}({name!r}) = {t}, now is {now}",
        )
    # An explicit mtime in the past is what get_modified_time reports.
    old = 1_500_000_000.5
    os.utime(storage.path(name), (old, old))
    got = storage.get_modified_time(name).timestamp()
    check(abs(got - old) < 1e-3, f"get_modified_time after utime = {got}, set {old}")
    # Writing moves it forward again.
    with storage.open(name, "ab") as f:
        f.write(b" and later")
    expected[name] = sha256(b"now and later")
    got = storage.get_modified_time(name)
    check(got.timestamp() > old + 1000, f"mtime after append = {got}, was {old}")
    check(storage.size(name) == len(b"now and later"), f"size after append {storage.size(name)}")


@step("delete removes files and empty directories; missing names are not an error")
def _():
    # Short-lived files, as a form that saves an upload and then rejects it: deleted right
    # after close, while the copy that close queued may be in flight. Several sizes, so some
    # delete lands mid-copy; each reuses the freed name.
    for i in range(6):
        content = pseudo_random(4096 << i, 100 + i)
        name = storage.save("trash/gone.txt", ContentFile(content))
        check(name == "trash/gone.txt", f"a deleted name was not reused: {name!r}")
        check(storage.size(name) == len(content), f"size {storage.size(name)} != {len(content)}")
        storage.delete(name)
        check(not storage.exists(name), f"{name!r} exists after delete")
        check(not os.path.lexists(storage.path(name)), f"{name!r} still on the file system")
    storage.delete(name)  # Django ignores FileNotFoundError
    check(listdir("trash") == ([], []), f"listdir(trash) = {listdir('trash')}")
    storage.delete("trash")
    check(not storage.exists("trash"), "trash/ exists after delete")
    check("trash" not in listdir("")[0], "trash still listed")
    # A name in use still gets a suffix; the suffixed file deletes like any other.
    name = storage.save("reports/summary.txt", ContentFile(b"x"))
    check(name != "reports/summary.txt", f"a name still in use was reused: {name!r}")
    storage.delete(name)
    check(not storage.exists(name), f"{name!r} exists after delete")
    for rel in args.delete_existing:
        check(storage.exists(rel), f"{rel!r} does not exist before its delete")
        storage.delete(rel)
        check(not storage.exists(rel), f"{rel!r} exists after delete")
        parent, base = os.path.split(rel)
        check(base not in listdir(parent)[1], f"{base!r} still listed in {parent!r}")
        expected.pop(rel, None)
        deleted.append(rel)
    # Deleting one of the collision files frees its name: the next save takes it unsuffixed.
    first = "reports/summary.txt"
    storage.delete(first)
    expected.pop(first)
    again = storage.save(first, ContentFile(b"again\n"))
    check(again == first, f"a deleted name was not reused: {again!r}")
    assert_stored(again, b"again\n", "reuse after delete")


@step("a fresh storage object sees everything that was written")
def _():
    fresh = FileSystemStorage(location=MEDIA_ROOT)
    for name, want in sorted(expected.items()):
        with fresh.open(name, "rb") as f:
            data = f.read()
        check(sha256(data) == want, f"{name!r}: sha256 {sha256(data)}, expected {want}")
    for name in deleted:
        check(not fresh.exists(name), f"deleted {name!r} exists")


os.rename = _real_rename
if args.report:
    with open(args.report, "w") as f:
        json.dump({"files": expected, "deleted": deleted}, f, indent=1, sort_keys=True)
print(
    f"storage_check: Django {django.get_version()}: {len(STEPS)} steps passed, "
    f"{len(expected)} files in storage, {len(deleted)} deleted, "
    f"{sum(t for _, t in STEPS):.2f}s"
)
for name, took in STEPS:
    print(f"  ok  {name} ({took:.2f}s)")
