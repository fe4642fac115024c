"""Benchmark: image classifiers (pretrained EfficientNet-Lite0 vs from scratch vs scikit-learn)
and image+text fusion (late, cross-attention) vs each encoder alone.

Real images only, no download at run time:

- ``digits``: scikit-learn's bundled 1,797 8x8 handwritten digits, written as PNG files in a
  folder per class;
- ``glyphs``: CJK characters rendered with Pillow from every face of the Debian font packages
  on this machine (``fonts-noto-cjk``: Sans/Serif, Regular/Bold, SC/TC/JP/KR/HK faces;
  ``fonts-wqy-microhei``, ``fonts-wqy-zenhei``), a few jittered renders (size, offset,
  rotation) per face: a character-recognition set with many fonts per class;
- ``fusion``: 20 of those characters, each image degraded (downsampled to 10 px, noise, a
  random occluding block), paired with a short note that names the character's *group*
  (5 groups of 4 characters) and is wrong 30% of the time. The image alone is hard, the
  text alone can at best narrow a record to its group, so both modalities carry signal.

Each dataset goes through ``homeforge prepare --kind image-classification`` (decode check,
pHash near-dedup, split by content hash: val 15%, test 15%), so every model below sees the
same split. Models: ``homeforge train method=image-classify`` with the ImageNet Lite0 weights
(``vision.weights=efficientnet-lite0``), the same Lite0 layout from scratch, and
scikit-learn's SVC (RBF, C=10) on the grey pixels of the same shards; fusion runs use
``vision.fusion=image|text|late|cross`` with the frozen MiniLM encoder. Figures on the test
split (``homeforge.vision.evaluate``). Image runs have a wall-clock budget (``--minutes``, default 2);
fusion runs a fixed number of steps (``--fusion-steps``, default 200), so that the four fusion
variants see the same number of batches whatever the machine's load. Every run uses one thread.

    python benchmarks/vision.py --work DIR                 # ~25 minutes on a shared 2-core machine
    python benchmarks/vision.py --work DIR --fusion-only   # the fusion rows again, on the same data
    python benchmarks/vision.py --minutes 0.3 --fusion-steps 10   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHARS = "永和风水山火木金土日月人口心手目耳天地雨雪花草鸟鱼马牛羊车门书学生国家年中大小上下"
GROUPS = ["river", "mountain", "market", "temple", "harbor"]
FONT_DIRS = ["/usr/share/fonts/opentype/noto", "/usr/share/fonts/truetype/wqy"]


def sh(*args, **env) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], check=True,
                   env={**os.environ, **{k: str(v) for k, v in env.items()}}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def font_faces() -> list:
    from PIL import ImageFont

    faces = []
    for d in FONT_DIRS:
        for f in sorted(Path(d).glob("*CJK*.tt[cf]")) + sorted(Path(d).glob("wqy*.tt[cf]")):
            for i in range(16):
                try:
                    ImageFont.truetype(str(f), 48, index=i)
                except OSError:
                    break
                faces.append((str(f), i))
    return faces


def render(ch: str, face, rng: random.Random, canvas: int = 64):
    from PIL import Image, ImageDraw, ImageFont

    size = rng.randint(40, 52)
    font = ImageFont.truetype(face[0], size, index=face[1])
    im = Image.new("L", (canvas, canvas), 255)
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = d.textbbox((0, 0), ch, font=font)
    ox, oy = rng.randint(-4, 4), rng.randint(-4, 4)
    d.text(((canvas - (x1 - x0)) / 2 - x0 + ox, (canvas - (y1 - y0)) / 2 - y0 + oy), ch, font=font, fill=0)
    return im.rotate(rng.uniform(-8, 8), fillcolor=255, resample=Image.Resampling.BILINEAR)


def make_glyphs(root: Path, faces, chars: str, per_face: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for c, ch in enumerate(chars):
        d = root / f"{c:02d}_{ch}"
        d.mkdir(parents=True, exist_ok=True)
        for f, face in enumerate(faces):
            for r in range(per_face):
                render(ch, face, rng).convert("RGB").save(d / f"{f:02d}_{r}.png")


def make_fusion(root: Path, faces, chars: str, per_face: int, seed: int = 1) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    rows = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for c, ch in enumerate(chars):
        group = c % len(GROUPS)
        for f, face in enumerate(faces):
            for r in range(per_face):
                im = render(ch, face, rng).resize((10, 10), Image.Resampling.BILINEAR).resize((32, 32))
                a = np.asarray(im, dtype=np.float32) + nrng.normal(0, 60, (32, 32))
                y, x = nrng.integers(0, 20, 2)
                a[y:y + 12, x:x + 12] = nrng.uniform(0, 255)
                name = f"img/{c:02d}_{f:02d}_{r}.png"
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB").save(root / name)
                g = group if rng.random() >= 0.3 else rng.randrange(len(GROUPS))
                note = rng.choice(["filed under {g}", "note: {g} ledger", "from the {g} batch", "{g} records, page {p}"])
                rows.append({"image": name, "label": f"{c:02d}_{ch}", "text": note.format(g=GROUPS[g], p=rng.randint(1, 99))})
    path = root / "records.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "text"])
        w.writeheader()
        w.writerows(rows)
    return path


def sklearn_baseline(ds: Path) -> dict:
    from sklearn.svm import SVC

    from homeforge.vision.task import open_image_dataset

    _, _, sp = open_image_dataset(ds)

    def feats(s):
        return s.images.mean(axis=3).reshape(len(s.images), -1) / 255.0

    t = time.perf_counter()
    clf = SVC(C=10, gamma="scale").fit(feats(sp["train"]), sp["train"].labels)
    pred = clf.predict(feats(sp["test"]))
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(sp["test"].labels, pred)),
            "macro_f1": float(f1_score(sp["test"].labels, pred, average="macro")), "train_s": time.perf_counter() - t}


def train_eval(ds: Path, out: Path, minutes: float, *opts, steps: int = 100_000) -> dict:
    from homeforge.vision.evaluate import evaluate

    t = sh("train", "method=image-classify", f"data={ds}", f"output_dir={out}", f"max_minutes={minutes}",
           f"max_steps={steps}", "--force",
           "micro_batch_size=32", "eval_every=100000", "log_every=20", "checkpoint.every=0",
           "checkpoint.best=false", "tracking.tensorboard=false", "schedule.warmup_steps=10", "threads=1", *opts,
           OMP_NUM_THREADS=1)
    r = evaluate(out / "model", ds, "test")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "ece": r["calibration"]["ece"],
            "aug_accuracy": r["robustness"]["augmented_accuracy"], "train_s": t, "steps": last["step"]}


def onnx_rows(work: Path) -> list[dict]:
    """The digits and glyphs ImageNet-start models through `homeforge export --format onnx --int8`: test accuracy
    of PyTorch, ONNX fp32 and ONNX int8, sizes, and batch-1 latency (median of 200 alternating calls, one thread)."""
    import onnxruntime as ort
    import torch

    from homeforge.vision.evaluate import onnx_accuracy, predict
    from homeforge.vision.task import load_model, open_image_dataset, to_pixels

    torch.set_num_threads(1)
    rows = []
    for name in ("digits", "glyphs"):
        model_dir, out = work / f"run-{name}-pre" / "model", work / f"onnx-{name}"
        sh("export", model_dir, "--format", "onnx", "--int8", "-o", out, "--force", OMP_NUM_THREADS=1)
        model, meta, _ = load_model(model_dir)
        _, _, sp = open_image_dataset(work / f"ds-{name}")
        x, y = to_pixels(sp["test"].images, meta["image_size"]), sp["test"].labels
        row = {"data": name, "torch": float((predict(model, x).argmax(1) == y).mean()),
               "onnx": onnx_accuracy(out / "model.onnx", x, y), "int8": onnx_accuracy(out / "model.int8.onnx", x, y),
               "onnx_mb": (out / "model.onnx").stat().st_size / 1e6,
               "int8_mb": (out / "model.int8.onnx").stat().st_size / 1e6}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = {k: ort.InferenceSession(str(out / f), opts, providers=["CPUExecutionProvider"])
                for k, f in (("onnx", "model.onnx"), ("int8", "model.int8.onnx"))}
        one = x[:1]
        times: dict[str, list[float]] = {"torch": [], "onnx": [], "int8": []}
        with torch.inference_mode():
            for _ in range(200):
                for k in times:
                    t = time.perf_counter()
                    if k == "torch":
                        model(one)
                    else:
                        sess[k].run(["logits"], {"pixel_values": one.numpy()})
                    times[k].append(time.perf_counter() - t)
        row.update({f"{k}_ms": 1000 * float(np.median(v)) for k, v in times.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=2.0, help="training budget per image run")
    ap.add_argument("--rebuild", action="store_true", help="render and prepare the data again in --work")
    ap.add_argument("--fusion-steps", type=int, default=200, help="optimizer steps per fusion run (the same for all "
                    "four, so the comparison does not depend on the machine's load)")
    ap.add_argument("--fusion-only", action="store_true", help="only the fusion rows (data already in --work)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--onnx-only", action="store_true", help="only the ONNX rows, on the models already in --work")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="hf-vision-"))
    if a.onnx_only:
        onnx_rows(work)
        return
    faces = font_faces()
    if not faces:
        sys.exit("no CJK fonts: apt-get install fonts-noto-cjk fonts-wqy-microhei fonts-wqy-zenhei")
    results: dict = {"faces": len(faces), "rows": []}
    from PIL import Image
    from sklearn.datasets import load_digits

    if a.rebuild or not (work / "fusion" / "records.csv").is_file():  # rendering is seeded: the same files
        dg = load_digits()
        for i, (x, y) in enumerate(zip(dg.images, dg.target, strict=True)):
            (work / "digits" / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((x * 255 / 16).astype(np.uint8)).convert("RGB").save(work / "digits" / str(y) / f"{i:04d}.png")
        make_glyphs(work / "glyphs", faces, CHARS, per_face=2)
        make_fusion(work / "fusion", faces, CHARS[:20], per_face=3)
    fusion_csv = work / "fusion" / "records.csv"
    split = ["split.val=0.15", "split.test=0.15"]
    for name, src, extra in (("digits", work / "digits", ["image.size=32"]),
                             ("glyphs", work / "glyphs", ["image.size=32"]),
                             ("fusion", fusion_csv, ["image.size=32"])):
        sh("prepare", src, "--kind", "image-classification", "-o", work / f"ds-{name}", *split, *extra)
        rep = json.loads((work / f"ds-{name}" / "report.json").read_text())
        results[f"{name}_records"] = rep["records"]
    for name in () if a.fusion_only else ("digits", "glyphs"):
        ds = work / f"ds-{name}"
        results["rows"].append({"data": name, "model": "scikit-learn SVC (RBF) on pixels", **sklearn_baseline(ds)})
        results["rows"].append({"data": name, "model": "EfficientNet-Lite0, ImageNet weights", **train_eval(
            ds, work / f"run-{name}-pre", a.minutes, "optim.lr=1e-3")})
        results["rows"].append({"data": name, "model": "EfficientNet-Lite0, from scratch", **train_eval(
            ds, work / f"run-{name}-scratch", a.minutes, "vision.weights=null", "optim.lr=3e-3")})
        print(json.dumps(results["rows"][-3:], indent=1), flush=True)
    ds = work / "ds-fusion"
    for fusion in ("image", "text", "late", "cross"):
        results["rows"].append({"data": "fusion", "model": f"fusion={fusion}", **train_eval(
            ds, work / f"run-fusion-{fusion}", 30, f"vision.fusion={fusion}",
            "vision.randaugment=false", "optim.lr=1e-3", steps=a.fusion_steps)})
        print(json.dumps(results["rows"][-1]), flush=True)
    results["onnx"] = [] if a.fusion_only else onnx_rows(work)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nfaces: {len(faces)}; work: {work}")
    print("| data | model | test accuracy | macro-F1 | ECE | acc. under aug. | steps | train s |")
    print("|---|---|---|---|---|---|---:|---:|")
    for r in results["rows"]:
        print(f"| {r['data']} | {r['model']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r.get('ece', float('nan')):.3f} "
              f"| {r.get('aug_accuracy', float('nan')):.3f} | {r.get('steps', '-')} | {r['train_s']:.0f} |")


if __name__ == "__main__":
    main()
