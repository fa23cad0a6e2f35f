"""The request examples of the OpenAPI schema (one per input form) and the files they point to.

JSON forms carry their example inline; binary forms (a raw image body, multipart image parts,
Triton's binary tensor extension) point at a file the service itself serves under
``/docs/examples/`` (:data:`FILES`), so that ``/docs`` works offline and every example is a
request the service accepts (tests/service/test_docs.py posts each one).
"""

from __future__ import annotations

import base64
import io
import json
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "EXAMPLES_URL",
    "FILES",
    "example_file",
    "multipart_examples",
    "predict_json_examples",
    "raw_image_examples",
    "v2_binary_examples",
    "v2_json_examples",
]

EXAMPLES_URL = "/docs/examples"

FILES: dict[str, str] = {
    # file name -> media type
    "image.png": "image/png",
    "image.jpg": "image/jpeg",
    "image.webp": "image/webp",
    "infer-binary.bin": "application/octet-stream",
}
"""The example files served under :data:`EXAMPLES_URL`."""

_RAW_FILES = {"image/png": "image.png", "image/jpeg": "image.jpg", "image/webp": "image.webp"}
_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


def _pixels() -> np.ndarray:
    """uint8 [3, 32, 32]: a colour gradient, the one example image."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([x * 8, y * 8, (x + y) * 4]).astype(np.uint8)


def _encode(media: str) -> bytes:
    buf = io.BytesIO()
    opts = {"quality": 95} if media != "image/png" else {}
    Image.fromarray(_pixels().transpose(1, 2, 0)).save(buf, format=_FORMATS[media], **opts)
    return buf.getvalue()


def _png_b64() -> str:
    return base64.b64encode(_encode("image/png")).decode()


@cache
def _v2_binary() -> tuple[bytes, int]:
    """A v2 request in Triton's binary extension: the JSON header, then the FP32 tensor's raw
    little-endian bytes; and the header's length (``Inference-Header-Content-Length``)."""
    pixels = (_pixels().astype(np.float32) / 255.0)[None]  # [1, 3, 32, 32] in [0, 1]
    blob = pixels.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "images",
                "shape": list(pixels.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        "parameters": {"preset": "fast"},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + blob, len(head)


@cache
def example_file(name: str) -> tuple[bytes, str]:
    """(content, media type) of the example file ``name`` (KeyError when there is none)."""
    media = FILES[name]
    if name == "infer-binary.bin":
        return _v2_binary()[0], media
    return _encode(media), media


def predict_json_examples() -> dict[str, Any]:
    """``/v1/predict``, ``application/json``: base64 images, settings in the body."""
    return {
        "base64_png": {
            "summary": "one base64 PNG, preset fast",
            "value": {"images": [_png_b64()], "preset": "fast"},
        },
        "settings_in_body": {
            "summary": "one base64 PNG, preset paper with R and Tf overridden",
            "value": {"images": [_png_b64()], "preset": "paper", "R": 2, "Tf": 2},
        },
    }


def multipart_examples() -> dict[str, Any]:
    """``/v1/predict``, ``multipart/form-data``: the text fields inline; the file parts named in
    ``x-images`` (URLs of files this service serves)."""
    url = f"{EXAMPLES_URL}/image.png"
    return {
        "png_part": {
            "summary": "one `images` file part and settings as text fields",
            "description": (
                f"Parts: `images` (a file; one part per image), here the 32x32 PNG at `{url}` "
                "(listed in `x-images`), and any defense field as a text part: "
                f"`curl -F images=@image.png -F preset=paper -F R=2 http://HOST/v1/predict`."
            ),
            "value": {"preset": "paper", "R": "2"},
            "x-images": [url],
        }
    }


def raw_image_examples(media: str) -> dict[str, Any]:
    """``/v1/predict`` with a raw image body of type ``media`` (settings in the query)."""
    name = _RAW_FILES[media]
    return {
        name.split(".")[1]: {
            "summary": f"a 32x32 {_FORMATS[media]} image as the whole body",
            "description": (
                f"`curl --data-binary @{name} -H 'Content-Type: {media}' "
                "'http://HOST/v1/predict?preset=fast'`"
            ),
            "externalValue": f"{EXAMPLES_URL}/{name}",
        }
    }


def v2_json_examples() -> dict[str, Any]:
    """v2 infer, ``application/json``: an FP32 pixel tensor, and BYTES with base64 images."""
    return {
        "fp32_tensor": {
            "summary": "FP32 [1, 3, 32, 32] pixels in [0, 1] (flat, row-major)",
            "value": {
                "id": "example-1",
                "parameters": {"preset": "off"},
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 3, 32, 32],
                        "datatype": "FP32",
                        "data": [0.5] * (3 * 32 * 32),
                    }
                ],
            },
        },
        "bytes_base64": {
            "summary": "BYTES [1]: one base64-encoded PNG",
            "value": {
                "id": "example-2",
                "parameters": {"preset": "fast"},
                "inputs": [
                    {"name": "images", "shape": [1], "datatype": "BYTES", "data": [_png_b64()]}
                ],
                "outputs": [{"name": "probabilities"}, {"name": "label"}],
            },
        },
    }


def v2_binary_examples() -> dict[str, Any]:
    """v2 infer with Triton's binary tensor extension (what tritonclient.http sends)."""
    _, header_len = _v2_binary()
    url = f"{EXAMPLES_URL}/infer-binary.bin"
    return {
        "binary_fp32": {
            "summary": "JSON header, then the FP32 [1, 3, 32, 32] tensor as raw bytes",
            "description": (
                f"Send with `Inference-Header-Content-Length: {header_len}` (the JSON header's "
                f"bytes, also in `x-inference-header-content-length`): `curl --data-binary "
                f"@infer-binary.bin -H 'Inference-Header-Content-Length: {header_len}' "
                "http://HOST/v2/models/MODEL/infer`."
            ),
            "externalValue": url,
            "x-inference-header-content-length": header_len,
        }
    }
