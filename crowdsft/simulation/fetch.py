"""``crowdsft data fetch movielens``: the MovieLens ml-latest-small archive that the paper's
simulation uses, downloaded from GroupLens into the user's data folder, checked and unpacked.

What is checked: the SHA-256 of each file the simulation reads (``movies.csv``,
``ratings.csv``), pinned below from the copy the figures in the README were made with, so a
changed or corrupted download is refused before anything is unpacked where ``simulate`` looks;
and, where given (``--sha256``), the archive's own SHA-256, before anything is unpacked. Only
the pinned files are unpacked, each bounded in size, and the download too.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

from crowdsft.errors import InputError

MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
MOVIELENS_FOLDER = "ml-latest-small"
# SHA-256 of the files the simulation reads, from ml-latest-small (GroupLens, September 2018)
MOVIELENS_FILES: Mapping[str, str] = {
    "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
    "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
}


def data_home() -> Path:
    """Where fetched data sets live: ``$CROWDSFT_DATA_HOME``, else ``data/`` in the user's
    data folder for crowdsft (``platformdirs``)."""
    if os.environ.get("CROWDSFT_DATA_HOME"):
        return Path(os.environ["CROWDSFT_DATA_HOME"])
    import platformdirs

    return Path(platformdirs.user_data_dir("crowdsft", appauthor=False)) / "data"


def movielens_home() -> Path:
    return data_home() / MOVIELENS_FOLDER


# Bounds: the real archive is about 1 MB and ratings.csv about 2.4 MB. A download or a file
# past these is refused, whatever its headers claim.
MAX_ARCHIVE_BYTES = 64 * 1024 * 1024
MAX_MEMBER_BYTES = 64 * 1024 * 1024


def _download(
    url: str, out: Path, max_bytes: int, progress: Callable[[int, int], None] | None
) -> str:
    """Stream ``url`` into the file ``out`` (at most ``max_bytes``); return its SHA-256."""
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, out.open("wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0)
            if total > max_bytes:
                raise InputError(
                    f"{url} announces {total} bytes; an archive of at most {max_bytes} is "
                    "expected: refused (nothing was downloaded)"
                )
            got = 0
            while chunk := resp.read(1 << 16):
                got += len(chunk)
                if got > max_bytes:
                    raise InputError(
                        f"{url} sent more than {max_bytes} bytes: refused (nothing was kept)"
                    )
                h.update(chunk)
                fh.write(chunk)
                if progress:
                    progress(got, total)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # incl. a cut-off body
        raise InputError(f"cannot download {url}: {type(exc).__name__}: {exc}") from None
    return h.hexdigest()


def _extract(archive: zipfile.ZipFile, member: str, out: Path, max_bytes: int) -> str:
    """Copy one member of ``archive`` to ``out``, at most ``max_bytes`` of it whatever its
    header says; return its SHA-256."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise InputError(f"the archive holds no {member}") from None
    if info.file_size > max_bytes:
        raise InputError(
            f"{member} is {info.file_size} bytes unpacked; at most {max_bytes} is expected: "
            "refused (nothing was unpacked)"
        )
    h = hashlib.sha256()
    got = 0
    with archive.open(info) as src, out.open("wb") as fh:
        while chunk := src.read(1 << 20):
            got += len(chunk)
            if got > max_bytes:
                raise InputError(f"{member} unpacks past {max_bytes} bytes: refused")
            h.update(chunk)
            fh.write(chunk)
    return h.hexdigest()


def fetch_movielens(
    dest: Path | None = None,
    url: str = MOVIELENS_URL,
    sha256: str | None = None,
    files: Mapping[str, str] = MOVIELENS_FILES,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    max_archive_bytes: int = MAX_ARCHIVE_BYTES,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Path:
    """Download, check and unpack ml-latest-small into ``dest`` (default ``movielens_home()``);
    return the folder. An existing folder whose files check out is kept (``force``: fetch
    again).

    The download streams into a temporary file (bounded by ``max_archive_bytes``), is checked
    against ``sha256`` where given before anything is unpacked, and only the pinned files are
    unpacked (each bounded by ``max_member_bytes`` and checked against its pin), into a
    temporary folder: ``dest`` receives them only when every check has passed, and on any
    refusal nothing is left anywhere."""
    dest = Path(dest) if dest is not None else movielens_home()
    if not force and dest.is_dir() and _matches(dest, files):
        return dest
    with tempfile.TemporaryDirectory(prefix="crowdsft-fetch-") as tmp:
        work = Path(tmp)
        zipped = work / "archive.zip"
        digest = _download(url, zipped, max_archive_bytes, progress)
        if sha256 is not None and digest != sha256.lower():
            raise InputError(
                f"the archive from {url} has SHA-256 {digest}, not {sha256}: refused "
                "(nothing was unpacked)"
            )
        unpacked = work / MOVIELENS_FOLDER
        unpacked.mkdir()
        try:
            with zipfile.ZipFile(zipped) as archive:
                for name, expected in files.items():
                    if "/" in name or "\\" in name or name in ("", ".", ".."):
                        raise InputError(f"not a file name: {name!r}")
                    actual = _extract(
                        archive, f"{MOVIELENS_FOLDER}/{name}", unpacked / name, max_member_bytes
                    )
                    if actual != expected:
                        raise InputError(
                            f"{MOVIELENS_FOLDER}/{name} has SHA-256 {actual}, not the pinned "
                            f"{expected}: refused (the download changed or is corrupt)"
                        )
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            raise InputError(f"{url} did not send a readable zip archive: {exc}") from None
        if dest.exists() and not _replaceable(dest, files):
            raise InputError(
                f"{dest} exists and is not a MovieLens folder this command wrote (it holds "
                "other files): refused, nothing was changed; give an empty or new --dest"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        try:
            for name in files:
                shutil.move(unpacked / name, staged / name)
            if dest.exists():
                shutil.rmtree(dest)
            staged.rename(dest)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return dest


def _replaceable(folder: Path, files: Mapping[str, str]) -> bool:
    """Whether ``folder`` may be replaced: an empty folder, or one that holds the pinned
    files and what a full ml-latest-small archive holds beside them, nothing else."""
    if not folder.is_dir():
        return False
    known = set(files) | {"links.csv", "tags.csv", "README.txt"}
    return all(p.name in known and p.is_file() for p in folder.iterdir())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _matches(folder: Path, files: Mapping[str, str]) -> bool:
    return all((folder / n).is_file() and _sha256(folder / n) == h for n, h in files.items())
