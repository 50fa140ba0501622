"""What a pretraining run trained on, so that an evaluation can tell whether its test scans were among them.

`main_pretrain.py` writes `data_manifest.csv.gz` into its run folder on rank 0 when it starts: one row per scan
with the absolute path, the size in bytes and a content fingerprint (BLAKE2b of the size and three 8 KiB blocks
of the file, at its start, middle and end; a DICOM folder: its file names and sizes and three of its files). Only
the file's name and SHA-256 go into the checkpoint's `args` (`data_manifest`, `data_manifest_sha256`), so
checkpoints stay small. A copy of a scan in another folder has the same fingerprint. A run that resumes reuses
the fingerprints of files whose size and modification time have not changed.

`main_evaluate.py --pretraining NAME=SOURCE` reads a source: a checkpoint (its manifest is found beside it and
checked against the recorded digest), a manifest, or, for checkpoints made elsewhere (TANGERINE), a plain list
or CSV of the pretraining paths (compared by path only).
"""
from __future__ import annotations

import gzip
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from util.atomic import atomic_write
from util.digest import file_sha256
from util.errors import UserError
from util.run_folder import MANIFEST

MANIFEST_NAME = MANIFEST
BLOCK = 8 * 1024  # three blocks per scan: 2.4 GB read for 100,000 scans, wherever they are stored
COLUMNS = ("path", "size", "mtime_ns", "fingerprint")


def _file_blocks(path: str, size: int, h) -> None:
    """Feed the three sampled blocks (or the whole file when it is smaller than three blocks) into `h`."""
    with open(path, "rb") as f:
        if size <= 3 * BLOCK:
            h.update(f.read())
            return
        for offset in (0, (size - BLOCK) // 2, size - BLOCK):
            f.seek(offset)
            h.update(f.read(BLOCK))


def fingerprint(path: str) -> tuple[int, int, str]:
    """(size in bytes, modification time in ns, 32 hex digits) of a file or a DICOM folder; OSError when it
    cannot be read. The same bytes under another path or name give the same fingerprint."""
    h = hashlib.blake2b(digest_size=16)
    st = os.stat(path)
    if not os.path.isdir(path):
        h.update(b"file %d;" % st.st_size)
        _file_blocks(path, st.st_size, h)
        return st.st_size, st.st_mtime_ns, h.hexdigest()
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    sizes = [os.path.getsize(os.path.join(path, n)) for n in names]
    h.update(("folder;" + ";".join(f"{n}:{s}" for n, s in zip(names, sizes))).encode())
    for k in sorted({0, len(names) // 2, len(names) - 1}) if names else []:
        _file_blocks(os.path.join(path, names[k]), sizes[k], h)
    return sum(sizes), st.st_mtime_ns, h.hexdigest()


def _row(path: str, known: dict) -> tuple:
    try:
        st = os.stat(path)
        old = known.get(path)
        if old is not None and not os.path.isdir(path) and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            return (path, *old)
        return (path, *fingerprint(path))
    except OSError:  # an unreadable scan is the trainer's business (--skip_bad); it is listed, unfingerprinted
        return (path, -1, -1, "")


def write_manifest(paths: list[str], folder: str, workers: int = 16) -> tuple[str, str]:
    """Fingerprint `paths` (absolute) into `folder`/data_manifest.csv.gz (atomically); returns (file name,
    SHA-256 of the file) for the checkpoint's args. Reuses an existing manifest's rows for unchanged files."""
    out = os.path.join(folder, MANIFEST_NAME)
    known = {}
    if os.path.isfile(out):
        try:
            old = pd.read_csv(out, dtype={"fingerprint": str}, keep_default_na=False)
            known = {p: (int(s), int(m), f) for p, s, m, f in old[list(COLUMNS)].itertuples(index=False) if f}
        except (OSError, ValueError, KeyError, EOFError, gzip.BadGzipFile):
            known = {}  # a damaged manifest of an earlier run is recomputed, never trusted
    with ThreadPoolExecutor(max(1, workers)) as pool:  # file reads wait on the disk, not the CPU
        rows = list(pool.map(lambda p: _row(p, known), paths, chunksize=64))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    def write(tmp: str) -> None:  # no name or time in the gzip header: the same rows give the same bytes and digest
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(table.to_csv(index=False).encode())

    atomic_write(out, write)
    return MANIFEST_NAME, file_sha256(out)


def read_manifest(path: str, sha256: str | None = None) -> pd.DataFrame:
    """A manifest as a table (path, size, mtime_ns, fingerprint); with `sha256`, a file that does not match it
    (damaged, or replaced by another run's) is refused with one sentence."""
    if sha256 is not None and file_sha256(path) != sha256:
        raise UserError(f"{path}: its SHA-256 differs from the one its checkpoint recorded; the manifest is "
                        f"damaged or belongs to another run, so it cannot tell which scans were pretrained on.")
    try:
        table = pd.read_csv(path, dtype={"fingerprint": str, "path": str}, keep_default_na=False)
    except (ValueError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise UserError(f"{path}: is not a readable data manifest ({type(e).__name__}); expected the "
                        f"{MANIFEST_NAME} that main_pretrain.py writes.") from None
    if list(table.columns) != list(COLUMNS):
        raise UserError(f"{path}: has columns {', '.join(table.columns)}; a data manifest has "
                        f"{', '.join(COLUMNS)}.")
    return table


def _path_list(path: str) -> pd.DataFrame:
    """A plain list or CSV of pretraining paths (made elsewhere): compared by path only."""
    from util.data.path_table import find_column, read_csv_table, resolve_paths

    table = read_csv_table(path)
    col = find_column(table, "Path")
    if col is None:
        raise UserError(f"{path}: has no 'Path' column; expected a checkpoint, a {MANIFEST_NAME} or a list of the "
                        f"pretraining scans (one path per line, or a CSV with a Path column).")
    paths = [p for p in resolve_paths(table, col, path, check_exists=False) if p]
    return pd.DataFrame({"path": paths, "size": -1, "mtime_ns": -1, "fingerprint": ""})


def _beside(source: str, name: str) -> str:
    """Where the manifest `name` of the checkpoint `source` belongs: beside the file, or inside a model folder."""
    return os.path.join(source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)), name)


def manifest_beside(source: str, name: str | None) -> str | None:
    """The data manifest `name` beside the checkpoint `source` (inside it when `source` is a model folder that
    includes it); None when it is not there."""
    path = _beside(source, name) if name else None
    return path if path and os.path.isfile(path) else None


def recorded_manifest(source: str, name: str | None, sha256: str | None) -> tuple[pd.DataFrame, str]:
    """The manifest a checkpoint or model folder `source` records (its file name and SHA-256), read from beside it
    and checked against the digest; one sentence when it records none or the file is not there."""
    if not name:
        raise UserError(f"{source} records no data manifest (it was made elsewhere or before manifests were "
                        f"written); pass its list of pretraining scans instead: --pretraining NAME=LIST.")
    path = manifest_beside(source, name)
    if path is None:
        raise UserError(f"{source} was pretrained on the scans listed in {name}, which is not beside it "
                        f"({_beside(source, name)}); copy it from the run "
                        f"folder next to the checkpoint.")
    return read_manifest(path, sha256), f"{name} of {os.path.basename(os.path.normpath(source))}"


def pretraining_data(source: str) -> tuple[pd.DataFrame, str]:
    """The scans of a manifest file or a list of paths (by path only), and a few words on what it is; a checkpoint
    or model folder is read by util.evaluate.pretraining, which finds the manifest it records."""
    if not os.path.exists(source):
        raise UserError(f"--pretraining {source} does not exist; expected a checkpoint, a model folder, a "
                        f"{MANIFEST_NAME} or a list of the pretraining scans.")
    if source.endswith(".csv.gz"):
        return read_manifest(source), os.path.basename(source)
    return _path_list(source), f"list {os.path.basename(source)} (by path only)"


def _readable(path: str) -> tuple[str, str]:
    """(fingerprint, "") of a scan, or ("", why it could not be read)."""
    if not path:
        return "", "empty path"
    try:
        return fingerprint(path)[2], ""
    except OSError as e:
        return "", e.strerror or type(e).__name__


def find_overlap(paths: list[str], pretraining: pd.DataFrame, workers: int = 16,
                 rows: list[int] | None = None) -> pd.DataFrame:
    """Evaluated scans (absolute paths) that were pretrained on: one row per hit with `row` (rows[i], the label
    table's row, or the index into `paths`), `path`, `matched_by` ('path', or 'content' for the same bytes
    elsewhere) and `pretraining_path`. Content is compared only when the manifest has fingerprints; a scan that
    cannot be read then is listed too, with matched_by 'unreadable' and the reason in `pretraining_path`, never
    skipped: it may be a pretraining scan under another name."""
    rows = list(range(len(paths))) if rows is None else list(rows)
    by_path = {os.path.normpath(p): p for p in pretraining["path"]}
    prints = pretraining[pretraining["fingerprint"] != ""]
    by_print = dict(zip(prints["fingerprint"], prints["path"]))
    hits, todo = [], []
    for i, p in enumerate(paths):
        if p and os.path.normpath(p) in by_path:
            hits.append((rows[i], p, "path", by_path[os.path.normpath(p)]))
        elif by_print:
            todo.append((i, p))
    if todo:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            found = list(pool.map(lambda t: _readable(t[1]), todo))
        for (i, p), (f, why) in zip(todo, found):
            if why:
                hits.append((rows[i], p, "unreadable", why))
            elif f in by_print:
                hits.append((rows[i], p, "content", by_print[f]))
    out = pd.DataFrame(hits, columns=["row", "path", "matched_by", "pretraining_path"])
    return out.sort_values("row", kind="stable").reset_index(drop=True) if len(out) else out
