"""Datasets: MNIST with the paper's split, and the out-of-distribution (OOD) image sets.

Everything is read from one data directory (:func:`resolve_data_dir`) laid out as::

    <data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   (the 4 original IDX files)
    <data_dir>/notmnist/notMNIST_small_28x28.npz
    <data_dir>/omniglot/images_evaluation.zip
    <data_dir>/cifar10-test-jpeg-lossy/cifar10_test_jpeg_q75.zip

Every image comes back as a row of 784 float32 pixels in ``[0, 1]`` (``pixel / 255``), white
strokes on a black background like MNIST.

MNIST (:func:`load_mnist`) uses the split of Wang et al. (2018): the first 50,000 training
images are the training set, the last 10,000 the validation set, and the t10k files the test
set. Each file's sha256 is checked against the published originals; a missing file is
downloaded from the public mirrors (checksum verified before it is moved into place).

OOD sets (:func:`load_ood`): ``notmnist``, ``omniglot`` (evaluation set, inverted and resized
105 -> 28), ``cifar10_grey`` (a **lossy JPEG stand-in** for the CIFAR-10 test set, turned grey
and resized 32 -> 28; never report results on it as "CIFAR-10"), ``gaussian`` and ``uniform``
noise. They are never downloaded. Decoded Omniglot / CIFAR subsets are cached as ``.npy`` in
``$APD_CACHE_DIR`` (default ``~/.cache/apd``), keyed by the source file's sha256, ``n`` and
``seed``.

Any problem with a data file raises :class:`DataError` with one line naming the file and what
to do about it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray

from training.errors import UserError

__all__ = [
    "MNIST",
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "OOD_SETS",
    "SHA256",
    "DataError",
    "clear_caches",
    "dataset_fingerprint",
    "describe_ood",
    "load_mnist",
    "load_ood",
    "resolve_data_dir",
]

log = logging.getLogger(__name__)

DATA_DIR_ENV: Final = "APD_DATA_DIR"
CACHE_DIR_ENV: Final = "APD_CACHE_DIR"

IMAGE_SIDE: Final = 28
IMAGE_DIM: Final = IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES: Final = 10
# The paper's split: the last 10,000 of the 60,000 training images are the validation set.
NUM_VALIDATION: Final = 10_000

MNIST_DIR: Final = "mnist"
TRAIN_IMAGES: Final = "train-images-idx3-ubyte.gz"
TRAIN_LABELS: Final = "train-labels-idx1-ubyte.gz"
TEST_IMAGES: Final = "t10k-images-idx3-ubyte.gz"
TEST_LABELS: Final = "t10k-labels-idx1-ubyte.gz"
MNIST_FILES: Final = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
MNIST_MIRRORS: Final = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT_S: Final = 15.0
_MAX_DOWNLOAD_BYTES: Final = 64 << 20  # the largest MNIST file is 9.9 MB

NOTMNIST_FILE: Final = "notmnist/notMNIST_small_28x28.npz"
OMNIGLOT_FILE: Final = "omniglot/images_evaluation.zip"
CIFAR_JPEG_FILE: Final = "cifar10-test-jpeg-lossy/cifar10_test_jpeg_q75.zip"

# sha256 of every source file, by path relative to the data directory. The MNIST files are
# byte-identical to the published originals (their md5s match the authors' values).
SHA256: Final[dict[str, str]] = {
    f"{MNIST_DIR}/{TRAIN_IMAGES}": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    f"{MNIST_DIR}/{TRAIN_LABELS}": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    f"{MNIST_DIR}/{TEST_IMAGES}": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    f"{MNIST_DIR}/{TEST_LABELS}": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
    NOTMNIST_FILE: "2d3feea984f369c145b59fe1ec9a5ecd1883157e4e23263f946409d80a62fe1c",
    OMNIGLOT_FILE: "1f795092c92d9ac2ac4619e1d119cd76003e01d8ef28bb57889d6539346a04d7",
    CIFAR_JPEG_FILE: "1a0f020db3b849f67439190779f8547d4357062aae23c2ba5f2b569fb58f1f8b",
}

OOD_SETS: Final = ("notmnist", "omniglot", "cifar10_grey", "gaussian", "uniform")
DEFAULT_NOISE_SIZE: Final = 10_000
# Mean and standard deviation of all pixels of the 50,000-image MNIST training split, in
# [0, 1] units (tests/test_mnist.py checks them against the real data).
MNIST_PIXEL_MEAN: Final = 0.130961
MNIST_PIXEL_STD: Final = 0.308495

_DESCRIPTIONS: Final[dict[str, str]] = {
    "notmnist": "notMNIST (small set, letters A-J, 28x28)",
    "omniglot": "Omniglot evaluation set (inverted to white on black, resized 105->28)",
    "cifar10_grey": (
        "CIFAR-10 test set, LOSSY JPEG (q75) stand-in, greyscale 28x28 "
        "(not pixel-exact CIFAR-10; do not report as CIFAR-10)"
    ),
    "gaussian": (
        f"Gaussian noise, pixels i.i.d. N({MNIST_PIXEL_MEAN:.4f}, {MNIST_PIXEL_STD:.4f}^2) "
        "(MNIST pixel mean/std) clipped to [0, 1]"
    ),
    "uniform": "uniform noise, pixels i.i.d. U[0, 1]",
}

# Bump when the conversion of a cached OOD set changes, so stale caches are not reused.
_CACHE_VERSION: Final = 1

FloatImages = NDArray[np.float32]
Labels = NDArray[np.int64]


class DataError(UserError):
    """A data file that is missing, corrupted or malformed, with one line saying what to do."""


# --------------------------------------------------------------------------- locations


def resolve_data_dir(arg: str | Path | None = None) -> Path:
    """The data directory: ``arg``, else ``$APD_DATA_DIR``, else ``./data``; made absolute."""
    if arg is not None and str(arg) != "":
        chosen = Path(arg)
    elif os.environ.get(DATA_DIR_ENV):
        chosen = Path(os.environ[DATA_DIR_ENV])
    else:
        chosen = Path("data")
    return chosen.expanduser().resolve()


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    return (Path(env) if env else Path.home() / ".cache" / "apd").expanduser()


def _where_hint(sub: str) -> str:
    return f"or set {DATA_DIR_ENV} to a folder that holds {sub}/"


# --------------------------------------------------------------------------- checksums


@functools.lru_cache(maxsize=64)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file; keyed by size and mtime too, so each file is hashed once per process."""
    del size, mtime_ns  # part of the cache key only
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of ``path`` (cached per process while its size and mtime stay the same)."""
    st = path.stat()
    return _sha256_of(path.resolve(), st.st_size, st.st_mtime_ns)


def _verify(path: Path, rel: str, remedy: str) -> str:
    """Check ``path`` against the known sha256 of ``rel``; returns the digest."""
    expected = SHA256[rel]
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if actual != expected:
        raise DataError(
            f"{path} is corrupted: its sha256 {actual[:16]}... is not the expected "
            f"{expected[:16]}...; {remedy}"
        )
    return actual


# --------------------------------------------------------------------------- MNIST


@dataclass(frozen=True, eq=False)
class MNIST:
    """MNIST with the paper's split. Images are ``(N, 784)`` float32 in ``[0, 1]``, labels
    ``(N,)`` int64 in ``0..9``. The arrays are shared between callers (the load is cached),
    so they are read-only: copy before modifying.
    """

    train_x: FloatImages
    train_y: Labels
    val_x: FloatImages
    val_y: Labels
    test_x: FloatImages
    test_y: Labels
    sha256: dict[str, str]  # file name -> sha256 of the file the arrays were parsed from


def _mnist_remedy(path: Path) -> str:
    return f"delete {path.name} so it is downloaded again, or replace it with the original"


def _read_idx(path: Path, ndim: int) -> NDArray[np.uint8]:
    """Parse a gzip-compressed IDX file of unsigned bytes with ``ndim`` dimensions."""
    remedy = _mnist_remedy(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a complete gzip file ({exc}); {remedy}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header; {remedy}")
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = (0x08 << 8) | ndim  # unsigned byte data, ndim dimensions
    if magic != expected_magic:
        raise DataError(
            f"{path}: bad IDX magic number {magic} (expected {expected_magic}: "
            f"unsigned bytes, {ndim} dimension(s)); {remedy}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected_len = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected_len:
        raise DataError(
            f"{path}: IDX header says {dims} ({expected_len} bytes) but the file holds "
            f"{len(raw)} bytes (truncated or padded); {remedy}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _to_unit(pixels: NDArray[np.uint8]) -> FloatImages:
    """uint8 images ``(N, ...)`` -> float32 rows ``(N, 784)`` of ``pixel / 255``."""
    out = pixels.reshape(len(pixels), IMAGE_DIM).astype(np.float32)
    out /= np.float32(255)
    return out


def _read_pair(images_path: Path, labels_path: Path) -> tuple[FloatImages, Labels]:
    images = _read_idx(images_path, 3)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28; "
            f"{_mnist_remedy(images_path)}"
        )
    labels = _read_idx(labels_path, 1)
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for the {len(images)} images in "
            f"{images_path.name}; {_mnist_remedy(labels_path)}"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{labels_path}: label {int(labels.max())} is outside 0..9; "
            f"{_mnist_remedy(labels_path)}"
        )
    return _to_unit(images), labels.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _parse_mnist(mnist_dir: Path) -> MNIST:
    """Verify and parse the 4 files in ``mnist_dir`` (which must all exist)."""
    digests: dict[str, str] = {}
    for name in MNIST_FILES:
        path = mnist_dir / name
        digests[name] = _verify(path, f"{MNIST_DIR}/{name}", _mnist_remedy(path))
    x, y = _read_pair(mnist_dir / TRAIN_IMAGES, mnist_dir / TRAIN_LABELS)
    test_x, test_y = _read_pair(mnist_dir / TEST_IMAGES, mnist_dir / TEST_LABELS)
    if len(x) <= NUM_VALIDATION:
        raise DataError(
            f"{mnist_dir / TRAIN_IMAGES}: {len(x)} training images, need more than the "
            f"{NUM_VALIDATION} held out for validation; {_mnist_remedy(mnist_dir / TRAIN_IMAGES)}"
        )
    cut = len(x) - NUM_VALIDATION
    for a in (x, y, test_x, test_y):
        a.flags.writeable = False  # shared by every caller of the cached load
    return MNIST(
        train_x=x[:cut],
        train_y=y[:cut],
        val_x=x[cut:],
        val_y=y[cut:],
        test_x=test_x,
        test_y=test_y,
        sha256=digests,
    )


def _download_one(name: str, dest: Path, dead: dict[str, str]) -> str | None:
    """Fetch ``name`` into ``dest`` from the first mirror that serves the right bytes.

    Returns ``None`` on success, else the last failure. Mirrors that cannot be reached are
    recorded in ``dead`` (mirror -> error) so the next file does not wait on them again.
    """
    expected = SHA256[f"{MNIST_DIR}/{name}"]
    reason = "no mirror tried"
    for mirror in MNIST_MIRRORS:
        url = mirror + name
        if mirror in dead:
            reason = f"{mirror}: {dead[mirror]}"
            continue
        log.info("downloading %s", url)
        tmp: Path | None = None
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                dest.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with tempfile.NamedTemporaryFile(
                    dir=dest.parent, prefix=f".{name}.", suffix=".part", delete=False
                ) as out:
                    tmp = Path(out.name)
                    total = 0
                    while chunk := resp.read(1 << 20):
                        total += len(chunk)
                        if total > _MAX_DOWNLOAD_BYTES:
                            raise ValueError(f"more than {_MAX_DOWNLOAD_BYTES} bytes")
                        h.update(chunk)
                        out.write(chunk)
            if h.hexdigest() != expected:
                reason = f"{url}: checksum mismatch"
                continue
            tmp.chmod(0o644)
            os.replace(tmp, dest)
            tmp = None
            return None
        except urllib.error.HTTPError as exc:
            reason = f"{url}: HTTP {exc.code}"
        except (urllib.error.URLError, TimeoutError) as exc:
            dead[mirror] = str(getattr(exc, "reason", exc))
            reason = f"{url}: {dead[mirror]}"
        except (OSError, ValueError) as exc:
            reason = f"{url}: {exc}"
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    return reason


def _ensure_mnist_files(mnist_dir: Path, download: bool) -> None:
    missing = [n for n in MNIST_FILES if not (mnist_dir / n).is_file()]
    if not missing:
        return
    where = f"put them in {mnist_dir} ({_where_hint(MNIST_DIR)})"
    names = ", ".join(missing)
    if not download:
        raise DataError(f"MNIST file(s) missing: {names}; {where}; download is disabled")
    dead: dict[str, str] = {}
    failures = {n: r for n in missing if (r := _download_one(n, mnist_dir / n, dead)) is not None}
    if failures:
        last = next(reversed(failures.values()))
        raise DataError(
            f"MNIST file(s) missing: {', '.join(failures)}; {where}; download failed from "
            f"{', '.join(MNIST_MIRRORS)} (last error: {last})"
        )


def load_mnist(data_dir: str | Path | None = None, download: bool = True) -> MNIST:
    """MNIST from ``<data_dir>/mnist/`` with the paper's 50,000 / 10,000 / 10,000 split.

    Missing files are downloaded from :data:`MNIST_MIRRORS` when ``download`` is true. Every
    file's sha256 is checked. The parsed arrays are cached in memory per directory (see
    :func:`clear_caches`) and are read-only.
    """
    mnist_dir = resolve_data_dir(data_dir) / MNIST_DIR
    _ensure_mnist_files(mnist_dir, download)
    return _parse_mnist(mnist_dir)


def dataset_fingerprint(mnist: MNIST) -> str:
    """One sha256 over the MNIST files' digests (``sha256sum`` lines, sorted by name)."""
    manifest = "".join(f"{mnist.sha256[n]}  {n}\n" for n in sorted(mnist.sha256))
    return hashlib.sha256(manifest.encode()).hexdigest()


# --------------------------------------------------------------------------- OOD sets


def describe_ood(name: str) -> str:
    """A human label for an OOD set, fit for reports (says when a set is a stand-in)."""
    _check_ood_name(name)
    return _DESCRIPTIONS[name]


def _check_ood_name(name: str) -> None:
    if name not in OOD_SETS:
        raise DataError(f"unknown OOD set {name!r}; choose one of: {', '.join(OOD_SETS)}")


def _ood_source(data_dir: Path, name: str, rel: str) -> tuple[Path, str]:
    """The verified source file of an OOD set and its sha256."""
    path = data_dir / rel
    sub, filename = rel.split("/", 1)
    if not path.is_file():
        raise DataError(
            f"{name} source file missing: {path}; put {filename} in {path.parent} "
            f"({_where_hint(sub)}); it is not downloaded automatically"
        )
    return path, _verify(path, rel, "replace it with a good copy of the original")


def _sample(total: int, n: int | None, seed: int, what: str) -> NDArray[np.intp]:
    """``n`` distinct indices of ``range(total)`` in seeded random order; all, in order, if None."""
    if n is None:
        return np.arange(total)
    if n > total:
        raise DataError(f"{what} holds {total} images, cannot sample n={n}")
    return np.random.default_rng(seed).permutation(total)[:n]


def _load_notmnist(data_dir: Path, n: int | None, seed: int) -> FloatImages:
    path, _ = _ood_source(data_dir, "notmnist", NOTMNIST_FILE)
    try:
        with np.load(path, allow_pickle=False) as npz:
            x = npz["x"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable notMNIST npz with an 'x' array ({exc})") from None
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or x.dtype != np.uint8:
        raise DataError(f"{path}: 'x' is {x.dtype} {x.shape}, expected uint8 (N, 28, 28)")
    return _to_unit(x[_sample(len(x), n, seed, str(path))])


def _decode_28(blob: bytes, invert: bool) -> NDArray[np.uint8]:
    """An image file's bytes -> 28x28 uint8 grey, Lanczos (antialiased) resize, optional invert."""
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        small = im.convert("L").resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
    a = np.asarray(small, dtype=np.uint8)
    return 255 - a if invert else a


def _load_cache(path: Path, rows: int) -> FloatImages | None:
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:
        log.warning("ignoring unreadable OOD cache %s (%s)", path, exc)
        return None
    if a.dtype != np.float32 or a.shape != (rows, IMAGE_DIM) or not (a.min() >= 0 and a.max() <= 1):
        log.warning("ignoring OOD cache %s: %s %s is not what was expected", path, a.dtype, a.shape)
        return None
    return a


def _save_cache(path: Path, a: FloatImages) -> None:
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.stem}.", suffix=".npy.part", delete=False
        ) as f:
            tmp = Path(f.name)
            np.save(f, a, allow_pickle=False)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.warning("could not cache %s (%s); continuing without the cache", path, exc)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _load_zip_images(
    data_dir: Path,
    name: str,
    rel: str,
    n: int | None,
    seed: int,
    keep: Callable[[str], bool],
    invert: bool,
) -> FloatImages:
    """Decode a seeded sample of the images in a zip (only those), cached on disk as .npy."""
    path, digest = _ood_source(data_dir, name, rel)
    try:
        with zipfile.ZipFile(path) as zf:
            members = sorted(m for m in zf.namelist() if keep(m))
            if not members:
                raise DataError(f"{path}: holds no images for {name}")
            idx = _sample(len(members), n, seed, str(path))
            cache = _cache_dir() / (
                f"{name}-{digest[:16]}-n{'all' if n is None else n}-seed{seed}"
                f"-v{_CACHE_VERSION}.npy"
            )
            cached = _load_cache(cache, len(idx))
            if cached is not None:
                return cached
            out = np.empty((len(idx), IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
            for row, i in enumerate(idx):
                member = members[i]
                try:
                    out[row] = _decode_28(zf.read(member), invert)
                except (OSError, ValueError, zlib.error) as exc:
                    raise DataError(f"{path}: cannot decode {member} ({exc})") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip file ({exc})") from None
    images = _to_unit(out)
    _save_cache(cache, images)
    return images


def load_ood(
    name: str, n: int | None = 10000, data_dir: str | Path | None = None, seed: int = 0
) -> FloatImages:
    """An OOD set as ``(M, 784)`` float32 in ``[0, 1]``, white strokes on black like MNIST.

    ``n`` images are drawn without replacement in seeded random order (``None``: every image,
    in file order; for the noise sets ``None`` means 10,000). The sets, see :data:`OOD_SETS`:

    * ``notmnist``: the notMNIST small set (18,724 letters A-J).
    * ``omniglot``: the Omniglot evaluation set (13,180 characters), inverted (``1 - image``)
      so strokes are white on black, and resized 105 -> 28 with a Lanczos (antialiasing) filter.
    * ``cifar10_grey``: **NOT pixel-exact CIFAR-10.** The 10,000 CIFAR-10 test images as
      third-party JPEG re-encodings at quality 75, turned grey (``convert('L')``) and
      resized 32 -> 28. An approximate stand-in only: label results on it with
      :func:`describe_ood`, never as "CIFAR-10".
    * ``gaussian``: pixels i.i.d. ``N(MNIST_PIXEL_MEAN, MNIST_PIXEL_STD^2)`` clipped to
      ``[0, 1]``.
    * ``uniform``: pixels i.i.d. ``U[0, 1)``.
    """
    _check_ood_name(name)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise DataError(f"n must be a positive integer or None, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if name in ("gaussian", "uniform"):
        rng = np.random.default_rng(seed)
        shape = (DEFAULT_NOISE_SIZE if n is None else n, IMAGE_DIM)
        if name == "uniform":
            return rng.random(shape, dtype=np.float32)
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(MNIST_PIXEL_STD)
        x += np.float32(MNIST_PIXEL_MEAN)
        return np.clip(x, 0.0, 1.0, out=x)
    root = resolve_data_dir(data_dir)
    if name == "notmnist":
        return _load_notmnist(root, n, seed)
    if name == "omniglot":
        return _load_zip_images(
            root, name, OMNIGLOT_FILE, n, seed, lambda m: m.endswith(".png"), invert=True
        )
    return _load_zip_images(
        root, name, CIFAR_JPEG_FILE, n, seed, lambda m: m.endswith(".jpg"), invert=False
    )


def clear_caches() -> None:
    """Forget the in-memory MNIST arrays and file digests (e.g. after replacing a file)."""
    _parse_mnist.cache_clear()
    _sha256_of.cache_clear()
