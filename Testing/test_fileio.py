"""fileio: output checks before work, and all-or-nothing folders."""
import os
import re

import pytest

from vaeuda import fileio
from vaeuda.errors import VaeudaError
from vaeuda.fileio import atomic_dir, check_output_dir, check_output_file, make_dir, refuse_repeated, same_file


def test_output_folder_that_is_a_file_is_refused(tmp_path):
    existing = tmp_path / "report"
    existing.write_text("x")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(existing))}: is an existing file, not a folder"):
        check_output_dir(existing)
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"   # created later


def test_output_equal_to_an_input_under_another_spelling_is_refused(tmp_path, monkeypatch):
    """The same file as ``sub/../model.safetensors``, as a relative path, or through a link."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    for spelling in (tmp_path / "sub" / ".." / "model.safetensors", "model.safetensors", tmp_path / "link.safetensors"):
        with pytest.raises(VaeudaError, match="is also an input"):
            check_output_file(spelling, [model])
    assert model.read_bytes() == b"weights"


def test_one_file_under_two_names_is_one_file(tmp_path):
    """Where names differ only in case, macOS and Windows have one file, which resolving the path does
    not tell on macOS (an adapted model written over its source model); the file system's own file
    numbers do, and say the same of a hard link, which a check here can make."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    other = tmp_path / "other-name.safetensors"
    os.link(model, other)
    assert same_file(model, other) and not same_file(model, tmp_path / "new.safetensors")
    assert same_file(tmp_path / "new.safetensors", tmp_path / "." / "new.safetensors")     # neither exists yet
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(other))}: is also an input"):
        check_output_file(other, [model])
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(other))}: given twice"):
        refuse_repeated([model, other])
    assert model.read_bytes() == b"weights"


@pytest.mark.parametrize("name, folder", [("run_12:30.safetensors", False), ("seg?", True), ("a<b", True),
                                          ('say"', False), ("tab\tname", True), ("trailing.", False),
                                          ("trailing ", True)])
def test_a_name_windows_does_not_allow_is_refused_there_before_work(tmp_path, monkeypatch, name, folder):
    """The write check makes a file of its own name, so such an output passed it and failed only at
    the first write, possibly after hours of training (or, for ':', wrote an alternate data stream)."""
    check = check_output_dir if folder else check_output_file
    path = tmp_path / name
    assert check(path) == path                          # elsewhere these names are fine
    monkeypatch.setattr(fileio, "WINDOWS", True)
    with pytest.raises(VaeudaError) as raised:
        check(path)
    assert str(raised.value) == (f"{path}: '{name}' is not a name Windows allows (none may hold < > : \" | ? *, a "
                                 f"control character, or end with a dot or a space); choose another.")
    with pytest.raises(VaeudaError, match="is not a name Windows allows"):       # a folder the output would make
        check(path / ("deeper" if folder else "model.safetensors"))
    fine = tmp_path / ("fine" if folder else "fine.safetensors")
    assert check(fine) == fine
    up = tmp_path / "new" / ".." / fine.name            # '..' names no folder of its own
    assert check(up) == up


def test_atomic_dir_replaces_a_folder_of_the_same_name_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    (out / "cohort").mkdir(parents=True)
    (out / "cohort" / "old.nii.gz").write_text("old")
    (out / "notes.txt").write_text("mine")
    with atomic_dir(out) as staging:
        (staging / "cohort").mkdir()
        (staging / "cohort" / "new.nii.gz").write_text("new")
    assert sorted(p.name for p in (out / "cohort").iterdir()) == ["new.nii.gz"]
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["cohort", "notes.txt"]      # no staging folder left


def test_atomic_dir_leaves_nothing_when_the_work_fails(tmp_path):
    """Not the staged files, nor the folders it made on the way (an output under new folders)."""
    for out in (tmp_path / "out", tmp_path / "new" / "deeper" / "out"):
        with pytest.raises(RuntimeError), atomic_dir(out) as staging:
            (staging / "half.nii.gz").write_text("half")
            raise RuntimeError("stopped")
        assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()                      # a folder that was there stays
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "mine" / "out"):
        raise RuntimeError("stopped")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"] and list((tmp_path / "mine").iterdir()) == []


def test_atomic_dir_undoes_the_moves_made_when_one_fails(tmp_path, monkeypatch):
    """A rename that fails midway (a full disk, a file held open elsewhere) leaves the folder as it was."""
    import os
    from vaeuda import fileio
    out = tmp_path / "out"
    (out / "a_seg").mkdir(parents=True)
    (out / "a_seg" / "old.nii.gz").write_text("old a")
    (out / "b_seg.nii.gz").write_text("old b")
    (out / "notes.txt").write_text("mine")
    real_replace = os.replace

    def failing_replace(src, dst):
        if os.path.basename(src) == "c_seg.nii.gz" and ".part" in str(src):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(VaeudaError, match=r"out: cannot be written \(No space left on device\)"), \
            atomic_dir(out) as staging:
        (staging / "a_seg").mkdir()
        (staging / "a_seg" / "new.nii.gz").write_text("new a")
        for name in ("b_seg.nii.gz", "c_seg.nii.gz"):
            (staging / name).write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a_seg", "b_seg.nii.gz", "notes.txt"]
    assert [p.name for p in (out / "a_seg").iterdir()] == ["old.nii.gz"]
    assert (out / "a_seg" / "old.nii.gz").read_text() == "old a"
    assert (out / "b_seg.nii.gz").read_text() == "old b" and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_an_output_folder_deleted_or_moved_during_the_run_fails_it(tmp_path, how):
    """The writes after it made the staging folder again, and the run moved the part they wrote into
    place and exited 0 (`segment` with 9 of 59 segmentations missing, `synth` with a splits.json
    naming scans that were not there)."""
    import shutil
    from vaeuda.fileio import atomic_path
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(out))}: the output folder was deleted or moved while "
                                          f"this run wrote into it; nothing was written\\.$"), \
            atomic_dir(out) as staging:
        (staging / "a_seg.nii.gz").write_text("first")
        if how == "deleted":
            shutil.rmtree(out)
        else:
            out.rename(tmp_path / "elsewhere")
        with atomic_path(staging / "b_seg.nii.gz") as part:         # as segment writes the next one
            part.write_text("second")
    assert not out.exists()                                          # as the user left it
    if how == "moved":                                               # the part it held stays with it
        assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == [staging.name]


def test_a_replaced_output_never_goes_missing_for_a_reader(tmp_path, monkeypatch):
    """The old file was moved aside, then the new one moved in: between the two renames a reader
    (an `evaluate` of the folder) found no file of that name. The old one is kept by a second link,
    and the new one replaces it in one step."""
    import os
    from vaeuda import fileio
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_seg.nii.gz").write_text("old")
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):
        seen.append((os.path.basename(dst), (out / "a_seg.nii.gz").is_file()))
        real_replace(src, dst)
    monkeypatch.setattr(fileio.os, "replace", watching_replace)
    with atomic_dir(out) as staging:
        (staging / "a_seg.nii.gz").write_text("new")
    assert seen == [("a_seg.nii.gz", True)]                           # one rename, the name there before it
    assert (out / "a_seg.nii.gz").read_text() == "new" and [p.name for p in out.iterdir()] == ["a_seg.nii.gz"]


def test_two_runs_moving_into_one_folder_take_turns(tmp_path):
    """Two `convert` or `synth` runs into one folder could interleave their renames and leave one
    run's image beside the other's label. A run holds the folder while it moves its entries in."""
    import threading
    from vaeuda import fileio
    out = tmp_path / "out"
    out.mkdir()
    order, holding = [], threading.Event()
    with fileio._folder_lock(out):
        def other_run():
            holding.set()
            with fileio._folder_lock(out):
                order.append("other")
        thread = threading.Thread(target=other_run)
        thread.start()
        holding.wait(10)
        thread.join(0.3)                                              # it waits for this one
        order.append("this")
    thread.join(10)
    assert order == ["this", "other"]


def test_a_folder_replaces_a_file_of_its_name(tmp_path):
    """A file kept aside by a second link stays where it is, and a folder cannot be renamed over it:
    only a file replacing a file is linked, anything else is moved aside as before."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("a file")
    with atomic_dir(out) as staging:
        (staging / "x").mkdir()
        (staging / "x" / "inside.txt").write_text("new")
    assert (out / "x" / "inside.txt").read_text() == "new"


def test_the_folder_lock_gives_up_on_a_holder_that_does_not_let_go(tmp_path, monkeypatch):
    """`flock OUTDIR vaeuda segment ... --out OUTDIR` holds the folder while it waits for the run,
    which waited for the folder: a deadlock. Past FOLDER_LOCK_WAIT_S the moves go on without it."""
    import fcntl
    import os
    import time
    from vaeuda import fileio
    monkeypatch.setattr(fileio, "FOLDER_LOCK_WAIT_S", 0.3)
    out = tmp_path / "out"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with atomic_dir(out) as staging:
            (staging / "a_seg.nii.gz").write_text("new")
        waited = time.monotonic() - started
    finally:
        os.close(holder)
    assert 0.3 <= waited < 5 and (out / "a_seg.nii.gz").read_text() == "new"


def test_the_training_lock_makes_and_removes_its_folders_and_survives_a_holder_ending(tmp_path, monkeypatch):
    """A model in a folder not made yet had no lock at all (the lock file could not be made there);
    a lock file removed by its holder as it ended, between another run's open and lock, let two runs
    hold it; a file system without flock made the run a traceback."""
    import errno
    import fcntl
    import os
    from vaeuda import fileio
    out = tmp_path / "new" / "deeper" / "m.safetensors"
    lock = tmp_path / "new" / "deeper" / "m.safetensors.ckpt.lock"
    with fileio.exclusive_model_output(out):
        assert lock.is_file()
        with pytest.raises(VaeudaError, match="another running vaeuda is training this model"):
            with fileio.exclusive_model_output(out):
                pass
    assert list(tmp_path.iterdir()) == []                              # the run wrote nothing: no folders left
    real_flock, calls = fcntl.flock, []

    def holder_ends_first(fd, operation):                              # the file this run opened is gone
        calls.append(fd)
        if len(calls) == 1:
            lock.unlink()
            lock.write_text("")                                        # and another run made a new one
        return real_flock(fd, operation)
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    monkeypatch.setattr(fcntl, "flock", holder_ends_first)
    with fileio.exclusive_model_output(out):
        assert len(calls) == 2                                         # it locked the one at the path
        monkeypatch.setattr(fcntl, "flock", real_flock)
        with pytest.raises(VaeudaError, match="another running vaeuda"):
            with fileio.exclusive_model_output(out):
                pass

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with fileio.exclusive_model_output(out):                           # goes on without one
        out.write_text("model")
    assert [p.name for p in out.parent.iterdir()] == ["m.safetensors"]  # no lock file left
    lock.write_text("")                                                # one it did not make (another run's)
    with fileio.exclusive_model_output(out):
        pass
    assert lock.is_file()                                              # is not removed


def test_make_dir_makes_parents_and_names_a_folder_it_cannot_make(tmp_path):
    assert make_dir(tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(blocker / 'sub'))}: cannot be written"):
        make_dir(blocker / "sub")


def test_a_write_refused_for_permission_reads_the_same_at_every_step(tmp_path, monkeypatch):
    """The up-front check (os.access), making the output's folder and making the file itself word a
    permission refusal alike, naming the folder that refused. (Simulated: root may write anywhere.)"""
    import os
    import pathlib
    import tempfile
    from vaeuda.fileio import atomic_path
    locked = tmp_path / "locked"
    locked.mkdir()
    expected = "cannot be written \\(no permission to write in " + re.escape(str(locked)) + "\\)\\.$"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: pathlib.Path(path) != locked and real_access(path, mode))
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(locked / 'm.safetensors'))}: {expected}"):
        check_output_file(locked / "m.safetensors")
    monkeypatch.setattr(os, "access", real_access)

    def mkdir_refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    def exists_refused(self, *args, **kwargs):   # Path.exists raises inside a folder one may not enter
        raise PermissionError(13, "Permission denied", str(self))
    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "mkdir", mkdir_refused)
        patch.setattr(pathlib.Path, "exists", exists_refused)
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(locked / 'a' / 'b'))}: {expected}"):
            make_dir(locked / "a" / "b")
    real_mkstemp = tempfile.mkstemp

    def mkstemp_refused(*args, **kwargs):
        if kwargs.get("dir") == locked:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_refused)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(locked / 'seg.nii.gz'))}: {expected}"):
        with atomic_path(locked / "seg.nii.gz"):
            pass
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(locked / 'out'))}: {expected}"):
        check_output_dir(locked / "out")
    assert list(locked.iterdir()) == []
    # EPERM (chmod on a file system without modes, a sticky folder) is not "no permission to write in"
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)

    def chmod_refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "chmod", chmod_refused)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(locked / 'seg.nii.gz'))}: cannot be written "
                                          f"\\(Operation not permitted\\)\\.$"):
        with atomic_path(locked / "seg.nii.gz"):
            pass
    assert list(locked.iterdir()) == []                         # the file made before chmod is gone


def test_an_output_where_no_file_can_be_made_is_refused_before_work_even_for_root(tmp_path, monkeypatch):
    """os.access says yes to root everywhere (and on /proc); a file made and removed there is the test."""
    import os
    import tempfile
    real = tempfile.mkstemp

    def refused(*args, **kwargs):
        if kwargs.get("dir") == tmp_path:
            raise OSError(30, "Read-only file system")
        return real(*args, **kwargs)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    for check, path in ((check_output_file, tmp_path / "m.safetensors"), (check_output_dir, tmp_path / "seg")):
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: "
                                              f"cannot be written \\(making a file in {re.escape(str(tmp_path))} failed: "
                                              f"Read-only file system\\)\\.$"):
            check(path)
    monkeypatch.setattr(tempfile, "mkstemp", real)
    assert check_output_file(tmp_path / "m.safetensors") == tmp_path / "m.safetensors"
    assert list(tmp_path.iterdir()) == []                      # the probe file is gone


def test_an_output_file_named_as_a_folder_is_refused(tmp_path):
    """``--out newdir/``: Path drops the separator, and the model would be a file named newdir."""
    with pytest.raises(VaeudaError, match=r"newdir/: is named as a folder \(it ends with a separator\); give the "
                                          r"output a file name\.$"):
        check_output_file(f"{tmp_path / 'newdir'}/")
    assert not (tmp_path / "newdir").exists()


def test_a_pipe_is_refused_as_an_output_and_as_an_input(tmp_path):
    """os.replace would put a regular file where the pipe (or, run as root, /dev/null) was, and exit 0;
    an input pipe would make the reader wait forever for a writer."""
    import os
    from vaeuda.fileio import require_readable
    from vaeuda.fileio import require_file
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for refuse in (check_output_file, require_readable, lambda path: require_file(path, "model file")):
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(pipe))}: is a pipe, socket or device, not a regular "
                                              f"file; give a file\\.$"):
            refuse(pipe)
    assert pipe.is_fifo()


def test_an_output_inside_a_folder_one_may_not_enter_is_refused_in_a_sentence(tmp_path, monkeypatch):
    """Path.is_dir / exists raise EACCES inside a folder one may not enter (another user's 0700 home);
    the checks said it in the OS's words, or the Slicer console got a bare PermissionError. (Simulated:
    root may enter anywhere.)"""
    import os
    import pathlib
    from vaeuda.fileio import check_model_output
    locked = tmp_path / "locked"
    locked.mkdir()
    real_stat, real_access = pathlib.Path.stat, os.access

    def stat(self, *args, **kwargs):
        if locked in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "stat", stat)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: pathlib.Path(path) != locked and real_access(path, mode))
    expected = f"cannot be written \\(no permission to write in {re.escape(str(locked))}\\)\\.$"
    for check, path in ((check_output_file, locked / "sub" / "m.safetensors"), (check_output_dir, locked / "sub"),
                        (check_model_output, locked / "m.safetensors")):
        with pytest.raises(VaeudaError, match=f"^{re.escape(str(path))}: {expected}"):
            check(path)


def test_a_path_that_is_not_utf8_text_is_refused_before_itk_aborts_the_process(tmp_path):
    """ITK's C++ code aborted the process (SIGABRT) on a name of non-UTF-8 bytes, leaving its staging
    folder behind; safetensors cannot open one either. Refused in one sentence, showing the bytes."""
    import os
    import numpy as np
    import SimpleITK as sitk
    from vaeuda.fileio import require_file
    from vaeuda.volumes import read_image, write_image
    odd = os.fsdecode(b"x\xff")
    image = tmp_path / "ok.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)), str(image))
    os.rename(image, tmp_path / f"{odd}.nii.gz")
    message = r"x\\xff[^:]*: its name is not UTF-8 text, which the image and model file libraries cannot open; rename it\.$"
    for refuse in (lambda: read_image(tmp_path / f"{odd}.nii.gz"),
                   lambda: write_image(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.float32)), tmp_path / f"{odd}_2.nii.gz"),
                   lambda: check_output_dir(tmp_path / odd), lambda: check_output_file(tmp_path / f"{odd}.safetensors"),
                   lambda: require_file(tmp_path / f"{odd}.nii.gz", "model file")):
        with pytest.raises(VaeudaError, match=message):
            refuse()
    assert os.listdir(tmp_path) == [f"{odd}.nii.gz"]


def test_an_output_folder_that_is_a_dangling_link_is_named_as_one(tmp_path):
    """Making the folder met the link: "cannot be written (File exists)"."""
    import os
    link = tmp_path / "out"
    os.symlink(tmp_path / "gone", link)
    with pytest.raises(VaeudaError, match=f"^{re.escape(str(link))}: is a symbolic link to "
                                          f"{re.escape(str(tmp_path / 'gone'))}, which does not exist; create that "
                                          f"folder, or remove the link\\.$"):
        check_output_dir(link)
    (tmp_path / "gone").mkdir()
    assert check_output_dir(link) == link


def test_an_output_folder_of_a_long_legal_name_is_staged_under_a_name_that_fits(tmp_path):
    """A folder name of 241-255 bytes is legal, but '.NAME.XXXXXXXX.part' was not: the run failed after its
    work ("File name too long"). The staging name is cut; the folder gets its own name."""
    out = tmp_path / ("é" * 120 + "y" * 14)           # 254 bytes
    with atomic_dir(out) as staging:
        assert len(staging.name.encode("utf-8")) <= 255
        (staging / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_atomic_path_writes_under_a_hidden_temporary_name_then_renames_it(tmp_path):
    """The temporary file lies beside the output, hidden (a leading dot, so a folder scan takes it for no
    scan), with the output's full suffix after .part (writers choose the format by it); on success it
    becomes the output with an ordinary new file's mode (umask), not mkstemp's 0600 or a writer's own."""
    out = tmp_path / "seg.nii.gz"
    old = os.umask(0o022)
    try:
        with fileio.atomic_path(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".seg.") and tmp.name.endswith(".part.nii.gz")
            assert not out.exists()
            assert os.stat(tmp).st_mode & 0o777 == 0o644          # umask 022 from the start
            tmp.write_bytes(b"new")
            os.chmod(tmp, 0o600)                                  # (safetensors' save_file makes it private)
    finally:
        os.umask(old)
    assert out.read_bytes() == b"new" and os.stat(out).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


def test_atomic_path_leaves_the_old_output_and_no_temporary_file_when_the_work_fails(tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_the_training_hold_is_taken_once_per_thread_and_let_go_at_its_end(tmp_path):
    """model_output_held goes on under this thread's own hold; another thread is refused while it lasts,
    and once it has ended the model file can be held again in the same process."""
    import threading
    out = tmp_path / "m.safetensors"
    refused = []

    def other():
        try:
            with fileio.model_output_held(out):
                pass
        except VaeudaError as exc:
            refused.append(str(exc))
    with fileio.exclusive_model_output(out):
        with fileio.model_output_held(out):          # the command line's hold, then the training function's
            pass
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(refused) == 1 and "another running vaeuda is training this model" in refused[0]
    assert os.path.realpath(fileio._lock_path(out)) not in fileio._HELD_OUTPUTS
    with fileio.model_output_held(out):              # a new hold, taken and let go
        assert os.path.exists(fileio._lock_path(out))
    assert not os.path.exists(fileio._lock_path(out))


def test_an_output_name_of_exactly_the_longest_length_is_taken(tmp_path):
    """240 bytes (255 less the temporary name's 15) is allowed, 241 refused: catches `>=`."""
    assert fileio.MAX_OUTPUT_NAME_BYTES == 240
    check_output_file(tmp_path / ("a" * 236 + ".mha"))
    with pytest.raises(VaeudaError, match="its name is 241 bytes; an output's may have at most 240"):
        check_output_file(tmp_path / ("a" * 237 + ".mha"))


def test_the_double_suffix_is_found_in_any_case():
    """SCAN_IMAGE.NII.GZ is a .nii.gz volume (suffix kept as spelt), not a .GZ one whose stem ends .NII."""
    assert fileio.full_suffix("a/SCAN_IMAGE.NII.GZ") == ".NII.GZ" and fileio.stem("a/SCAN_IMAGE.NII.GZ") == "SCAN_IMAGE"
    assert fileio.full_suffix("x.Nii.Gz") == ".Nii.Gz" and fileio.full_suffix("x.mha") == ".mha"
