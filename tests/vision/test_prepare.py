"""prepare --kind image-classification on real image files: decode check, EXIF/GPS stripping, near-dedup."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from homeforge.errors import HomeforgeError


def test_report_names_corrupt_images_and_duplicates(image_dataset):
    rep = json.loads((image_dataset / "report.json").read_text())
    r = rep["records"]
    assert r["in"] == 3 * 12 + 4 and r["dropped"] == {"corrupt_image": 2, "near_duplicate": 1}
    assert r["out"] == r["in"] - 3 == sum(r["splits"].values())
    drops = [json.loads(line) for line in (image_dataset / "drops.jsonl").read_text().splitlines()]
    assert {d["source"] for d in drops if d["reason"] == "corrupt_image"} == {"d1/cut.jpg", "d2/notimage.png"}
    (dup,) = [d for d in drops if d["reason"] == "near_duplicate"]
    assert dup["source"] == "d0/gps_small_copy.png" and dup["kept"] == "d0/gps.jpg"
    assert {e["source"] for e in rep["bad_images"]["named"]} == {"d1/cut.jpg", "d2/notimage.png"}
    md = (image_dataset / "report.md").read_text()
    assert "d1/cut.jpg" in md and "truncated" in md and "thumbnails.png" in md
    assert rep["images"]["width"]["max"] == 160 and rep["images"]["aspect"]["min"] == 1.0
    assert Image.open(image_dataset / "thumbnails.png").size[1] >= 3 * 48


def test_gps_and_exif_are_gone(image_tree, image_dataset):
    assert Image.open(image_tree / "d0" / "gps.jpg").getexif().get(0x8825) is not None  # the source has GPS
    rows = [json.loads(line) for s in ("train", "val", "test")
            for line in (image_dataset / f"{s}.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["source"] == "d0/gps.jpg"]
    raw = (image_dataset / row["image"]).read_bytes()
    out = Image.open(image_dataset / row["image"])
    assert out.format == "JPEG" and len(out.getexif()) == 0 and "exif" not in out.info
    assert b"Exif" not in raw and b"Canon" not in raw
    for r in rows:  # and no other file carries EXIF either
        assert len(Image.open(image_dataset / r["image"]).getexif()) == 0


def test_shards_and_labels(image_dataset):
    labels = json.loads((image_dataset / "labels.json").read_text())
    assert labels == ["d0", "d1", "d2"]
    a = np.load(image_dataset / "train-00000.npy")
    y = np.load(image_dataset / "train.labels.npy")
    assert a.dtype == np.uint8 and a.shape[1:] == (16, 16, 3) and len(a) == len(y) > 20
    assert set(y.tolist()) == {0, 1, 2}
    manifest = json.loads((image_dataset / "homeforge.json").read_text())
    assert manifest["kind"] == "image-classification" and manifest["stage"] == "prepare"


def test_csv_listing_with_text_and_missing_file(image_tree, tmp_path):
    from rich.console import Console

    from homeforge.config import PrepareConfig, load_config
    from homeforge.vision.prepare import run

    listing = tmp_path / "list.csv"
    lines = ["path,cls,note"] + [f"{image_tree}/d{k}/{i}.png,c{k},note {k}" for k in range(3) for i in range(5)]
    listing.write_text("\n".join(lines + ["nowhere.png,c0,x"]) + "\n")
    cfg = load_config(PrepareConfig, overrides=["kind=image-classification", "fields.image=path", "fields.label=cls",
                                                "fields.text=note", "split.val=0.2"])
    res = run(cfg.model_copy(update={"inputs": [str(listing)]}), output=tmp_path / "ds", console=Console(quiet=True))
    assert res["report"]["records"]["dropped"] == {"missing_image": 1}
    row = json.loads((tmp_path / "ds" / "train.jsonl").read_text().splitlines()[0])
    assert row["text"].startswith("note ")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(HomeforgeError, match="fields.image"):
        run(cfg.model_copy(update={"inputs": [str(bad)]}), output=tmp_path / "ds2", console=Console(quiet=True))


def test_phash_sees_resized_copies_as_near():
    from tests.vision.conftest import photos

    from homeforge.vision import images as im

    china, flower = (Image.fromarray(a) for a in photos())
    h = im.phash(china)
    hs = np.asarray([im.phash(china.resize((200, 133))), im.phash(flower)], dtype=np.uint64)
    d = im.hamming_to_all(h, hs)
    assert d[0] <= 4 < 16 < d[1]
