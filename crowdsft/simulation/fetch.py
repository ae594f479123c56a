"""``crowdsft data fetch movielens``: the MovieLens ml-latest-small archive that the paper's
simulation uses, downloaded from GroupLens into the user's data folder, checked and unpacked.

What is checked: the SHA-256 of each file the simulation reads (``movies.csv``,
``ratings.csv``), pinned below from the copy the figures in the README were made with, so a
changed or corrupted download is refused before anything is unpacked where ``simulate`` looks;
and, where given (``--sha256``), the archive's own SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import urllib.request
import zipfile
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


def _download(url: str, progress: Callable[[int, int], None] | None) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0)
            buf = io.BytesIO()
            while chunk := resp.read(1 << 16):
                buf.write(chunk)
                if progress:
                    progress(buf.tell(), total)
            return buf.getvalue()
    except OSError as exc:
        raise InputError(f"cannot download {url}: {exc}") from None


def fetch_movielens(
    dest: Path | None = None,
    url: str = MOVIELENS_URL,
    sha256: str | None = None,
    files: Mapping[str, str] = MOVIELENS_FILES,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Download, check and unpack ml-latest-small into ``dest`` (default ``movielens_home()``);
    return the folder. An existing folder whose files check out is kept (``force``: fetch
    again). Nothing is left in ``dest`` unless every check passes."""
    dest = Path(dest) if dest is not None else movielens_home()
    if not force and dest.is_dir() and _matches(dest, files):
        return dest
    data = _download(url, progress)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise InputError(
            f"the archive from {url} has SHA-256 {hashlib.sha256(data).hexdigest()}, "
            f"not {sha256}: refused (nothing was unpacked)"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InputError(f"{url} did not send a zip archive") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        root = Path(tmp).resolve()
        for member in archive.namelist():  # refuse paths that leave the folder
            if not (root / member).resolve().is_relative_to(root):
                raise InputError(f"the archive names a path outside its folder: {member}")
        archive.extractall(root)
        found = root / MOVIELENS_FOLDER
        if not found.is_dir():
            raise InputError(f"the archive holds no {MOVIELENS_FOLDER}/ folder")
        for name, expected in files.items():
            path = found / name
            if not path.is_file():
                raise InputError(f"the archive holds no {MOVIELENS_FOLDER}/{name}")
            actual = _sha256(path)
            if actual != expected:
                raise InputError(
                    f"{MOVIELENS_FOLDER}/{name} has SHA-256 {actual}, not the pinned "
                    f"{expected}: refused (the download changed or is corrupt)"
                )
        if dest.exists():
            shutil.rmtree(dest)
        found.rename(dest)
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _matches(folder: Path, files: Mapping[str, str]) -> bool:
    return all((folder / n).is_file() and _sha256(folder / n) == h for n, h in files.items())
