"""Crash-safe file writing: a temp file in the same folder, fsync, then an atomic rename."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from PIL import Image


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; restored at once
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import, before any thread could race with the round trip


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 minus the umask).
        os.fchmod(descriptor, 0o666 & ~_UMASK)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def png_bytes(image: Image.Image) -> bytes:
    """A PIL image encoded as PNG, in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
