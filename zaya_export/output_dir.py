"""How zaya-export writes a directory (an artifact, a checkpoint) so that nothing of the user's is ever lost.

The rules, in the order :func:`writing` applies them:

- **Ownership.** An existing ``out`` is replaced only with ``force``, and only when zaya-export wrote it: an
  artifact (its ``manifest.json`` names this format) or a checkpoint carrying the :data:`MARKER` file
  ``save_checkpoint`` writes. Never the source being read, nor a directory that contains the source.
- **One writer.** An exclusive ``flock`` on ``.<name>.lock`` beside ``out``; a second writer fails at once.
- **Writable first.** The lock file and the temporary directory are created before any work, so a read-only or
  missing parent fails in the first second, not after the export.
- **Atomic swap.** The new tree is built in ``.<name>.tmp-*`` and swapped in with ``renameat2(RENAME_EXCHANGE)``
  (Linux): at every instant ``out`` is either the old or the new complete tree. Where that call is missing, the
  old tree is renamed to ``.<name>.old-*`` first; a writer that finds ``out`` gone and an ``.old`` tree puts it
  back before anything else, so an interrupted swap never loses the previous artifact.
- **No leftovers.** Temporary trees of writers that died (kill -9) are removed by the next writer of that path.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from zaya_export.errors import ZayaError

MARKER = ".zaya-export"  # written into every checkpoint zaya-export saves: {"kind": "checkpoint"}
ARTIFACT_FORMAT = "zaya-export-artifact"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class OutputError(ZayaError):
    """An output path that cannot (or must not) be written."""


def written_by_us(path: Path) -> str | None:
    """``"artifact"`` or ``"checkpoint"`` when zaya-export wrote the directory ``path``, else None."""
    try:
        if (path / MARKER).is_file():
            return "checkpoint"
        manifest = path / "manifest.json"
        if manifest.is_file() and manifest.stat().st_size < 64 << 20:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("format") == ARTIFACT_FORMAT:
                return "artifact"
    except (OSError, ValueError, RecursionError):
        return None
    return None


def check_replaceable(out: Path, force: bool, kind: str, sources: Sequence[Path] = ()) -> None:
    """Refuse ``out`` when writing it would destroy something that is not ours (see the module rules): with
    ``force`` an existing ``out`` must be a directory zaya-export wrote as the same ``kind`` ("artifact" or
    "checkpoint"), so an export never replaces a checkpoint and ``init`` never an artifact."""
    real = out.resolve()
    for src in sources:
        s = Path(src).resolve()
        if s == real or real in s.parents:
            raise OutputError(f"{out}: is or contains the input {src}; write the output somewhere else")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise OutputError(f"{out}: already exists (use --force to replace it)")
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory zaya-export wrote; --force will not replace it")
    found = written_by_us(out)
    if found is None:
        raise OutputError(f"{out}: exists and was not written by zaya-export (no manifest.json or {MARKER}); "
                          f"--force only replaces zaya-export's own {kind}s")
    if found != kind:
        raise OutputError(f"{out}: holds a zaya-export {found}, not a {kind}; --force will not replace it")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system has no ``renameat2`` exchange."""
    if os.environ.get("ZAYA_EXPORT_NO_RENAME_EXCHANGE"):  # exercises the fallback protocol in tests
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _recover_and_clean(out: Path) -> None:
    """Under the lock: restore an ``.old`` tree an interrupted fallback swap left, drop dead writers' trees."""
    parent, name = out.parent, out.name
    olds = sorted(parent.glob(f".{name}.old-*"))
    if olds and not out.exists():
        os.replace(olds.pop(), out)
    for stale in [*olds, *parent.glob(f".{name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{out}: another zaya-export is writing it right now") from None
        try:  # the previous holder may have unlinked the file between our open and our lock: retry on the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


@contextmanager
def writing(out: Path, force: bool, kind: str, sources: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without an exception it becomes ``out``."""
    out = Path(out)
    check_replaceable(out, force, kind, sources)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)
        lock.__enter__()
    except OSError as exc:
        raise OutputError(f"{out}: cannot write there ({exc.strerror})") from None
    try:
        _recover_and_clean(out)
        check_replaceable(out, force, kind, sources)  # again, now that no other writer can change it
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)
            if not out.exists():
                os.replace(tmp, out)
            elif _exchange(tmp, out):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old tree
            else:
                old = Path(str(tmp).replace(".tmp-", ".old-", 1))
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as exc:
        where = exc.filename or out
        raise OutputError(f"{where}: {exc.strerror}; {out} was left as it was") from None
    finally:
        lock.__exit__(None, None, None)
