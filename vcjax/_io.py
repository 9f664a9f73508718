"""File output for the command line: atomic writes and the table format chosen by extension.

Every output is first written to a temporary file in the destination folder and then moved
over the destination with :func:`os.replace` (atomic on POSIX and Windows when source and
destination share a file system). A failed run therefore leaves no half-written file and
never overwrites a good one. :class:`Staged` extends this to several files: all of them are
written to temporaries first and only moved into place once every one has been written.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "TABLE_FORMATS",
    "OutputPathError",
    "table_format",
    "check_output_path",
    "atomic_path",
    "Staged",
    "write_table",
    "save_table",
    "read_table",
    "write_npz",
    "json_safe",
]

#: extension → format of tables written by :func:`write_table`.
TABLE_FORMATS = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
#: key of the JSON metadata stored in a parquet file's schema.
META_KEY = b"vcjax"


class OutputPathError(ValueError):
    """An output path that cannot be written (missing folder, unknown extension)."""


def _suffix(path: str | os.PathLike, known: Mapping[str, Any]) -> str | None:
    name = Path(path).name.lower()
    for ext in sorted(known, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


def table_format(path: str | os.PathLike) -> str:
    """``"csv"``, ``"tsv"`` or ``"parquet"``, from the file name's extension.

    Raises:
      OutputPathError: for any other extension.
    """
    ext = _suffix(path, TABLE_FORMATS)
    if ext is None:
        raise OutputPathError(
            f"cannot tell the table format of {os.fspath(path)!r}: use one of "
            + ", ".join(TABLE_FORMATS)
        )
    return TABLE_FORMATS[ext]


def check_output_path(
    path: str | os.PathLike, *, extensions: tuple[str, ...] | None = None
) -> Path:
    """Check, before any computation, that ``path`` can be written.

    Args:
      path: the output file.
      extensions: accepted (lower-case) extensions, e.g. ``(".html",)``; None accepts any.

    Returns:
      The path as a :class:`~pathlib.Path`.

    Raises:
      OutputPathError: the folder does not exist, is not a folder or is not writable; the
        path is a folder; the extension is not accepted.
    """
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.exists():
        raise OutputPathError(
            f"output folder does not exist: {os.fspath(folder)} (for {os.fspath(p)})"
        )
    if not folder.is_dir():
        raise OutputPathError(f"output folder is not a folder: {os.fspath(folder)}")
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"output folder is not writable: {os.fspath(folder)}")
    if p.is_dir():
        raise OutputPathError(f"output path is a folder: {os.fspath(p)}")
    if extensions is not None and _suffix(p, dict.fromkeys(extensions)) is None:
        raise OutputPathError(f"output {os.fspath(p)!r} must end with " + " or ".join(extensions))
    return p


def _temp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(
        dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp"
    )
    os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    # mkstemp creates 0600 files; give the output the usual permissions (umask applied)
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager: a temporary path beside ``path``, moved onto it on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        yield tmp
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class Staged:
    """Several outputs written all-or-nothing.

    ``add(path, writer)`` calls ``writer(tmp_path)`` at once, on a temporary file beside
    ``path``; :meth:`commit` moves every temporary into place; leaving the ``with`` block
    with an exception (or without ``commit``) removes the temporaries.

    Example::

        with Staged() as out:
            out.add("results.parquet", lambda p: write_table(df, p, fmt="parquet"))
            out.add("report.html", lambda p: p.write_text(html))
            out.commit()
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def add(self, path: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
        path = Path(path)
        tmp = _temp_beside(path)
        self._pending.append((tmp, path))
        writer(tmp)

    def commit(self) -> list[Path]:
        done = []
        for tmp, path in self._pending:
            _commit(tmp, path)
            done.append(path)
        self._pending = []
        return done

    def discard(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._pending = []

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def json_safe(obj: Any) -> Any:
    """A JSON-serialisable copy of ``obj`` (NumPy scalars → Python, unknown objects dropped)."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            v = json_safe(v)
            if v is not _DROP:
                out[str(k)] = v
        return out
    if isinstance(obj, (list, tuple)):
        return [x for x in (json_safe(v) for v in obj) if x is not _DROP]
    if isinstance(obj, (str, bool, int)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, pd.DataFrame):
        return {"__dataframe__": json.loads(obj.to_json(orient="split"))}
    return _DROP


_DROP = object()


def write_table(
    df: pd.DataFrame,
    path: str | os.PathLike,
    *,
    like: str | os.PathLike | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write ``df`` to ``path`` (not atomic by itself: see :func:`save_table`).

    Args:
      df: the table.
      path: where to write.
      like: the file name that decides the format and compression (default ``path``;
        pass the destination when ``path`` is a temporary file).
      meta: JSON-able metadata, stored in the parquet schema (key ``vcjax``); ignored for
        CSV/TSV.
    """
    like = Path(like if like is not None else path)
    fmt = table_format(like)
    path = Path(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        plain = pd.DataFrame(df)
        plain.attrs = {}
        table = pa.Table.from_pandas(plain, preserve_index=False)
        if meta:
            md = dict(table.schema.metadata or {})
            md[META_KEY] = json.dumps(json_safe(meta)).encode()
            table = table.replace_schema_metadata(md)
        pq.write_table(table, path)
    elif fmt in ("csv", "tsv"):
        comp = "gzip" if like.name.lower().endswith(".gz") else None
        df.to_csv(path, sep="," if fmt == "csv" else "\t", index=False, compression=comp)
    else:  # pragma: no cover - table_format only returns the formats above
        raise OutputPathError(f"unknown table format {fmt!r}")


def save_table(
    df: pd.DataFrame,
    path: str | os.PathLike,
    *,
    meta: Mapping[str, Any] | None = None,
    staged: Staged | None = None,
) -> None:
    """Write ``df`` atomically to ``path`` (or stage it in ``staged``)."""
    if staged is not None:
        staged.add(path, lambda tmp: write_table(df, tmp, like=path, meta=meta))
        return
    with atomic_path(path) as tmp:
        write_table(df, tmp, like=path, meta=meta)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`write_table`; parquet metadata goes to ``df.attrs``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table not found: {os.fspath(path)}")
    fmt = table_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"cannot read parquet {os.fspath(path)}: {exc}") from exc
        df = table.to_pandas()
        md = table.schema.metadata or {}
        if META_KEY in md:
            df.attrs.update(json.loads(md[META_KEY]))
        return df
    try:
        # only empty fields and NaN spellings are missing: a baseline is called "null"
        df = pd.read_csv(
            path,
            sep="," if fmt == "csv" else "\t",
            keep_default_na=False,
            na_values=["", "NaN", "nan", "-nan"],
        )
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read {fmt} {os.fspath(path)}: {exc}") from exc
    if "note" in df.columns:
        df["note"] = df["note"].fillna("")
    return df


def write_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> None:
    """``np.savez_compressed`` to exactly ``path`` (no ``.npz`` appended)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    Path(path).write_bytes(buf.getvalue())
