"""Classify images (base64) and/or texts with a loaded image or image+text model (the server's path)."""

from __future__ import annotations

import torch

from homeforge.vision import images as im
from homeforge.vision import task as vt


class BadRequest(ValueError):
    """The request does not fit the model; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def classify(model, meta: dict, tok, images: list[str] | None, texts: list[str] | None) -> tuple[list[dict], int]:
    """(one {index, label, score, scores} per record, input count) for base64 ``images`` and/or ``texts``."""
    fusion = meta["fusion"]
    needs_image = fusion != "text"
    needs_text = fusion not in ("none", "image")
    if needs_image and not images:
        raise BadRequest("this model classifies images: send `image` (base64-encoded PNG/JPEG/...)", "image")
    if needs_text and not texts:
        raise BadRequest("this model needs the record's text beside its image: send `input`", "input")
    n = len(images) if images else len(texts or [])
    if images and texts and len(images) != len(texts):
        raise BadRequest(f"{len(images)} images but {len(texts)} texts: send one text per image", "input")
    size = meta["image_size"]
    pix = torch.zeros(n, 3, size, size)
    if images:
        import numpy as np

        arrs = []
        for i, b64 in enumerate(images):
            try:
                arrs.append(im.to_array(im.from_base64(b64), size))
            except im.BadImage as exc:
                raise BadRequest(f"image {i} does not decode ({exc})", "image") from None
        pix = vt.to_pixels(np.stack(arrs))
    with torch.inference_mode():
        if needs_text:
            enc = vt.encode_texts(tok, list(texts), meta["text_max_len"])
            logits = model(pix, enc["input_ids"], enc["attention_mask"])
        else:
            logits = model(pix)
        probs = torch.softmax(logits.float(), -1)
    labels = meta["labels"]
    data = []
    for i, p in enumerate(probs):
        k = int(p.argmax())
        data.append({"index": i, "label": labels[k], "score": float(p[k]),
                     "scores": {labels[j]: float(q) for j, q in enumerate(p)}})
    return data, n
