"""The application after the switch (issue 18.3): Django configured with nothing but the settings
`cutoverfs switch-settings --framework django` printed, reading the migrated files through its
default storage (django-storages' S3Storage for an S3 dest, FileSystemStorage for a file://
one).

Usage: switch_check.py SETTINGS_FILE EXPECTED_JSON
  SETTINGS_FILE  the printed settings (a Python module's text)
  EXPECTED_JSON  {"files": {"relative/path": "sha256 hex", ...}, "absent": ["path", ...]}

For every expected file: open() returns the same bytes, size() matches, exists() is true, and
url() serves the same bytes over HTTP (a signed URL for S3). For every absent path, exists() is
false. Prints one line per check and exits non-zero on the first mismatch.
"""

import hashlib
import json
import sys
import urllib.error
import urllib.request

import django
from django.conf import settings


def main():
    settings_file, expected_file = sys.argv[1], sys.argv[2]
    namespace = {}
    with open(settings_file, encoding="utf-8") as f:
        exec(compile(f.read(), settings_file, "exec"), namespace)
    configured = {k: v for k, v in namespace.items() if k.isupper()}
    # The application's own MEDIA_URL, which the printed settings leave as it is.
    configured.setdefault("MEDIA_URL", "/media/")
    settings.configure(**configured)
    django.setup()

    from django.core.files.storage import default_storage, storages

    with open(expected_file, encoding="utf-8") as f:
        expected = json.load(f)

    backend = type(storages["default"])
    print(f"storage: {backend.__module__}.{backend.__name__}")
    for name, sha in sorted(expected["files"].items()):
        with default_storage.open(name, "rb") as f:
            data = f.read()
        check(hashlib.sha256(data).hexdigest() == sha, f"open({name!r}) read other bytes")
        check(default_storage.size(name) == len(data), f"size({name!r}) != {len(data)}")
        check(default_storage.exists(name), f"exists({name!r}) is false")
        url = default_storage.url(name)
        served = fetch(url)
        if url.startswith("http"):
            check("X-Amz-Signature=" in url, f"url({name!r}) is not signed: {url}")
            check(refused(url.split("?", 1)[0]), f"{name!r} is served without a signature")
        check(hashlib.sha256(served).hexdigest() == sha, f"url({name!r}) served other bytes")
        print(f"ok {name} {len(data)} bytes")
    for name in expected["absent"]:
        check(not default_storage.exists(name), f"exists({name!r}) is true for a path never there")
        print(f"ok absent {name}")


def fetch(url):
    if url.startswith("http://") or url.startswith("https://"):
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    # FileSystemStorage's url() is MEDIA_URL + name: the web server maps it to the root.
    # Served here from the storage's own location, as that web server would.
    from django.core.files.storage import default_storage

    prefix = default_storage.base_url
    check(url.startswith(prefix), f"url {url!r} is not below MEDIA_URL {prefix!r}")
    from urllib.parse import unquote

    with open(default_storage.path(unquote(url[len(prefix):])), "rb") as f:
        return f.read()


def refused(url):
    """True when the server refuses an unsigned GET: the object is private."""
    try:
        with urllib.request.urlopen(url, timeout=60):
            return False
    except urllib.error.HTTPError as e:
        return e.code in (401, 403)


def check(ok, message):
    if not ok:
        print(f"FAIL: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
