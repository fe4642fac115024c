"""Images: image-classification datasets, EfficientNet-Lite backbones, image+text fusion.

- ``images``: decode check, metadata (EXIF/GPS) stripping, perceptual hash, thumbnails;
- ``prepare``: the ``prepare --kind image-classification`` stage;
- ``nets``: EfficientNet-Lite (local ImageNet weights), the image and image+text classifiers;
- ``augment``: RandAugment, RandomErasing, CutMix and MixUp on uint8/float tensors;
- ``task``: the ``image-classify`` training method's data and model plumbing;
- ``evaluate``: accuracy, macro-F1, confusion, calibration, robustness; int8 and ONNX.
"""
