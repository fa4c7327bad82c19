"""Image files -> MNIST inputs (service/codecs/images.py), the one preparation that both
``POST /predict/image`` and the page at ``/`` use.

References are independent of the code under test: the first MNIST test image as MNIST itself
laid it out, and what MNIST's layout means (a 20-pixel box, centre of mass at the centre).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from service.api.app import create_app
from service.codecs.examples import MNIST_TEST_0
from service.codecs.images import mnist_input
from service.config import Settings
from tests.service_support import make_client

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "mnist-fcnn1" / "model.safetensors"
DIGIT = np.frombuffer(bytes.fromhex(MNIST_TEST_0), dtype=np.uint8).reshape(28, 28)


def png(pixels: NDArray[Any], mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(out, format="PNG")
    return out.getvalue()


def on_paper(digit: NDArray[np.uint8], side: int = 140, at: tuple[int, int] = (10, 40)) -> bytes:
    """The digit 4x larger as dark ink on grey-white paper, off-centre, on a larger sheet."""
    big = np.asarray(Image.fromarray(digit).resize((112, 112), Image.Resampling.BICUBIC))
    sheet = np.full((side + 40, side + 60), 230, dtype=np.uint8)
    y, x = at
    sheet[y : y + 112, x : x + 112] = (230 - big.astype(np.float64) * 200 / 255).astype(np.uint8)
    return png(sheet)


def layout_of(x: NDArray[np.float32]) -> tuple[int, NDArray[np.float64]]:
    """The longer side of the ink's box and the centre of mass of a 28x28 input."""
    image = x.reshape(28, 28).astype(np.float64)
    rows, cols = np.nonzero(image > 0.1)
    side = int(max(np.ptp(rows), np.ptp(cols)) + 1)
    com = np.array([(image * g).sum() / image.sum() for g in np.indices(image.shape)])
    return side, com


def corr(a: NDArray[Any], b: NDArray[Any]) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_an_mnist_digit_comes_back_as_itself() -> None:
    x = mnist_input(png(DIGIT))
    assert x.shape == (784,) and x.dtype == np.float32
    np.testing.assert_allclose(x, DIGIT.reshape(-1) / 255.0, atol=0.02)


def test_ink_on_paper_is_inverted_cropped_and_centred() -> None:
    x = mnist_input(on_paper(DIGIT))
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert corr(x, DIGIT) > 0.9
    side, com = layout_of(x)
    assert side in {19, 20, 21}
    assert np.all(np.abs(com - 14) <= 1.0), com


def test_dark_strokes_on_a_transparent_background_go_on_white_then_are_inverted() -> None:
    rgba = np.zeros((200, 200, 4), dtype=np.uint8)  # transparent everywhere...
    big = np.asarray(Image.fromarray(DIGIT).resize((200, 200), Image.Resampling.BICUBIC))
    rgba[..., 3] = big  # ...but black ink where the digit is
    x = mnist_input(png(rgba, "RGBA"))
    assert corr(x, DIGIT) > 0.9


def test_a_drawing_is_laid_out_as_mnist() -> None:
    """A 7 drawn white on black on a large pad, as the page's drawing pad gives it."""
    pad = Image.new("L", (280, 280), 0)
    ImageDraw.Draw(pad).line([(40, 30), (200, 30), (90, 250)], fill=255, width=22)
    x = mnist_input(png(np.asarray(pad)))
    side, com = layout_of(x)
    assert side in {19, 20, 21} and np.all(np.abs(com - 14) <= 1.0), (side, com)
    image = x.reshape(28, 28)
    top = int(np.nonzero(image > 0.1)[0].min())
    assert (image[top : top + 3].max(axis=0) > 0.5).sum() >= 10  # the bar of the 7 is on top


def test_a_blank_image_is_all_zeros_and_a_non_image_is_refused() -> None:
    assert not mnist_input(png(np.full((50, 50), 255, dtype=np.uint8))).any()
    with pytest.raises(ValueError, match="not a readable image"):
        mnist_input(b"not an image")


@pytest.fixture(scope="module")
def client() -> Any:
    settings = Settings(checkpoint=SHIPPED, redis_url=None, pool_size=50, num_threads=1)
    with make_client(create_app(settings)) as c:
        yield c


def test_predict_image_answers_as_predict_on_the_prepared_input(client: Any) -> None:
    """The page sends image files to /predict/image: its answer is that of /predict on the
    input this module makes, so page, API and this function agree."""
    photo = on_paper(DIGIT)
    form = {"num_samples": "30", "seed": "5"}
    by_file = client.post("/predict/image", files={"files": ("seven.png", photo)}, data=form)
    assert by_file.status_code == 200, by_file.text
    x = mnist_input(photo)
    by_json = client.post("/predict", json={"inputs": [x.tolist()], "num_samples": 30, "seed": 5})
    assert by_json.status_code == 200, by_json.text
    a, b = by_file.json()["predictions"][0], by_json.json()["predictions"][0]
    assert a["label"] == b["label"] == 7
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-5, atol=1e-7)
