"""Atomic files and directories: what a user saved is never lost or half-written.

A directory is written as a hidden sibling (``.NAME.tmp-PID-XXXX``) and swapped into place with Linux's
``renameat2(RENAME_EXCHANGE)``, so at every instant ``NAME`` is either the old complete directory or the new
one, whatever kills the process. Where the exchange is unsupported (other systems, some filesystems) two renames
are used, and :func:`recover_directory` (run by every save and load) undoes a crash between them. Leftovers of
dead processes are removed; those of live ones (a concurrent save) are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from safetensors import SafetensorError
from safetensors.torch import save_file

__all__ = [
    "atomic_directory", "atomic_file", "canonicalize_safetensors_header", "check_output_dir", "current_umask",
    "recover_directory", "save_safetensors",
]

_STAGES = ("tmp", "old")  # .NAME.tmp-PID-XXXX: being written (or the old one after a swap); .old-: moved aside


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(out_dir: str | os.PathLike, *, sources: Iterable = (), overwrite: bool = False) -> Path:
    """Refuse an output path whose replacement would destroy something: a file, the model being read (or a
    directory holding it), or a non-empty directory that is not one of our checkpoints (unless ``overwrite``)."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} is a file, not a directory: choose a directory for the checkpoint")
    for source in sources:
        if source is None or not Path(source).exists():
            continue
        source = Path(source).resolve()
        if out == source or out in source.parents:
            raise ValueError(f"output directory {out} would replace the model being read ({source}): choose another")
    if out.is_dir() and not (os.access(out, os.W_OK) and out.stat().st_mode & stat.S_IWUSR):
        # the swap would succeed, but the old copy could not be deleted: a hidden leftover the user cannot remove
        raise PermissionError(f"output directory {out} is read-only; saving replaces it: make it writable "
                              f"(chmod u+w {out}) or choose another")
    if out.is_dir() and not overwrite and not _is_our_output(out):
        contents = sorted(p.name for p in out.iterdir())
        if contents:
            shown = ", ".join(contents[:3]) + (", ..." if len(contents) > 3 else "")
            raise ValueError(
                f"output directory {out} is not empty and is not a torchao-eora checkpoint ({shown}); saving "
                "replaces the whole directory: choose a new or empty one, or pass overwrite=True (--overwrite)"
            )
    return out


def _is_our_output(directory: Path) -> bool:
    """A checkpoint or PEFT adapter we wrote: replacing it is what re-running a job means."""
    try:
        if (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file():
            return True
        config = json.loads((directory / "config.json").read_text())
        return config["quantization_config"]["quant_type"]["default"]["_type"] == "EoRAConfig"
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path`` to write; once the block completes it replaces ``path`` (one
    rename). If the block raises, the temporary is removed and an existing ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(
    out_dir: str | os.PathLike, *, sources: Iterable = (), overwrite: bool = False
) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``out_dir``; once the block completes it replaces ``out_dir`` atomically.

    ``out_dir`` is checked first (:func:`check_output_dir` with ``sources`` and ``overwrite``). If the block
    raises, nothing is left behind and an existing ``out_dir`` is untouched.
    """
    out = check_output_dir(out_dir, sources=sources, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700; give the directory the usual permissions
    try:
        yield tmp
        _install(tmp, out)  # afterwards tmp holds the previous directory, or nothing
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _install(new: Path, out: Path) -> None:
    try:
        os.rename(new, out)  # out absent (or empty): nothing to swap
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if _exchange(new, out):
        return
    old = new.with_name(new.name.replace(".tmp-", ".old-", 1))
    os.rename(out, old)  # a crash right here leaves only .old-: recover_directory() puts it back
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    os.rename(old, new)  # removed by the caller's cleanup


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def recover_directory(out_dir: str | os.PathLike) -> None:
    """Finish what a killed save left: put a moved-aside directory back, delete dead processes' leftovers."""
    out = Path(out_dir).resolve()
    prefix = f".{out.name}."
    for leftover in sorted(out.parent.glob(glob.escape(prefix) + "*-*-*")):
        stage, _, rest = leftover.name[len(prefix):].partition("-")
        pid = rest.partition("-")[0]
        if stage not in _STAGES or not pid.isdigit() or _alive(int(pid)):
            continue
        if stage == "old" and not out.exists():
            os.rename(leftover, out)  # killed between the two renames of the fallback: the old one is complete
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def save_safetensors(tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str]) -> None:
    """``save_file`` then :func:`canonicalize_safetensors_header`; a failed write (a full disk) is an ``OSError``
    naming the file, not safetensors' own error type (the caller's atomic directory keeps the old output)."""
    path = Path(path)
    try:
        save_file(dict(tensors), str(path), metadata=dict(metadata))
    except SafetensorError as e:
        raise OSError(f"cannot write {path.name} into {path.parent} ({e}); nothing was replaced: free some disk "
                      "space or choose another output directory") from None
    canonicalize_safetensors_header(path)


def canonicalize_safetensors_header(path: str | os.PathLike) -> None:
    """Sort a safetensors file's metadata in place, so that the same model gives the same bytes in every run.

    The safetensors writer keeps metadata in a Rust HashMap, whose order changes from process to process; the
    tensors themselves are already written in a fixed order. The header is rewritten only when the sorted JSON has
    exactly the same length (it does: same keys and values, compact JSON); the tensor data is never touched.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        text = raw.rstrip(b" ").decode("utf-8")  # the writer pads the header with spaces to 8-byte alignment
        header = json.loads(text)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        ordered = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(ordered) != len(text.encode("utf-8")) or json.loads(ordered) != json.loads(text):
            return  # not the compact form we expect: leave the file as written
        f.seek(8)
        f.write(ordered + b" " * (size - len(ordered)))
