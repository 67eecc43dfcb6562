"""``python -m vaeuda`` (and ``PythonSlicer -m vaeuda`` inside Slicer)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
