"""Evaluate, compress and export image classifiers.

- ``evaluate``: accuracy, macro-F1, per-class scores and confusion matrix (``evaluate.metrics``),
  calibration (expected calibration error over 15 confidence bins, NLL), and robustness:
  accuracy on the same split under the training augmentations (RandAugment + RandomErasing,
  fixed seed);
- ``export_onnx``: the image classifier as ONNX (input ``pixel_values`` float [B, 3, S, S] in
  [0, 1], output ``logits``), checked against PyTorch on real images (max |diff| of the
  logits and top-1 agreement), and ``int8=True`` adds ONNX Runtime's static int8 quantization
  (QDQ, calibrated on training images), measured the same way.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch

from homeforge.errors import HomeforgeError
from homeforge.vision import augment as aug
from homeforge.vision import task as vt


def predict(model, x: torch.Tensor, texts=None, tok=None, max_len: int = 32, batch: int = 64) -> np.ndarray:
    """Class probabilities [n, k] for float pixels ``x`` (and texts, for image+text models)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            if tok is not None:
                enc = vt.encode_texts(tok, list(texts[i:i + batch]), max_len)
                logits = model(x[i:i + batch], enc["input_ids"], enc["attention_mask"])
            else:
                logits = model(x[i:i + batch])
            out.append(torch.softmax(logits.float(), -1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def calibration(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict:
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    nll = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1)).mean())
    return {"ece": float(ece), "nll": nll, "mean_confidence": float(conf.mean())}


def evaluate(model_dir: str | Path, data_dir: str | Path, split: str = "test", robustness: bool = True,
             seed: int = 0) -> dict:
    from homeforge.evaluate.metrics import classification_metrics

    model, meta, tok = vt.load_model(model_dir)
    _, labels, splits = vt.open_image_dataset(data_dir)
    if split not in splits:
        raise HomeforgeError(f"the dataset has no {split!r} split", where=str(data_dir),
                             fix=f"choose one of: {', '.join(splits)} (or prepare with split.test=0.1)")
    if labels != meta["labels"]:
        raise HomeforgeError("the dataset's labels differ from the model's", where=str(data_dir),
                             fix="evaluate on a dataset prepared with the same classes")
    s = splits[split]
    if tok is None and meta["fusion"] != "none":
        raise HomeforgeError("an image+text model without its tokenizer", where=str(model_dir), fix="re-train")
    x = vt.to_pixels(s.images, meta["image_size"])
    probs = predict(model, x, s.texts, tok, meta["text_max_len"])
    out = classification_metrics(s.labels, probs.argmax(1), len(labels), scores=probs, labels=labels)
    out["calibration"] = calibration(probs, s.labels)
    if robustness:
        g = torch.Generator().manual_seed(seed)
        xa = aug.random_erasing(aug.rand_augment(x, g), g)
        pa = predict(model, xa, s.texts, tok, meta["text_max_len"])
        out["robustness"] = {"augmented_accuracy": float((pa.argmax(1) == s.labels).mean()),
                             "augmentations": "RandAugment(2, 9) + RandomErasing(0.25)"}
    out["split"] = split
    return out


def export_onnx(model_dir: str | Path, out: str | Path, check_images: np.ndarray | None = None,
                int8: bool = False, calib_images: np.ndarray | None = None, check_texts: list[str] | None = None) -> dict:
    """Write ``model.onnx`` (and ``model.int8.onnx``) under ``out``; returns the parity figures.

    Image+text models export with the dynamo exporter (dynamic batch and text length; inputs
    ``pixel_values``, ``input_ids``, ``attention_mask``) and take their tokenizer along."""
    import onnxruntime as ort

    model, meta, tok = vt.load_model(model_dir)
    fused = meta["fusion"] != "none"
    if fused and int8:
        raise HomeforgeError("int8 ONNX covers image-only classifiers", where=str(model_dir),
                             fix="export the image+text model without --int8")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    size = meta["image_size"]
    path = out / "model.onnx"
    x = vt.to_pixels(check_images, size) if check_images is not None else torch.rand(8, 3, size, size)
    if fused:
        texts = list(check_texts or [])[:len(x)] or ["a note"] * len(x)
        texts += ["a note"] * (len(x) - len(texts))
        enc = vt.encode_texts(tok, texts, meta["text_max_len"])
        feeds = {"pixel_values": x, **enc}
        b, t = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=meta["text_max_len"])
        torch.onnx.export(model, (x[:2], enc["input_ids"][:2], enc["attention_mask"][:2]), str(path),
                          input_names=list(feeds), output_names=["logits"], dynamo=True, opset_version=18,
                          dynamic_shapes=({0: b}, {0: b, 1: t}, {0: b, 1: t}))
        vt.copy_text_files(Path(model_dir), out)
    else:
        feeds = {"pixel_values": x}
        torch.onnx.export(model, (torch.rand(2, 3, size, size),), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    with torch.inference_mode():
        ref = model(*feeds.values()).numpy()
    feeds = {k: v.numpy() for k, v in feeds.items()}
    res = {"onnx": str(path), "n_checked": len(x), **_parity(ort, path, feeds, ref)}
    if int8:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        cal = vt.to_pixels(calib_images[:128], size).numpy() if calib_images is not None else x.numpy()

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"pixel_values": cal[i:i + 1]} for i in range(len(cal))])

            def get_next(self):
                return next(self.it, None)

        pre = out / "model.pre.onnx"
        quant_pre_process(str(path), str(pre))
        q = out / "model.int8.onnx"
        quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        pre.unlink()
        res["int8"] = {"onnx": str(q), "bytes": q.stat().st_size, "fp32_bytes": path.stat().st_size,
                       **_parity(ort, q, feeds, ref)}
    return res


def _parity(ort, path: Path, feeds: dict, ref: np.ndarray) -> dict:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}  # an input the graph does not use is not one of its inputs
    got = sess.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]
    return {"max_abs_diff": float(np.abs(got - ref).max()), "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def onnx_accuracy(path: str | Path, x: torch.Tensor, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    preds = []
    for i in range(0, len(x), 64):
        preds.append(sess.run(["logits"], {"pixel_values": x[i:i + 64].numpy()})[0].argmax(1))
    return float((np.concatenate(preds) == y).mean()) if preds else math.nan


def run_eval(model_dir: Path, data: Path, split: str, output: Path | None, force: bool, console,
             min_accuracy: float | None = None) -> dict:
    """``homeforge eval`` on an image classifier: eval.json + eval.md in an artifact directory; a failed
    ``gates.min_accuracy`` raises ``GateError`` (exit code 3) after the report is written."""
    import json

    from homeforge.artifacts import write_artifact

    out = output or model_dir.with_name(model_dir.name + "-eval")
    with write_artifact(out, stage="eval", config={"split": split, "kind": "image-classification"},
                        inputs={"model": model_dir, "data": data}, force=force) as art:
        r = evaluate(model_dir, data, split)
        (art.dir / "eval.json").write_text(json.dumps(r, indent=2), encoding="utf-8")
        (art.dir / "eval.md").write_text(render_markdown(r), encoding="utf-8")
        art.metrics = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "ece": r["calibration"]["ece"],
                       "augmented_accuracy": r["robustness"]["augmented_accuracy"]}
    console.print(f"[green]eval[/] {split}: accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}, "
                  f"ECE {r['calibration']['ece']:.4f}, under augmentation {r['robustness']['augmented_accuracy']:.4f}"
                  f"; report: {out / 'eval.md'}", highlight=False)
    if min_accuracy is not None and r["accuracy"] < min_accuracy:
        from homeforge.evaluate.run import GateError

        raise GateError(f"gate min_accuracy failed: accuracy {r['accuracy']:.4f} < {min_accuracy}",
                         where=str(out / "eval.md"), fix="improve the model, or lower gates.min_accuracy")
    return r


def render_markdown(r: dict) -> str:
    labels = r["labels"]
    lines = [f"# Image classifier evaluation ({r['split']}, n={r['n']})", "",
             f"- accuracy: {r['accuracy']:.4f}", f"- macro-F1: {r['macro_f1']:.4f}",
             f"- calibration: ECE {r['calibration']['ece']:.4f}, NLL {r['calibration']['nll']:.4f}, mean confidence "
             f"{r['calibration']['mean_confidence']:.4f}",
             f"- robustness: accuracy {r['robustness']['augmented_accuracy']:.4f} under "
             f"{r['robustness']['augmentations']}", "", "## Confusion matrix (rows: true, columns: predicted)", "",
             "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in zip(labels, r["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def run_export(model_dir: Path, output: Path | None, int8: bool, force: bool, console) -> dict:
    """``homeforge export --format onnx`` of an image classifier, checked on the training data's images."""
    import json

    from homeforge.artifacts import write_artifact

    model_dir = Path(model_dir)
    out = output or model_dir.with_name(model_dir.name + "-onnx")
    check = calib = texts = None
    data = _train_data(model_dir)
    if data is not None:
        _, _, sp = vt.open_image_dataset(data)
        calib = sp["train"].images
        held = sp["val" if "val" in sp else "train"]
        check, texts = held.images[:64], (held.texts or [])[:64]
    with write_artifact(out, stage="export", config={"format": "onnx", "int8": int8, "kind": "image-classification"},
                        inputs={"model": model_dir}, force=force) as art:
        r = export_onnx(model_dir, art.dir, check, int8=int8, calib_images=calib, check_texts=texts)
        if r["top1_agreement"] < 1.0 or r["max_abs_diff"] > 1e-3:
            raise HomeforgeError(f"the ONNX graph disagrees with PyTorch (max |diff| {r['max_abs_diff']:.2e}, top-1 "
                                 f"agreement {r['top1_agreement']:.3f})", where=str(model_dir),
                                 fix="report this model's layout; the export was not written")
        shutil.copy(model_dir / vt.META, art.dir / vt.META)
        r["checked_on"] = "validation images of the training data" if data is not None else "random pixels"
        r = {k: (v if k not in ("onnx",) else Path(v).name) for k, v in r.items()}
        if "int8" in r:
            r["int8"]["onnx"] = Path(r["int8"]["onnx"]).name
        art.extra["parity"] = r
        (art.dir / "parity.json").write_text(json.dumps(r, indent=2), encoding="utf-8")
    console.print(f"[green]onnx[/] {out}: max |logit diff| {r['max_abs_diff']:.2e}, top-1 agreement "
                  f"{r['top1_agreement']:.3f} on {r['n_checked']} {r['checked_on']}"
                  + (f"; int8: top-1 agreement {r['int8']['top1_agreement']:.3f}" if "int8" in r else ""),
                  highlight=False)
    return r


def _train_data(model_dir: Path) -> Path | None:
    import json

    try:
        m = json.loads((model_dir / "homeforge.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for p in (m.get("input_paths", {}).get("dataset", {}).get("path"), (m.get("config") or {}).get("data")):
        if p and (Path(p) / "labels.json").is_file():
            return Path(p)
    return None
