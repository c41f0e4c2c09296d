"""Path checks shared by the config, the data sources and the CLI: messages that say what a path is.

"does not exist" for a path that is a directory (or "[Errno 17]" for one that is a file) sends the user
looking in the wrong place; these helpers name the path, what it is, and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

__all__ = ["check_path_component", "describe_missing_file", "require_absent_or_dir"]


def describe_missing_file(path: str | os.PathLike[str], what: str, expected: str) -> str:
    """Why ``path`` is not a readable file, as one message: missing, a directory, or something else.

    Args:
        path: the path that ``is_file()`` rejected.
        what: what it should be, e.g. ``"config file"``.
        expected: the kind of file expected, e.g. ``"a YAML file"``.
    """
    p = Path(path)
    if p.is_dir():
        return f"{what} {str(p)!r} is a directory; expected {expected}"
    if p.exists():
        return f"{what} {str(p)!r} is not a regular file; expected {expected}"
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"{what} {str(p)!r} does not exist: {str(parent)!r} is a file, not a directory"
    return f"{what} {str(p)!r} does not exist"


def check_path_component(value: str, field: str) -> str:
    """``value`` if it is one path component (a directory name), else ``ValueError`` naming ``field``.

    A name with a separator, ``.``/``..`` or a NUL byte would put what is named after it somewhere else
    than directly under its parent (``name: ../../escape`` wrote outside ``output_dir``).
    """
    problems = []
    if value in ("", ".", ".."):
        problems.append("is empty, '.' or '..'")
    if "/" in value or "\\" in value or os.sep in value or (os.altsep and os.altsep in value):
        problems.append("contains a path separator")
    if "\0" in value:
        problems.append("contains a NUL byte")
    if not problems and PurePath(value).name != value:
        problems.append("is not a plain name")
    if problems:
        raise ValueError(
            f"{field} {value!r} {' and '.join(problems)}: it must be a single path component (a directory name "
            "such as 'demo-uniform'), since the run directory is <output_dir>/<name>"
        )
    return value


def require_absent_or_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a ``Path`` if it does not exist or is a directory, else ``FileExistsError`` saying it is a file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"{what} {str(p)!r} is an existing file, not a directory; choose a directory path")
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise NotADirectoryError(f"{what} {str(p)!r}: {str(parent)!r} is a file, not a directory")
    return p
