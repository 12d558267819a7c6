"""What a media path really is, in words: the one check behind every "cannot read this file" message.

Used by the video loader (:mod:`videollm.processors.video_loader`) and the datasets' bad-sample
checks (:mod:`videollm.datasets.bad_samples`), so that both tell a missing file from a broken
symbolic link, and a named pipe or a device from an empty file (``os.path.getsize`` is 0 for all
three, and ``os.path.isfile`` is False for a pipe and for a link to a device alike).
"""

from __future__ import annotations

import os
import stat
from typing import Optional, Tuple

# Reason codes (the bad-sample reasons of videollm.datasets.bad_samples).
MISSING, NOT_A_FILE, EMPTY = "missing", "not_a_file", "empty"


def describe_path(path: str) -> Optional[Tuple[str, str]]:
    """``None`` for a readable regular file with data, else ``(reason, message)``.

    ``reason`` is ``missing`` (no such file, broken symbolic link, permission denied),
    ``not_a_file`` (directory, named pipe, character or block device, socket) or ``empty``
    (0 bytes). A named pipe is never opened: reading one could block forever. Messages say
    when a symbolic link was followed, and to what.
    """
    if not os.path.lexists(path):
        return MISSING, "no such file"
    link = ""
    if os.path.islink(path):
        target = os.readlink(path)
        if not os.path.exists(path):
            return MISSING, f"broken symbolic link (its target {target} does not exist)"
        link = f" (through a symbolic link to {target})"
    try:
        st = os.stat(path)
    except OSError as exc:
        return MISSING, f"cannot be accessed: {exc.strerror or exc}"
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return NOT_A_FILE, f"is a directory, not a regular file{link}"
    if stat.S_ISFIFO(mode):
        return NOT_A_FILE, f"is a named pipe (FIFO), not a regular file; not read, it could block{link}"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "character" if stat.S_ISCHR(mode) else "block"
        return NOT_A_FILE, f"is a {kind} device, not a regular file{link}"
    if stat.S_ISSOCK(mode):
        return NOT_A_FILE, f"is a socket, not a regular file{link}"
    if not stat.S_ISREG(mode):
        return NOT_A_FILE, f"is not a regular file{link}"
    if st.st_size == 0:
        return EMPTY, f"empty file (0 bytes){link}"
    if not os.access(path, os.R_OK):
        return MISSING, f"permission denied (not readable by this user){link}"
    return None
