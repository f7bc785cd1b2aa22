"""ViT backbone, SegFormer decoder, Segmentor and weight loading."""

import math

import pytest
import torch
import torch.nn.functional as F

import _standins
from tmt_train.models import (Attention, ModelConfig, SegFormerHead, VisionTransformer, ViTConfig,
                              build_model, load_weights, read_state_dict, resample_pos_embed,
                              vit_config)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, out_indices=(0, 1, 2))


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _standins.install(monkeypatch, data=False)
    yield
    torch.set_num_threads(threads)


def model_cfg(**over):
    vit = dict(TINY, **over.pop("vit", {}))
    over.setdefault("decoder_dropout", 0.0)
    return ModelConfig(vit=vit, num_classes=over.pop("num_classes", 5), decoder_dim=16, **over)


def test_presets_and_config_checks():
    tiny = vit_config("tiny")
    assert (tiny.patch_size, tiny.embed_dim, tiny.depth, tiny.num_heads) == (8, 128, 6, 4)
    assert vit_config("base").embed_dim == 768
    with pytest.raises(ValueError, match="unknown ViT preset"):
        vit_config("huge")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="out_indices"):
        ViTConfig(depth=3, out_indices=(1, 5))
    with pytest.raises(ValueError, match="name a block twice"):
        ViTConfig(depth=3, out_indices=(2, -1))
    with pytest.raises(ValueError, match="tma_blocks"):
        ViTConfig(depth=3, tma_blocks=4)
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({"presett": "tiny"})


def test_timm_parameter_names():
    vit = VisionTransformer(ViTConfig(**TINY, tma_blocks=1))
    names = set(vit.state_dict())
    for name in ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                 "norm.weight", "norm.bias"]:
        assert name in names
    for i in range(3):
        for part in ["norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                     "norm2.bias", "mlp.fc1.weight", "mlp.fc2.bias"]:
            assert f"blocks.{i}.{part}" in names
    # region attention in the last block only, same names
    assert not vit.blocks[1].region_attention and vit.blocks[2].region_attention
    assert set(VisionTransformer(ViTConfig(**TINY)).state_dict()) == names


def test_attention_matches_manual_softmax():
    attn = Attention(16, 4).eval()
    x = torch.randn(2, 7, 16)
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 4, 4).permute(2, 0, 3, 1, 4)
    manual = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    expected = attn.proj(manual.transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(32, 32), (36, 44), (16, 48)])
def test_segmentor_shapes_any_input_size(size):
    model = build_model(model_cfg()).eval()
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()
    feats = model.backbone(F.pad(x, (0, (-size[1]) % 8, 0, (-size[0]) % 8)))
    assert len(feats) == 3 and feats[0].shape == (2, 32, -(-size[0] // 8), -(-size[1] // 8))


def test_no_cls_token_and_bn_decoder():
    model = build_model(model_cfg(vit={"cls_token": False}, decoder_norm="bn")).eval()
    assert model.num_prefix_tokens == 0 and "cls_token" not in model.state_dict()
    assert model(torch.randn(1, 3, 24, 32)).shape == (1, 5, 24, 32)


def test_pos_embed_resample():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, (4, 4), 1) is pe
    # a linear ramp over x stays (nearly) linear when interpolated
    ramp = torch.arange(4.0).repeat(4).view(1, 16, 1).expand(1, 16, 8)
    pe = torch.cat([torch.zeros(1, 1, 8), ramp], dim=1)
    big = resample_pos_embed(pe, (8, 8), 1)
    assert big.shape == (1, 65, 8)
    row = big[0, 1:9, 0]
    assert torch.all(row[1:] >= row[:-1] - 1e-5)   # monotone in x
    assert torch.equal(big[0, 0], pe[0, 0])         # the CLS position is kept


def test_tma_model_equals_vanilla_without_regions_and_with_one_region():
    vanilla = build_model(model_cfg()).eval()
    tma = build_model(model_cfg(tma_blocks=2)).eval()
    report = load_weights(tma, vanilla.state_dict(), strict=True)
    assert report.ok and not report.missing
    x = torch.randn(2, 3, 32, 32)
    ref = vanilla(x)
    torch.testing.assert_close(tma(x), ref, rtol=1e-4, atol=1e-5)
    # one region over all tokens (CLS included) with a zero bias is full attention
    T = 1 + 16
    region = torch.zeros(2, T, dtype=torch.long)
    bias = torch.zeros(2, 2, 1, 1)
    torch.testing.assert_close(tma(x, region, bias), ref, rtol=1e-4, atol=1e-5)
    # and back: TMA weights load into the vanilla model
    assert load_weights(vanilla, tma.state_dict(), strict=True).ok


def test_region_bias_changes_output_and_gets_gradient():
    tma = build_model(model_cfg(tma_blocks=1)).eval()
    x = torch.randn(1, 3, 32, 32)
    region = torch.cat([torch.tensor([[2]]), torch.arange(16).view(1, 16) // 8], dim=1)
    bias = torch.zeros(1, 2, 3, 3, requires_grad=True)
    base = tma(x, region, bias)
    bias2 = torch.zeros(1, 2, 3, 3)
    bias2[:, :, :, 1] = 3.0
    assert not torch.allclose(tma(x, region, bias2), base)
    base.square().mean().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="only blocks"):
        tma.backbone.run_blocks(tma.backbone.embed(x)[0], 0, 3, None, region, bias)
    with pytest.raises(ValueError, match="no region attention blocks"):
        build_model(model_cfg())(x, region, bias)


def test_token_posteriors_are_probabilities_and_leave_state_alone():
    model = build_model(model_cfg(tma_blocks=1, decoder_dropout=0.5)).train()
    state = model.stem(torch.randn(2, 3, 32, 32))
    post = model.token_posteriors(state)
    assert post.shape == (2, 16, 5) and not post.requires_grad
    torch.testing.assert_close(post.sum(-1), torch.ones(2, 16))
    assert model.training and model.decoder.dropout.training
    # deterministic: the probe pass runs with dropout off
    torch.testing.assert_close(model.token_posteriors(state), post)


def test_load_weights_reports_and_formats(tmp_path):
    from safetensors.torch import save_file

    model = build_model(model_cfg())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # DDP prefix + wrapped in "model", saved with torch
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    fresh = build_model(model_cfg())
    report = load_weights(fresh, tmp_path / "ckpt.pt", strict=True)
    assert report.ok and len(report.loaded) == len(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k])
    # safetensors, with an extra and a missing key and a wrong shape
    st = dict(state)
    st["head.weight"] = torch.zeros(3)
    del st["decoder.linear_pred.bias"]
    st["decoder.linear_pred.weight"] = torch.zeros(7, 16, 1, 1)
    save_file({k: v.contiguous() for k, v in st.items()}, str(tmp_path / "w.safetensors"))
    report = load_weights(build_model(model_cfg()), tmp_path / "w.safetensors")
    assert report.unexpected == ["head.weight"]
    assert "decoder.linear_pred.bias" in report.missing
    assert report.mismatched and report.mismatched[0].startswith("decoder.linear_pred.weight")
    text = str(report)
    assert "missing" in text and "unexpected" in text and "shape mismatch" in text
    with pytest.raises(ValueError, match="do not match"):
        load_weights(build_model(model_cfg()), tmp_path / "w.safetensors", strict=True)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.safetensors")


def test_backbone_weights_with_other_grid_are_interpolated(tmp_path):
    from safetensors.torch import save_file

    src = VisionTransformer(ViTConfig(**dict(TINY, img_size=64)))   # 8x8 grid
    save_file({k: v.contiguous() for k, v in src.state_dict().items()},
              str(tmp_path / "vit.safetensors"))
    cfg = model_cfg()
    cfg.pretrained = str(tmp_path / "vit.safetensors")
    model = build_model(cfg, verbose=False)                           # 4x4 grid
    assert model.backbone.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(model.backbone.blocks[0].attn.qkv.weight,
                               src.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.backbone.pos_embed[:, :1], src.pos_embed[:, :1])


def test_backbone_weights_from_a_whole_segmentation_model(tmp_path):
    # model.pretrained may name an exported run (backbone.* + decoder.*): only the backbone
    # is taken, the decoder keeps its own initialisation
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trained = build_model(model_cfg(), verbose=False)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()},
              str(tmp_path / "run.safetensors"))
    cfg = model_cfg()
    cfg.pretrained = str(tmp_path / "run.safetensors")
    torch.manual_seed(1)
    model = build_model(cfg, verbose=False)
    for name, value in trained.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], value), name
    assert not torch.equal(model.decoder.linear_pred.weight, trained.decoder.linear_pred.weight)


def test_decoder_checks():
    head = SegFormerHead([8, 8], num_classes=3, embed_dim=4)
    out = head([torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)])
    assert out.shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        head([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="norm"):
        SegFormerHead([8], num_classes=3, norm="gn")


def test_segmentor_rejects_bad_images():
    model = build_model(model_cfg())
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        model(torch.randn(3, 32, 32))
    with torch.no_grad():
        assert math.isfinite(float(model(torch.randn(1, 3, 8, 8)).sum()))
