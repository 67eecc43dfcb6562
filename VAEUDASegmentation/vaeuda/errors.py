"""The one exception type the engine raises for bad input or a failed run, the checks of counts and seeds,
and which of the OS's errors are said to the user as one sentence.

Its message is a single sentence meant for the user: it names the file and what is wrong.
The command line prints it and exits with status 2; the Slicer module shows it as is.
"""
import errno
import numbers
from typing import Optional


class VaeudaError(Exception):
    """Bad input or an unrecoverable run error, with a one-sentence user-facing message."""


MAX_SEED = 2 ** 64 - 1   # torch's generators take 0 .. 2**64 - 1; numpy's (the phantom's) no negative seed
# A thousand times the paper preset's adaptation: weeks on a GPU. More is a slip (an extra digit), not a plan.
MAX_ITERATIONS = 10_000_000
# Slices per training step, far above any preset's (train.DEFAULT_BATCH): a larger batch only exhausts
# memory (100000 slices of the tiny preset took 23 GB before the system killed the process).
MAX_BATCH_SIZE = 512


def require_count(flag: str, value, minimum: int = 1, default_hint: str = "", maximum: Optional[int] = None) -> None:
    """Refuse a count (iterations, batch size, patience; a seed with ``minimum`` 0) that is not a
    whole number from ``minimum`` to ``maximum`` (if given), naming ``flag``; ``default_hint``
    follows the minimum in the sentence (the Slicer API's " (or None for the default)"). NumPy's
    integers are whole numbers too (an ``np.int64`` from an array, in Slicer's console)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        shown = repr(value) if isinstance(value, str) else str(value)      # (str: np.float64(1.5) as 1.5)
        raise VaeudaError(f"{flag} must be a whole number of at least {minimum}{default_hint}, not {shown}.")
    if maximum is not None and value > maximum:
        raise VaeudaError(f"{flag} must be at most {maximum:,}, not {int(value):,}.")


# The OS refusing the user's paths, permissions or disk space (a name longer than the file system
# takes, a folder that may not be listed): errors no check foresaw, but the user's to mend.
USER_OS_ERRORS = {getattr(errno, name) for name in ("EACCES", "EPERM", "ENAMETOOLONG", "ENOSPC", "EROFS", "EDQUOT",
                                                   "ELOOP", "ENOENT", "ENOTDIR", "EISDIR", "EEXIST", "EXDEV")
                  if hasattr(errno, name)}        # (not every platform has every one)


def os_error_sentence(exc: OSError) -> Optional[str]:
    """The OS's reason for refusing a path, as one sentence ("PATH: Permission denied."); None for
    any other OSError, which is a bug to see whole rather than a sentence."""
    if exc.errno not in USER_OS_ERRORS:
        return None
    return f"{exc.filename}: {exc.strerror}." if exc.filename and exc.strerror else f"{exc}."
