"""Tests for training/mnist.py on tiny generated files, plus one check on the real data.

The generated MNIST files are a few images in real IDX format; the known-hash table
(``mnist.SHA256``) is patched to trust them, and ``NUM_VALIDATION`` is shrunk to fit.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from training import mnist
from training.errors import UserError
from training.mnist import DataError

N_TRAIN, N_TEST, N_VAL = 14, 5, 4


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fresh in-memory caches, a private disk cache and no data dir from the environment."""
    mnist.clear_caches()
    monkeypatch.setenv(mnist.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _idx(arr: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes (magic 0x0800 | ndim unless overridden)."""
    head = (0x0800 | arr.ndim if magic is None else magic).to_bytes(4, "big")
    dims = b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + dims + arr.astype(np.uint8).tobytes()


def _trust(monkeypatch: pytest.MonkeyPatch, root: Path, rel: str) -> None:
    monkeypatch.setitem(mnist.SHA256, rel, _sha(root / rel))


def _write_mnist(
    root: Path, monkeypatch: pytest.MonkeyPatch, seed: int = 0
) -> dict[str, np.ndarray]:
    """Four tiny MNIST files under ``root/mnist``, trusted; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        mnist.TRAIN_IMAGES: rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        mnist.TRAIN_LABELS: rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        mnist.TEST_IMAGES: rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        mnist.TEST_LABELS: rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        (root / "mnist" / name).write_bytes(gzip.compress(_idx(arr)))
        _trust(monkeypatch, root, f"mnist/{name}")
    monkeypatch.setattr(mnist, "NUM_VALIDATION", N_VAL)
    return arrays


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every download fail as if offline; returns the URLs that were tried."""
    tried: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        tried.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return tried


# --------------------------------------------------------------------------- data dir


def test_resolve_data_dir_prefers_arg_then_env_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert mnist.resolve_data_dir() == tmp_path.resolve() / "data"
    monkeypatch.setenv(mnist.DATA_DIR_ENV, "")
    assert mnist.resolve_data_dir() == tmp_path.resolve() / "data"
    monkeypatch.setenv(mnist.DATA_DIR_ENV, str(tmp_path / "from_env"))
    assert mnist.resolve_data_dir() == tmp_path.resolve() / "from_env"
    assert mnist.resolve_data_dir("rel") == tmp_path.resolve() / "rel"
    assert mnist.resolve_data_dir(tmp_path / "x") == tmp_path.resolve() / "x"


def test_data_error_is_a_user_error() -> None:
    assert issubclass(DataError, UserError)


# --------------------------------------------------------------------------- MNIST


def test_load_mnist_parses_pixels_labels_and_the_paper_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _write_mnist(tmp_path, monkeypatch)
    m = mnist.load_mnist(tmp_path, download=False)

    train_x = raw[mnist.TRAIN_IMAGES].reshape(N_TRAIN, 784) / 255.0
    train_y = raw[mnist.TRAIN_LABELS]
    cut = N_TRAIN - N_VAL
    assert m.train_x.dtype == np.float32 and m.train_y.dtype == np.int64
    np.testing.assert_allclose(m.train_x, train_x[:cut], rtol=1e-6)
    np.testing.assert_array_equal(m.train_y, train_y[:cut])
    np.testing.assert_allclose(m.val_x, train_x[cut:], rtol=1e-6)
    np.testing.assert_array_equal(m.val_y, train_y[cut:])
    np.testing.assert_allclose(m.test_x, raw[mnist.TEST_IMAGES].reshape(N_TEST, 784) / 255.0)
    np.testing.assert_array_equal(m.test_y, raw[mnist.TEST_LABELS])
    assert m.sha256 == {n: _sha(tmp_path / "mnist" / n) for n in mnist.MNIST_FILES}
    # Shared by every caller, so cached and read-only.
    assert mnist.load_mnist(tmp_path, download=False) is m
    with pytest.raises(ValueError, match="read-only"):
        m.train_x[0, 0] = 1.0


def test_dataset_fingerprint_is_a_digest_of_the_file_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_mnist(tmp_path, monkeypatch)
    m = mnist.load_mnist(tmp_path, download=False)
    fp = mnist.dataset_fingerprint(m)
    assert len(fp) == 64 and int(fp, 16) >= 0
    reordered = dict(reversed(list(m.sha256.items())))
    same = mnist.MNIST(m.train_x, m.train_y, m.val_x, m.val_y, m.test_x, m.test_y, reordered)
    assert mnist.dataset_fingerprint(same) == fp
    changed = {**m.sha256, mnist.TEST_LABELS: "0" * 64}
    other = mnist.MNIST(m.train_x, m.train_y, m.val_x, m.val_y, m.test_x, m.test_y, changed)
    assert mnist.dataset_fingerprint(other) != fp


def _truncate_gz(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _bad_magic(path: Path) -> None:
    images = np.zeros((N_TRAIN, 28, 28), np.uint8)
    path.write_bytes(gzip.compress(_idx(images, magic=0x0801)))


def _short_payload(path: Path) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))


def _wrong_side(path: Path) -> None:
    path.write_bytes(gzip.compress(_idx(np.zeros((N_TRAIN, 32, 32), np.uint8))))


def _label_count(path: Path) -> None:
    path.write_bytes(gzip.compress(_idx(np.zeros(N_TRAIN - 1, np.uint8))))


def _label_range(path: Path) -> None:
    path.write_bytes(gzip.compress(_idx(np.full(N_TRAIN, 10, np.uint8))))


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        (mnist.TRAIN_IMAGES, _truncate_gz, "not a complete gzip file"),
        (mnist.TRAIN_IMAGES, _bad_magic, "bad IDX magic number 2049"),
        (mnist.TEST_IMAGES, _short_payload, "truncated"),
        (mnist.TRAIN_IMAGES, _wrong_side, "32x32, expected 28x28"),
        (mnist.TRAIN_LABELS, _label_count, "13 labels for the 14 images"),
        (mnist.TRAIN_LABELS, _label_range, "label 10 is outside 0..9"),
    ],
)
def test_malformed_idx_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, damage: object, message: str
) -> None:
    _write_mnist(tmp_path, monkeypatch)
    path = tmp_path / "mnist" / name
    damage(path)  # type: ignore[operator]
    _trust(monkeypatch, tmp_path, f"mnist/{name}")  # get past the checksum to the parser
    with pytest.raises(DataError, match=message) as err:
        mnist.load_mnist(tmp_path, download=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_checksum_mismatch_says_corrupted_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _write_mnist(tmp_path, monkeypatch)
    flipped = raw[mnist.TEST_LABELS].copy()
    flipped[0] = (flipped[0] + 1) % 10
    path = tmp_path / "mnist" / mnist.TEST_LABELS
    path.write_bytes(gzip.compress(_idx(flipped)))  # a valid file, but not the known one
    with pytest.raises(DataError, match="is corrupted") as err:
        mnist.load_mnist(tmp_path, download=False)
    msg = str(err.value)
    assert str(path) in msg and "delete" in msg and "\n" not in msg


def test_missing_files_give_one_error_naming_files_path_and_mirrors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_mnist(tmp_path, monkeypatch)
    for name in (mnist.TRAIN_IMAGES, mnist.TEST_LABELS):
        (tmp_path / "mnist" / name).unlink()
    tried = _no_network(monkeypatch)
    with pytest.raises(DataError) as err:
        mnist.load_mnist(tmp_path)
    msg = str(err.value)
    assert mnist.TRAIN_IMAGES in msg and mnist.TEST_LABELS in msg
    assert mnist.TRAIN_LABELS not in msg
    assert str((tmp_path / "mnist").resolve()) in msg
    assert all(mirror in msg for mirror in mnist.MNIST_MIRRORS)
    assert "\n" not in msg
    # Mirrors in order; an unreachable mirror is not retried for the second file.
    assert tried == [m + mnist.TRAIN_IMAGES for m in mnist.MNIST_MIRRORS]
    assert not list((tmp_path / "mnist").glob("*.part"))


def test_missing_file_without_download_does_not_touch_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried = _no_network(monkeypatch)
    with pytest.raises(DataError, match="download is disabled") as err:
        mnist.load_mnist(tmp_path, download=False)
    assert all(n in str(err.value) for n in mnist.MNIST_FILES)
    assert str(tmp_path / "mnist") in str(err.value)
    assert tried == []


def test_download_verifies_checksum_and_falls_through_mirrors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_mnist(tmp_path, monkeypatch)
    path = tmp_path / "mnist" / mnist.TEST_IMAGES
    good = path.read_bytes()
    path.unlink()
    first, second, third = mnist.MNIST_MIRRORS
    tried: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        tried.append(url)
        if url.startswith(first):
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]
        if url.startswith(second):
            return io.BytesIO(good[:-1] + bytes([good[-1] ^ 0xFF]))  # wrong bytes: rejected
        return io.BytesIO(good)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    m = mnist.load_mnist(tmp_path)
    assert tried == [mirror + mnist.TEST_IMAGES for mirror in (first, second, third)]
    assert path.read_bytes() == good
    assert m.test_x.shape == (N_TEST, 784)
    assert not list((tmp_path / "mnist").glob("*.part"))


def test_download_of_wrong_bytes_everywhere_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_mnist(tmp_path, monkeypatch)
    (tmp_path / "mnist" / mnist.TEST_IMAGES).unlink()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=0: io.BytesIO(b"junk"))
    with pytest.raises(DataError, match="checksum mismatch"):
        mnist.load_mnist(tmp_path)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(
        n for n in mnist.MNIST_FILES if n != mnist.TEST_IMAGES
    )


# --------------------------------------------------------------------------- OOD fixtures


def _write_notmnist(root: Path, monkeypatch: pytest.MonkeyPatch, count: int = 30) -> Path:
    """Image i is filled with the value i, so a row identifies the image it came from."""
    x = np.repeat(np.arange(count, dtype=np.uint8), 28 * 28).reshape(count, 28, 28)
    path = root / mnist.NOTMNIST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, x=x, y=np.zeros(count, np.uint8))
    _trust(monkeypatch, root, mnist.NOTMNIST_FILE)
    return path


def _png(blob_image: Image.Image) -> bytes:
    buf = io.BytesIO()
    blob_image.save(buf, format="PNG")
    return buf.getvalue()


def _write_omniglot(root: Path, monkeypatch: pytest.MonkeyPatch, count: int = 12) -> Path:
    """1-bit 105x105 PNGs like Omniglot's: white paper, a black vertical stroke whose
    position encodes the image's index, so the decoded row identifies it."""
    path = root / mnist.OMNIGLOT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images_evaluation/Alpha/", "")
        for i in range(count):
            im = Image.new("1", (105, 105), 1)
            left = 4 + 7 * i
            ImageDraw.Draw(im).rectangle((left, 10, left + 11, 94), fill=0)
            zf.writestr(f"images_evaluation/Alpha/character01/{i:04d}_{i:02d}.png", _png(im))
    _trust(monkeypatch, root, mnist.OMNIGLOT_FILE)
    return path


CIFAR_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 200), (20, 40, 60)]


def _write_cifar(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = root / mnist.CIFAR_JPEG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for i, colour in enumerate(CIFAR_COLOURS):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), colour).save(buf, format="JPEG", quality=75)
            zf.writestr(f"test/class{i}/{i:04d}.jpg", buf.getvalue())
    _trust(monkeypatch, root, mnist.CIFAR_JPEG_FILE)
    return path


# --------------------------------------------------------------------------- OOD sets


def test_notmnist_is_a_seeded_subset_without_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_notmnist(tmp_path, monkeypatch)
    a = mnist.load_ood("notmnist", n=10, data_dir=tmp_path, seed=1)
    assert a.shape == (10, 784) and a.dtype == np.float32
    ids = np.rint(a[:, 0] * 255).astype(int)
    np.testing.assert_array_equal(
        a, np.repeat(ids / 255.0, 784).reshape(10, 784).astype(np.float32)
    )
    assert len(set(ids.tolist())) == 10 and ids.max() < 30
    np.testing.assert_array_equal(a, mnist.load_ood("notmnist", 10, tmp_path, seed=1))
    assert not np.array_equal(a, mnist.load_ood("notmnist", 10, tmp_path, seed=2))
    everything = mnist.load_ood("notmnist", None, tmp_path)
    np.testing.assert_array_equal(np.rint(everything[:, 0] * 255), np.arange(30))
    with pytest.raises(DataError, match="cannot sample n=31"):
        mnist.load_ood("notmnist", 31, tmp_path)


def test_omniglot_is_inverted_to_white_strokes_on_black(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_omniglot(tmp_path, monkeypatch)
    a = mnist.load_ood("omniglot", n=None, data_dir=tmp_path)
    assert a.shape == (12, 784) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    images = a.reshape(12, 28, 28)
    for i, im in enumerate(images):
        col = round((4 + 7 * i + 6) * 28 / 105)  # the stroke's centre, at 28x28
        assert im[14, col - 1 : col + 2].max() > 0.9, f"image {i}: stroke not white"
        far = np.abs(np.arange(28) - col) > 4
        assert im[:, far].max() < 0.05, f"image {i}: paper not black"
        assert im[0, :].max() < 0.05


def test_omniglot_decodes_only_the_sample_and_caches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_omniglot(tmp_path, monkeypatch)
    decoded: list[int] = []
    real_decode = mnist._decode_28

    def counting_decode(blob: bytes, invert: bool) -> np.ndarray:
        decoded.append(1)
        return real_decode(blob, invert)

    monkeypatch.setattr(mnist, "_decode_28", counting_decode)
    a = mnist.load_ood("omniglot", n=5, data_dir=tmp_path, seed=3)
    assert len(decoded) == 5
    cached = list((tmp_path / "cache").glob("omniglot-*-n5-seed3-*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0], allow_pickle=False), a)

    b = mnist.load_ood("omniglot", n=5, data_dir=tmp_path, seed=3)
    assert len(decoded) == 5  # served from the cache
    np.testing.assert_array_equal(a, b)
    c = mnist.load_ood("omniglot", n=5, data_dir=tmp_path, seed=4)
    assert len(decoded) == 10 and not np.array_equal(a, c)

    cached[0].write_bytes(b"not an npy file")  # a damaged cache is rebuilt, not trusted
    np.testing.assert_array_equal(mnist.load_ood("omniglot", 5, tmp_path, seed=3), a)
    assert len(decoded) == 15


def test_cifar10_grey_uses_luminance_and_is_not_inverted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_cifar(tmp_path, monkeypatch)
    a = mnist.load_ood("cifar10_grey", n=None, data_dir=tmp_path)
    assert a.shape == (len(CIFAR_COLOURS), 784) and a.dtype == np.float32
    luma = np.array([(0.299 * r + 0.587 * g + 0.114 * b) / 255 for r, g, b in CIFAR_COLOURS])
    np.testing.assert_allclose(a.mean(axis=1), luma, atol=4 / 255)
    describe = mnist.describe_ood("cifar10_grey")
    assert "JPEG" in describe and "not" in describe.lower()


def test_gaussian_noise_matches_mnist_statistics_after_clipping() -> None:
    a = mnist.load_ood("gaussian", n=2000, seed=0)
    assert a.shape == (2000, 784) and a.min() == 0.0 and a.max() == 1.0
    mu, sd = mnist.MNIST_PIXEL_MEAN, mnist.MNIST_PIXEL_STD
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    assert abs((a == 0).mean() - phi(-mu / sd)) < 0.002
    assert abs((a == 1).mean() - (1 - phi((1 - mu) / sd))) < 0.0005
    assert abs(float(np.median(a)) - mu) < 0.003  # clipping keeps the median
    np.testing.assert_array_equal(a, mnist.load_ood("gaussian", n=2000, seed=0))
    assert not np.array_equal(a, mnist.load_ood("gaussian", n=2000, seed=1))


def test_uniform_noise_is_seeded_unit_uniform() -> None:
    a = mnist.load_ood("uniform", n=2000, seed=5)
    assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() < 1.0
    assert abs(a.mean() - 0.5) < 0.002 and abs(a.var() - 1 / 12) < 0.001
    np.testing.assert_array_equal(a, mnist.load_ood("uniform", n=2000, seed=5))
    assert not np.array_equal(a, mnist.load_ood("uniform", n=2000, seed=6))
    assert mnist.load_ood("uniform", n=None).shape == (mnist.DEFAULT_NOISE_SIZE, 784)


def test_unknown_ood_name_lists_the_valid_ones() -> None:
    for call in (lambda: mnist.load_ood("cifar10"), lambda: mnist.describe_ood("kmnist")):
        with pytest.raises(DataError) as err:
            call()
        assert all(name in str(err.value) for name in mnist.OOD_SETS)


@pytest.mark.parametrize("n", [0, -3, True, 2.5])
def test_bad_sample_size_is_rejected(n: object) -> None:
    with pytest.raises(DataError, match="n must be a positive integer"):
        mnist.load_ood("uniform", n=n)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "rel"),
    [
        ("notmnist", mnist.NOTMNIST_FILE),
        ("omniglot", mnist.OMNIGLOT_FILE),
        ("cifar10_grey", mnist.CIFAR_JPEG_FILE),
    ],
)
def test_missing_ood_file_names_file_and_place(tmp_path: Path, name: str, rel: str) -> None:
    with pytest.raises(DataError, match="not downloaded") as err:
        mnist.load_ood(name, data_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / rel) in msg and str((tmp_path / rel).parent) in msg


def test_ood_source_checksum_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_notmnist(tmp_path, monkeypatch)
    monkeypatch.setitem(mnist.SHA256, mnist.NOTMNIST_FILE, "0" * 64)
    with pytest.raises(DataError, match="is corrupted"):
        mnist.load_ood("notmnist", 5, tmp_path)


# --------------------------------------------------------------------------- real data


def _real_data_dir() -> Path | None:
    env = os.environ.get(mnist.DATA_DIR_ENV)
    if env and all((Path(env) / "mnist" / n).is_file() for n in mnist.MNIST_FILES):
        return Path(env)
    return None


REAL_DATA = _real_data_dir()


@pytest.mark.skipif(REAL_DATA is None, reason="APD_DATA_DIR does not point at the real data")
def test_real_data() -> None:
    m = mnist.load_mnist(REAL_DATA, download=False)
    assert (len(m.train_x), len(m.val_x), len(m.test_x)) == (50_000, 10_000, 10_000)
    assert m.train_x.shape[1] == 784 and m.train_x.dtype == np.float32
    assert 0.0 == m.train_x.min() and m.train_x.max() == 1.0
    assert np.bincount(m.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(m.train_y, minlength=10).sum() + np.bincount(m.val_y).sum() == 60_000
    assert m.sha256 == {n: mnist.SHA256[f"mnist/{n}"] for n in mnist.MNIST_FILES}
    assert abs(m.train_x.mean(dtype=np.float64) - mnist.MNIST_PIXEL_MEAN) < 1e-5
    assert abs(m.train_x.std(dtype=np.float64) - mnist.MNIST_PIXEL_STD) < 1e-5
    for name in ("notmnist", "omniglot", "cifar10_grey"):
        a = mnist.load_ood(name, n=50, data_dir=REAL_DATA)
        assert a.shape == (50, 784) and 0.0 <= a.min() and a.max() <= 1.0
        if name == "omniglot":  # inverted: white strokes on a black background
            assert np.median(a) == 0.0 and a.mean() < 0.2
