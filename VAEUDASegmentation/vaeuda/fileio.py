"""Output files appear whole or not at all: write to a temporary name, then rename into place."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Union

from .errors import VaeudaError

PathLike = Union[str, "os.PathLike[str]"]


def full_suffix(path: PathLike) -> str:
    """``.nii.gz`` for ``a/b.nii.gz``, ``.mha`` for ``x.mha``: the suffix that names the format."""
    name = Path(path).name
    for double in (".nii.gz", ".tar.gz"):
        if name.lower().endswith(double):
            return name[-len(double):]
    return Path(path).suffix


def stem(path: PathLike) -> str:
    """File name without its (possibly double) extension: ``ct_1001_image`` for ``ct_1001_image.nii.gz``."""
    name = Path(path).name
    suffix = full_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


# The image file formats the engine reads (SimpleITK), by their full suffix in any case.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def file_identity(path: PathLike) -> tuple:
    """A key equal for two paths that name one file or folder: an existing one's device and inode
    numbers (the file system's word: on macOS and Windows names that differ only in case are one
    file, which resolving the path does not tell on macOS; a hard link is the same file too), else
    the resolved path."""
    numbers = _identity(path)
    if numbers is not None and all(numbers):     # (0 where a file system has no such numbers)
        return ("file", *numbers)
    return ("path", Path(path).resolve())


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file or folder (:func:`file_identity`)."""
    return file_identity(a) == file_identity(b)


def refuse_repeated(paths: Iterable[PathLike], what: str = "input") -> None:
    """Refuse a file given twice (the same file however spelt: :func:`file_identity`)."""
    seen = set()
    for path in paths:
        key = file_identity(path)
        if key in seen:
            raise VaeudaError(f"{path}: given twice; give each {what} once.")
        seen.add(key)


def file_sha256(path: PathLike) -> str:
    """The SHA-256 of a file's bytes, hex (a model records its training volumes' so that a volume
    changed since, e.g. by a cohort made again in the same folder, can be told)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_bytes(path: PathLike, n: int) -> bytes:
    """The first ``n`` bytes of a file, which tell its kind (fewer if it is shorter; none if it cannot
    be read, which the reader that follows reports in its own words)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def image_then_label(images: Iterable[PathLike], labels: Iterable[PathLike]) -> list:
    """``[image 1, label 1, image 2, label 2, ...]``: the order a model's provenance records the
    digests of labelled volumes in (``source_sha256``, ``finetune_sha256``)."""
    return [p for pair in zip(images, labels) for p in pair]


# The longest file name the common file systems take (ext4, APFS; NTFS counts 255 UTF-16 units).
MAX_NAME_BYTES = 255
# An output is written under a temporary name beside it first (atomic_path: "." + stem + ".XXXXXXXX.part"
# + suffix), 15 bytes longer: the longest output name that can be written so.
MAX_OUTPUT_NAME_BYTES = MAX_NAME_BYTES - len("." + ".XXXXXXXX" + ".part")


# An existing path that is neither a regular file nor a folder.
SPECIAL_FILE = "is a pipe, socket or device, not a regular file; give a file."


def require_utf8_name(path: PathLike) -> None:
    """Refuse a path that is not UTF-8 text (Python keeps such bytes as surrogates): ITK's C++ code
    aborts the whole process on one, leaving half-written files behind, and safetensors cannot open it."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        raise VaeudaError(f"{shown}: its name is not UTF-8 text, which the image and model file libraries cannot "
                          f"open; rename it.") from None


# Whether this is Windows, where names and pipes behave otherwise (one switch, which tests turn).
WINDOWS = os.name == "nt"
# Characters no Windows name may hold (besides the folder separators); nor may one end in a dot or
# space. The engine's own names never do; an output name the user gives is checked before the
# work, since the write-check probe has a name of its own and the failure would come only at the
# first write (a ':' even makes NTFS write an alternate data stream of another file).
WINDOWS_FORBIDDEN = frozenset('<>:"|?*').union(chr(c) for c in range(32))


def require_windows_name(path: PathLike) -> None:
    """On Windows, refuse an output path whose name, or the name of a folder it would make, Windows
    does not allow; elsewhere nothing."""
    if not WINDOWS:
        return
    path = Path(path)
    for part in [path] + [parent for parent in path.parents if not os.path.exists(parent)]:
        name = part.name
        if name not in ("", "..") and (WINDOWS_FORBIDDEN.intersection(name) or name[-1] in ". "):
            raise VaeudaError(f"{path}: '{name}' is not a name Windows allows (none may hold < > : \" | ? *, a "
                              f"control character, or end with a dot or a space); choose another.")


def require_readable(path: PathLike) -> None:
    """Refuse an existing input file or folder this process may not read (its permissions), in the
    OS's words: ITK and safetensors would call it missing; and a pipe, socket or device, which a
    reader would wait on forever or read as endless bytes."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            os.listdir(path)
            if not os.access(path, os.X_OK):       # listed, but its files could not be opened
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        elif stat.S_ISREG(mode):
            with open(path, "rb"):
                pass
    except OSError as exc:
        raise VaeudaError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise VaeudaError(f"{path}: {SPECIAL_FILE}")


def require_file(path: PathLike, what: str) -> Path:
    """Refuse an input file (``what`` names its kind: "model file", "released file") that is a
    folder, is not there, or may not be read (:func:`require_readable`). Returns it as a Path."""
    require_utf8_name(path)
    path = Path(path)
    if path.is_dir():
        raise VaeudaError(f"{path}: is a folder, not a {what}.")
    if not path.exists():
        raise VaeudaError(f"{path}: {what} not found.")
    require_readable(path)                  # (and not a pipe or device)
    return path


def is_volume_file(path: Path) -> bool:
    """A file of a readable image format, not a hidden one (e.g. the "._X_image.nii.gz" metadata
    twins a Mac copies along, which carry the scans' extensions)."""
    return path.is_file() and not path.name.startswith(".") and full_suffix(path).lower() in VOLUME_SUFFIXES


def without_role(name: str, role: str) -> Optional[str]:
    """``name`` without a trailing ``role`` (``"_image"``, ``"_label"``, ``"_seg"``) in any case,
    or None if it has none: ``ct_1001`` for ``ct_1001_image`` and for ``CT_1001_IMAGE``'s ``CT_1001``.
    Extensions match in any case, so file roles do too (case-insensitive file systems agree)."""
    return name[: -len(role)] if name.lower().endswith(role) else None


def _umask_mode(mode: int) -> int:
    """``mode`` as the process umask leaves it (mkstemp/mkdtemp make private 0600/0700 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _nearest_existing(path: Path) -> Path:
    """The nearest ancestor of ``path`` that exists: where making ``path`` has to write (a folder, or a
    file that stands in the way). os.path.exists, not Path.exists: that raises inside a folder we may
    not enter, and this runs while an error is being worded."""
    ancestor = path.parent
    while not os.path.exists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def _in_the_way(shown: Path, ancestor: Path, exc: Optional[OSError]) -> Optional[VaeudaError]:
    """The one wording for a file where a folder must be, or a folder that refuses writing (``exc``
    EACCES, or None when the up-front check found it), whichever step meets it: the check, making
    folders, making the file. None for other errors (a full disk; EPERM from chmod or a sticky folder)."""
    if not os.path.isdir(ancestor):
        return VaeudaError(f"{shown}: cannot be written ({ancestor} is a file).")
    if exc is None or exc.errno == errno.EACCES:
        return VaeudaError(f"{shown}: cannot be written (no permission to write in {ancestor}).")
    return None


def _unwritable(path: Path, exc: OSError) -> VaeudaError:
    return _in_the_way(path, _nearest_existing(path), exc) or VaeudaError(f"{path}: cannot be written "
                                                                          f"({exc.strerror or exc}).")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix; rename it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was. The file gets
    the permissions an ordinary new file would (umask), not mkstemp's private ones. A path that
    cannot be written (no permission, a folder there, a file where its folder should be) is a
    VaeudaError naming it.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{stem(path)}.", suffix=f".part{full_suffix(path)}", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, _umask_mode(0o666))
    except OSError as exc:
        if tmp is not None:             # made, then refused its mode: nothing is left behind
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise _unwritable(path, exc) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            # again: a writer may have replaced the file with a private one of its own
            # (safetensors' save_file does, mode 0600)
            os.chmod(tmp_path, _umask_mode(0o666))
            os.replace(tmp_path, path)
        except OSError as exc:
            raise _unwritable(path, exc) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def checkpoint_path(out: PathLike) -> Path:
    """Where a training run writing the model file ``out`` keeps its checkpoint: ``out.ckpt``."""
    return Path(str(out) + ".ckpt")


# The lock files this process holds (exclusive_model_output), by real path: the thread holding each.
_HELD_OUTPUTS: Dict[str, int] = {}


def _lock_path(out: PathLike) -> Path:
    return Path(str(checkpoint_path(out)) + ".lock")


@contextlib.contextmanager
def exclusive_model_output(out: PathLike) -> Iterator[None]:
    """Hold the model file ``out`` for one training run: a second run with the same ``out`` is
    refused while this one lives (each would remove or resume the other's checkpoint). The lock is
    ``out.ckpt.lock``, held with ``flock`` and removed at the end; one a killed run left behind
    holds nothing. The folders it needs are made, and removed again if the run leaves them empty.
    Where no lock can be taken (a name or place the checks refuse next, a file system without
    ``flock``, Windows) the run goes on without one."""
    try:
        import fcntl
    except ImportError:                 # Windows
        yield
        return
    lock = _lock_path(out)
    made = [d for d in lock.parents if not os.path.exists(d)]     # deepest first (exists() may raise EACCES)
    fd = key = None
    try:
        try:
            fd = _locked(lock, fcntl)
        except BlockingIOError:
            raise VaeudaError(f"{out}: another running vaeuda is training this model (it holds {lock.name}); wait "
                              f"for it to end, or choose another --out.") from None
        except OSError:
            fd = None                   # the output checks that follow say what is wrong with the place
        if fd is not None:
            key = os.path.realpath(lock)
            _HELD_OUTPUTS[key] = threading.get_ident()
        yield
    finally:
        if fd is not None:
            _HELD_OUTPUTS.pop(key, None)
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)
        _remove_empty(made)


@contextlib.contextmanager
def model_output_held(out: PathLike) -> Iterator[None]:
    """:func:`exclusive_model_output` for a training function called from Python, unless this thread
    holds ``out`` already: the command line takes the hold before its own checks and then calls the
    training function, which goes on under that hold."""
    if _HELD_OUTPUTS.get(os.path.realpath(_lock_path(out))) == threading.get_ident():
        yield
        return
    with exclusive_model_output(out):
        yield


def _locked(lock: Path, fcntl, tries: int = 10) -> Optional[int]:
    """A descriptor of ``lock`` (made, with its folders, if need be) holding its ``flock``;
    BlockingIOError when another process holds it; None where the file system takes no ``flock``
    (a lock file this call made is then removed) or the file keeps changing under it."""
    for _ in range(tries):
        lock.parent.mkdir(parents=True, exist_ok=True)     # (again: a failed run may have removed it)
        try:
            fd, made = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            fd, made = os.open(lock, os.O_RDWR), False
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise
        except OSError:                 # (NFS without its lock daemon, say): no lock for anyone
            os.close(fd)
            if made:                    # (one that was there may be another run's)
                with contextlib.suppress(OSError):
                    lock.unlink()
            return None
        if _identity(fd) == _identity(lock):
            return fd
        os.close(fd)                    # the holder removed it as it ended: lock the one at the path now
    return None


def check_model_output(out: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """A training run's outputs: the model file ``out`` (:func:`check_output_file`) and its checkpoint
    ``out.ckpt`` (written during the run, removed at its end), refused before any work. Returns ``out``."""
    check_output_file(out, inputs)
    ckpt = checkpoint_path(out)
    if os.path.isdir(ckpt):       # the user named the model file; the checkpoint's name is ours
        raise VaeudaError(f"{ckpt}: is a folder where this run keeps its checkpoint (the model file's name plus "
                          f"'.ckpt'); move it away or choose another output.")
    check_output_file(ckpt, inputs)
    return Path(out)


def make_dir(path: PathLike) -> Path:
    """``mkdir -p path``; a folder that cannot be made is a VaeudaError naming it. Returns the path."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    return path


def check_output_file(path: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """Refuse, before any work, an output file path that is a folder, a pipe, socket or device (which
    the atomic rename would replace), lies under a file, cannot be created, or is one of ``inputs``
    (which are never overwritten). Returns the path."""
    require_utf8_name(path)
    require_windows_name(path)
    if str(path).endswith(("/", os.sep)):     # Path drops the separator: the file would take the folder's name
        raise VaeudaError(f"{path}: is named as a folder (it ends with a separator); give the output a file name.")
    path = Path(path)
    if len(path.name.encode("utf-8")) > MAX_OUTPUT_NAME_BYTES:   # refused only after the work otherwise
        raise VaeudaError(f"{path}: its name is {len(path.name.encode('utf-8'))} bytes; an output's may have at most "
                          f"{MAX_OUTPUT_NAME_BYTES} (file systems allow {MAX_NAME_BYTES}, and it is written under a "
                          f"longer temporary name first); give a shorter name.")
    # os.path, not Path: its is_dir / exists raise inside a folder one may not enter, where these say
    # no, and _check_creatable then words the refusal
    if os.path.isdir(path):
        raise VaeudaError(f"{path}: is a folder; give the output a file name.")
    if os.path.exists(path) and not os.path.isfile(path):
        raise VaeudaError(f"{path}: {SPECIAL_FILE}")
    _check_creatable(path)
    for item in inputs:
        if same_file(item, path):
            raise VaeudaError(f"{path}: is also an input, which is never overwritten; choose another output.")
    return path


def check_output_dir(path: PathLike, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder path that is a file or cannot be created (``option``:
    the argument that gave it, for the sentences). Returns it."""
    require_utf8_name(path)
    require_windows_name(path)
    path = Path(path)
    if os.path.exists(path) and not os.path.isdir(path):       # (os.path: as in check_output_file)
        raise VaeudaError(f"{path}: is an existing file, not a folder.")
    if os.path.islink(path) and not os.path.exists(path):     # making the folder would meet the link
        raise VaeudaError(f"{path}: is a symbolic link to {os.readlink(path)}, which does not exist; create that "
                          f"folder, or remove the link.")
    if not os.path.exists(path) and full_suffix(path).lower() in VOLUME_SUFFIXES + (".safetensors", ".json"):
        raise VaeudaError(f"{path}: is named like a file, but {option} takes the folder the outputs go in; "
                          f"give a folder.")
    _check_creatable(path / "x", shown=path)
    return path


def _check_creatable(path: Path, shown: Optional[Path] = None) -> None:
    """``path``'s nearest existing ancestor is a folder we may write in; errors name ``shown`` (default ``path``)."""
    shown = path if shown is None else shown
    ancestor = _nearest_existing(path)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise _in_the_way(shown, ancestor, None)
    # os.access says yes to root everywhere and knows nothing of read-only or pseudo file systems
    # (/proc): a file made and removed there is the test the output will face.
    try:
        handle, probe = tempfile.mkstemp(prefix=".vaeuda-write-check.", dir=ancestor)
    except OSError as exc:
        raise (_in_the_way(shown, ancestor, exc)
               or VaeudaError(f"{shown}: cannot be written (making a file in {ancestor} failed: {exc.strerror or exc}).")
               ) from None
    os.close(handle)
    try:
        os.remove(probe)
    except OSError:
        pass    # held open by another program (Windows): a hidden empty file is left, the check stands


def _folder_temp_prefix(folder: Path) -> str:
    """``.NAME.``, the start of a temporary folder's name for output folder ``folder``: a leftover (a
    killed run's) says whose it is. The name is cut so that the 15 bytes mkdtemp adds keep it
    within what file systems take: an output folder's name may have all their 255 bytes."""
    return "." + folder.name.encode("utf-8")[:MAX_OUTPUT_NAME_BYTES - 1].decode("utf-8", "ignore") + "."


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success its contents move into ``path`` (which must not hold other work).

    Files already in ``path`` that the new folder does not have are kept. The temporary folder is
    inside ``path`` when that exists (so only ``path`` need be writable), else beside it. The
    entries it replaces are first kept aside (:func:`_keep_aside`), so that when a move fails midway
    the ones already made are undone and ``path`` is left as it was. A temporary folder deleted or
    moved away during the run fails it; the moves hold ``path`` (:func:`_folder_lock`).
    """
    path = Path(path)
    made = [d for d in (path, *path.parents) if not d.exists()]   # folders this call creates, deepest first
    try:
        staging_parent = path if path.is_dir() else path.parent
        staging_parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_folder_temp_prefix(path), suffix=".part", dir=staging_parent))
        os.chmod(tmp, _umask_mode(0o777))
        folder = _identity(path)
    except OSError as exc:
        _remove_empty(made)
        raise _unwritable(path, exc) from None
    held = _hold(tmp)     # (held open, its inode number cannot go to a folder made in its place)
    try:
        yield tmp
        # A staging folder deleted or moved away meanwhile (with the output folder) was made again by
        # the writes that followed: it holds only part of the work.
        if held is not None and _identity(tmp) != _identity(held):
            shutil.rmtree(tmp, ignore_errors=True)
            if _identity(path) != folder:       # made again by those writes: gone, as the user left it
                _remove_empty([path])
            raise VaeudaError(f"{path}: the output folder was deleted or moved while this run wrote into it; "
                              f"nothing was written.")
        try:
            path.mkdir(parents=True, exist_ok=True)
            with _folder_lock(path):    # another run's entries do not interleave with these
                aside = _move_entries(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)     # (what was replaced, once the others may move in)
            tmp.rmdir()
        except OSError as exc:
            raise _unwritable(path, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    finally:
        if held is not None:
            os.close(held)


def _hold(folder: Path) -> Optional[int]:
    """A descriptor of ``folder``, open until closed; None where folders cannot be opened (Windows)."""
    try:
        return os.open(folder, os.O_RDONLY)
    except OSError:
        return None


def _identity(path) -> Optional[tuple]:
    """(device, inode) of what is at ``path`` (or open as descriptor ``path``); None when nothing is."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):       # (ValueError: a name with a NUL character)
        return None
    return st.st_dev, st.st_ino


# How long a run waits for the output folder another holds while it moves its outputs in (which
# takes milliseconds): past it the folder is held by something else (`flock DIR vaeuda ...`), and
# the moves go on without the lock.
FOLDER_LOCK_WAIT_S = 10.0


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder`` (``flock`` on the folder itself, no file made) while a run moves its outputs
    in, so that two runs writing the same names leave one run's set, not a mix. Where folders
    cannot be locked (Windows, some network file systems), or another holds it past
    FOLDER_LOCK_WAIT_S, the moves go on without it."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        deadline = time.monotonic() + FOLDER_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            except OSError:
                break
        yield
    finally:
        os.close(fd)                    # (closing releases the lock)


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove the folders (deepest first) that are still empty; a failed run leaves none it made."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def refuse_folder_in_the_way(target: PathLike) -> None:
    """Refuse a folder (not a link to one) where a run writes the file ``target`` into an output folder."""
    if os.path.isdir(target) and not os.path.islink(target):
        raise VaeudaError(f"{target}: is a folder where this run writes a file; move it away or choose another "
                          f"output folder.")


def _keep_aside(target: Path, kept: Path, new: Path) -> None:
    """Keep the entry at ``target`` as ``kept``, for an undo. A file that a file ``new`` replaces:
    by a second link, so that it stays at ``target`` until the new one replaces it in one step (a
    reader never finds the name missing). Otherwise (a folder or link on either side, a file system
    without hard links) by moving it there."""
    if all(p.is_file() and not p.is_symlink() for p in (target, new)):
        try:
            os.link(target, kept)
            return
        except OSError:
            pass
    os.replace(target, kept)


def _move_entries(source: Path, dest: Path) -> Path:
    """Move every entry of ``source`` into ``dest``, replacing those of the same name, all or none.
    Returns the folder in ``dest`` that holds the replaced entries, for the caller to remove.
    A folder of the user's where a file goes is refused, not replaced: it would be deleted with all it holds."""
    for item in source.iterdir():
        if not item.is_dir():
            refuse_folder_in_the_way(dest / item.name)
    aside = Path(tempfile.mkdtemp(prefix=_folder_temp_prefix(dest), suffix=".old", dir=dest))
    done = []   # (name, whether an old entry was moved aside), in order
    try:
        for item in sorted(source.iterdir()):
            target = dest / item.name
            replaced = target.exists() or target.is_symlink()
            if replaced:
                _keep_aside(target, aside / item.name, item)
            done.append((item.name, replaced))
            os.replace(item, target)
    except BaseException:
        restored = True
        for name, replaced in reversed(done):
            target = dest / name
            try:
                if not (source / name).exists() and not (source / name).is_symlink():   # the new entry got there
                    os.replace(target, source / name)
                if replaced:
                    os.replace(aside / name, target)
            except OSError:
                restored = False
        if restored:   # else the old entries stay in ``aside``, not deleted
            shutil.rmtree(aside, ignore_errors=True)
        raise
    return aside
