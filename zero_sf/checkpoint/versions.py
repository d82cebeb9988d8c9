"""Versions on disk and atomic files: ``path/v-NNNNNN-<id>/`` directories,
``COMMITTED`` inside each complete one, ``LATEST`` naming the newest (the
commit point, replaced atomically), and which versions a load tries."""

from __future__ import annotations

import os
import re
import shutil
import uuid

FORMAT = "zero_sf/3"
# /1: no checksums, no group structure; /2: no checksum of the metadata itself
READABLE = ("zero_sf/1", "zero_sf/2", "zero_sf/3")
VERSION = re.compile(r"^v-(\d{6})-[0-9a-f]+$")


def new_name(path: str) -> str:
    """The next version's directory name (rank 0 creates ``path``)."""
    os.makedirs(path, exist_ok=True)
    seq = max((s for s, _ in versions(path)), default=0) + 1
    return f"v-{seq:06d}-{uuid.uuid4().hex[:8]}"


def versions(path: str) -> list[tuple[int, str]]:
    """(sequence number, name) of every version directory, oldest first."""
    out = []
    for name in os.listdir(path) if os.path.isdir(path) else []:
        m = VERSION.match(name)
        if m:
            out.append((int(m.group(1)), name))
    return sorted(out)


def committed(path: str, name: str) -> bool:
    return os.path.exists(os.path.join(path, name, "COMMITTED"))


def write_atomically(file: str, text: str) -> None:
    tmp = f"{file}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def commit(path: str, version: str, keep: int) -> None:
    """Mark ``path/version`` complete and make it LATEST; delete all but the
    newest ``keep`` complete versions, and what crashed saves left behind."""
    target = os.path.join(path, version)
    write_atomically(os.path.join(target, "COMMITTED"), version)
    write_atomically(os.path.join(path, "LATEST"), version)  # the commit point
    done = [n for _, n in versions(path) if committed(path, n)]
    old = set(done[:-keep])
    # and what crashed saves left behind (never committed, older than this one)
    old |= {n for _, n in versions(path) if n != version and not committed(path, n)}
    for name in old:
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def candidates(path: str) -> list[str]:
    """LATEST first, then the older complete versions, newest first; a
    version directory (what save() returns and prints) is just itself."""
    name = os.path.basename(os.path.normpath(path))
    if VERSION.match(name) and os.path.isdir(path):
        if not committed(os.path.dirname(os.path.normpath(path)), name):
            raise FileNotFoundError(f"checkpoint version {path!r} is incomplete (no COMMITTED "
                                    "file: its save did not finish); load its parent directory "
                                    "for the newest complete version")
        return [path]
    latest = os.path.join(path, "LATEST")
    if not os.path.exists(latest):
        raise FileNotFoundError(f"no zero_sf checkpoint at {path!r} (no LATEST file)")
    with open(latest) as f:
        current = f.read().strip()
    named = VERSION.match(current)  # LATEST names a version: only older ones fall back
    older = [n for s, n in reversed(versions(path)) if n != current and committed(path, n)
             and (named is None or s < int(named.group(1)))]
    return [os.path.join(path, n) for n in [current] + older]
