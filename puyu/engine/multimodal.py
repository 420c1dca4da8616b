"""Images in chat prompts: checking and decoding them, and splicing them into the token sequence.

A prompt with images is a list of chat messages whose content is a list of parts: `{"type": "text", "text": ...}`
and `{"type": "image", "image": <PIL image | bytes | path>}`. The literal `<ImageHere>` marks where each image goes;
a message with image parts and no marker gets one per image at the part's place. After the chat template is
rendered, the text is split at the markers, each piece is tokenised, and each image takes `tokens_per_image`
placeholder positions whose embeddings the vision encoder provides (`ImageSpan`).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Callable

import torch

from .sequence import ImageSpan

IMAGE_TOKEN = "<ImageHere>"
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # width x height, checked before the pixels are decoded
MAX_IMAGES_PER_PROMPT = 8
PLACEHOLDER_ID = 0  # the token id image positions carry (their embeddings are replaced)
XCOMPOSER2_META = ("You are 浦语·灵笔 (InternLM-XComposer), a multimodal assistant built by Shanghai AI "
                   "Laboratory. You look at the images you are given and answer questions about them helpfully, "
                   "honestly and harmlessly, in the user's language (English or 中文).")


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_url")


def has_images(prompt: Any) -> bool:
    return isinstance(prompt, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and any(is_image_part(p) for p in m["content"])
        for m in prompt)


def first_image_field(prompt: Any) -> str:
    for i, m in enumerate(prompt if isinstance(prompt, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        for j, p in enumerate(content if isinstance(content, list) else []):
            if is_image_part(p):
                return f"messages[{i}].content[{j}]"
    return "messages"


def decode_image(data: bytes, field: str, max_bytes: int = MAX_IMAGE_BYTES):
    """Bytes -> a fully decoded PIL image; ValueError naming `field` if they are not one, are cut short, or too big."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise ValueError(f"{field}: image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ValueError(f"{field}: not an image (PNG, JPEG, WebP, GIF or BMP expected)") from None
    w, h = image.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{field}: image is {w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS}")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{field}: truncated or corrupt image ({exc})") from None
    return image


def load_image(obj: Any, field: str):
    """A PIL image from a PIL image, encoded bytes or a local file path."""
    from PIL import Image

    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        return decode_image(bytes(obj), field)
    if isinstance(obj, (str, Path)):
        path = Path(obj).expanduser()
        if not path.is_file():
            raise ValueError(f"{field}: {path}: no such image file")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"{field}: {path}: image is over the limit of {MAX_IMAGE_BYTES} bytes")
        return decode_image(path.read_bytes(), f"{field} ({path})")
    raise ValueError(f"{field}: an image must be a PIL image, bytes or a file path, got {type(obj).__name__}")


def split_images(messages: list) -> tuple[list[dict], list[Any]]:
    """Messages with text content (image parts turned into markers where the message has none) and the images in
    prompt order."""
    out: list[dict] = []
    images: list[Any] = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list) or not any(is_image_part(p) for p in content):
            out.append(m)
            continue
        texts = [p.get("text") for p in content if not is_image_part(p)]
        marked = any(isinstance(t, str) and IMAGE_TOKEN in t for t in texts)
        pieces = []
        for j, p in enumerate(content):
            if is_image_part(p):
                if p.get("type") != "image" or "image" not in p:
                    raise ValueError(f"messages[{i}].content[{j}]: an image part needs a decoded 'image'")
                images.append(load_image(p["image"], f"messages[{i}].content[{j}]"))
                if not marked:
                    pieces.append({"type": "text", "text": IMAGE_TOKEN})
            else:
                pieces.append(p)
        out.append({**m, "content": pieces})
    return out, images


def with_default_system(messages: list, meta: str) -> list:
    if any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": meta}] + list(messages)


def splice(text: str, images: list[Any], encode: Callable[[str], list[int]], tokens_per_image: int,
           pixels: Callable[[Any], torch.Tensor]) -> tuple[list[int], list[ImageSpan]]:
    """Token ids of `text` with each `<ImageHere>` replaced by `tokens_per_image` placeholders, and the spans."""
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"messages: {len(pieces) - 1} {IMAGE_TOKEN} markers for {len(images)} images; "
                         f"each image needs exactly one marker")
    if len(images) > MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"messages: {len(images)} images, over the limit of {MAX_IMAGES_PER_PROMPT} per request")
    ids: list[int] = []
    spans: list[ImageSpan] = []
    for k, piece in enumerate(pieces):
        ids.extend(encode(piece) if piece else [])
        if k < len(images):
            px = pixels(images[k])
            digest = hashlib.sha256(px.numpy().tobytes()).hexdigest()
            spans.append(ImageSpan(len(ids), tokens_per_image, digest, pixels=px))
            ids.extend([PLACEHOLDER_ID] * tokens_per_image)
    return ids, spans
