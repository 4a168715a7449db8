"""Encoders: one builder, region features (B, P, D) over a grid covering the image, real pretrained weights."""

import pickle

import pytest
import torch
from PIL import Image

from captioner.encoder import ENCODERS, build_encoder, conv_bn_pairs, fold_batch_norms, load_efficientnet_lite0
from captioner.images import ImagePreset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_unknown_encoder_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="resnet50"):
        build_encoder("vgg16")


def test_the_builder_knows_every_encoder_the_product_names():
    assert {"efficientnet_lite0", "resnet50", "resnet101", "tiny"} <= set(ENCODERS)


def test_tiny_encoder_gives_regions_in_row_major_order():
    torch.manual_seed(0)
    encoder = build_encoder("tiny").eval()
    images = torch.randn(3, 3, encoder.image_size, encoder.image_size)
    h, w = encoder.grid
    with torch.no_grad():
        features = encoder(images)  # (B, P, D)
        fmap = encoder.feature_map(images)  # (B, D, h, w)
    assert features.shape == (3, h * w, encoder.dim)
    assert fmap.shape == (3, encoder.dim, h, w)
    for r, c in [(0, 0), (0, w - 1), (h - 1, 0), (2, 5)]:
        torch.testing.assert_close(features[:, r * w + c], fmap[:, :, r, c])


def test_each_image_is_encoded_independently_of_its_batch():
    torch.manual_seed(0)
    encoder = build_encoder("tiny").eval()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        together = encoder(images)
        alone = torch.cat([encoder(images[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_pretrained_resnet_without_a_weights_file_is_a_clear_error(name):
    with pytest.raises(ValueError, match="weights") as caught:
        build_encoder(name)
    assert "download" in str(caught.value)


def test_resnet_without_pretrained_weights_needs_no_file():
    encoder = build_encoder("resnet50", pretrained=False)
    assert (encoder.grid, encoder.dim, encoder.image_size) == ((7, 7), 2048, 224)


@pytest.fixture(scope="module")
def resnet50_weights(tmp_path_factory):
    """A random torchvision resnet50 (eval mode) and its state dict saved as .pth and .safetensors."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = torchvision.models.resnet50(weights=None)
    with torch.no_grad():  # BatchNorm statistics that differ from the defaults, so they must be loaded too
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    net.eval()
    folder = tmp_path_factory.mktemp("resnet50")
    state = net.state_dict()
    torch.save(state, folder / "resnet50.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "resnet50.safetensors")
    return net, folder


def test_resnet50_loads_a_local_weights_file_in_either_format(resnet50_weights):
    net, folder = resnet50_weights
    torch.manual_seed(2)
    images = torch.randn(2, 3, 96, 96)  # fully convolutional: a 3 x 3 grid is enough to compare weights
    features = []
    for name in ("resnet50.pth", "resnet50.safetensors"):
        encoder = build_encoder("resnet50", weights_path=folder / name).eval()
        with torch.no_grad():
            features.append(encoder(images))  # (B, 49, 2048)
    assert features[0].shape == (2, 9, 2048)
    assert torch.equal(features[0], features[1])
    body = torch.nn.Sequential(*list(net.children())[:-2])  # the reference: up to layer4
    body = body.to(memory_format=torch.channels_last)  # the same kernels as the encoder
    with torch.no_grad():
        expected = body(images.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(features[0], expected)


class _Payload:
    """Anything a pickle could smuggle in."""


def test_a_torch_weights_file_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        build_encoder("resnet50", weights_path=path)


def test_efficientnet_lite0_s16_gives_a_finer_grid():
    encoder = build_encoder("efficientnet_lite0_s16", pretrained=False).eval()
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, 224, 224))
    assert encoder.grid == (14, 14)
    assert features.shape == (1, 14 * 14, encoder.dim)


@pytest.fixture(scope="module")
def chelsea():
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.chelsea())  # a cat, shipped with scikit-image


def test_efficientnet_lite0_is_the_real_pretrained_network(chelsea):
    """The ImageNet head ranks a cat class (281-285) first: random or shuffled weights would not."""
    encoder = build_encoder("efficientnet_lite0").eval()
    preset = ImagePreset(encoder.image_size, encoder.mean, encoder.std)
    assert (preset.size, preset.mean, preset.std) == (224, (0.5,) * 3, (0.5,) * 3)
    pixels = preset(chelsea).unsqueeze(0)  # (1, 3, 224, 224)
    classifier = load_efficientnet_lite0().eval()
    with torch.no_grad():
        logits = classifier(pixels)  # (1, 1000)
        features = encoder(pixels)  # (1, 49, 1280)
        expected = classifier.forward_features(pixels).flatten(2).transpose(1, 2)
    assert 281 <= int(logits.argmax()) <= 285
    assert features.shape == (1, 7 * 7, 1280) and encoder.grid == (7, 7)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)  # the encoder is that network, headless


def _randomise_batch_norms(encoder: torch.nn.Module) -> None:
    """Statistics and affine parameters far from the identity, as a trained network has."""
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite0_s16", "resnet50", "resnet101"])
def test_folding_the_batch_norms_into_the_convolutions_keeps_the_features(name):
    torch.manual_seed(0)
    encoder = build_encoder(name, pretrained=False).eval()
    _randomise_batch_norms(encoder)
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        before = encoder(images)  # (2, P, D)
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    assert fold_batch_norms(encoder) == batch_norms > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    with torch.no_grad():
        after = encoder(images)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


class _DefinedOutOfOrder(torch.nn.Module):
    """Layers defined in another order than they run: a BatchNorm follows the convolution defined
    after it, one follows a ReLU, one reads a convolution whose output also feeds a residual, and
    one follows a convolution that runs twice. Only the first two pairs can be folded."""

    def __init__(self):
        super().__init__()
        self.bn_b = torch.nn.BatchNorm2d(8)
        self.conv_b = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a = torch.nn.BatchNorm2d(8)
        self.conv_a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv_residual = torch.nn.Conv2d(8, 8, 1)
        self.bn_residual = torch.nn.BatchNorm2d(8)
        self.bn_after_relu = torch.nn.BatchNorm2d(8)
        self.conv_twice = torch.nn.Conv2d(8, 8, 1)
        self.bn_twice = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x)))))  # (B, 8, H, W)
        y = self.conv_residual(x)
        x = self.bn_residual(y) + y
        x = self.bn_after_relu(torch.relu(x))
        return self.bn_twice(self.conv_twice(x)) + self.conv_twice(x)


def test_batch_norms_are_folded_into_the_convolution_that_runs_before_them_not_the_one_defined_before():
    torch.manual_seed(0)
    model = _DefinedOutOfOrder().eval()
    _randomise_batch_norms(model)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(images)
    assert conv_bn_pairs(model) == [("conv_a", "bn_a"), ("conv_b", "bn_b")]
    assert fold_batch_norms(model) == 2
    assert isinstance(model.bn_a, torch.nn.Identity) and isinstance(model.bn_b, torch.nn.Identity)
    for left in ("bn_residual", "bn_after_relu", "bn_twice"):
        assert type(model.get_submodule(left)) is torch.nn.BatchNorm2d
    with torch.no_grad():
        torch.testing.assert_close(model(images), before, rtol=1e-5, atol=1e-5)


def test_an_encoder_without_batch_norms_folds_none():
    encoder = build_encoder("tiny").eval()
    assert fold_batch_norms(encoder) == 0


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)  # control flow on the data


def test_a_model_fx_cannot_trace_is_refused_loudly_and_left_as_it_was():
    model = _Untraceable().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"_Untraceable.*torch\.fx cannot trace"):
        fold_batch_norms(model)
    assert isinstance(model.bn, torch.nn.BatchNorm2d)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, stem", [("efficientnet_lite0", "net.conv_stem"), ("efficientnet_lite0_s16", "stem")])
def test_inference_on_a_cpu_runs_the_high_resolution_front_image_by_image_with_the_same_features(name, stem):
    """The front's batch sizes are seen by its first convolution: one image per call in inference,
    the whole batch in training (BatchNorm's batch statistics need it); the features agree."""
    torch.manual_seed(0)
    encoder = build_encoder(name, pretrained=False).eval()
    fold_batch_norms(encoder)  # no BatchNorm left, so training mode computes what inference does
    batch_sizes = []
    encoder.get_submodule(stem).register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].size(0)))
    images = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        inferred = encoder(images)
        assert batch_sizes == [1, 1, 1]
        trained = encoder.train()(images)
        assert batch_sizes == [1, 1, 1, 3]
    torch.testing.assert_close(inferred, trained)


@pytest.mark.parametrize("channels, groups, kernel", [(8, 8, 3), (8, 8, 5), (3, 1, 3)], ids=["dw3", "dw5", "dense3"])
@pytest.mark.parametrize("size", [(16, 16), (15, 16), (16, 13)], ids=["even", "odd-height", "odd-width"])
def test_stride_two_same_convolution_computes_timms_outputs_and_gradients_without_a_padded_copy(
    channels, groups, kernel, size, monkeypatch
):
    from timm.layers import Conv2dSame, padding

    from captioner.encoder import StrideTwoSameConv

    torch.manual_seed(0)
    timm_conv = Conv2dSame(channels, 8, kernel, stride=2, groups=groups)
    ours = StrideTwoSameConv(timm_conv)
    padded_copies = []
    real_pad_same = padding.pad_same
    monkeypatch.setattr(
        padding, "pad_same", lambda x, *a, **k: padded_copies.append(x.shape) or real_pad_same(x, *a, **k)
    )
    x = torch.randn(2, channels, *size, requires_grad=True)
    expected = timm_conv(x)  # timm's own path, which pads
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, timm_conv.weight, timm_conv.bias])
    padded_copies.clear()
    out = ours(x)
    grads = torch.autograd.grad(out.square().sum(), [x, ours.weight, ours.bias])
    assert len(padded_copies) == (size[0] % 2 or size[1] % 2)  # a copy only for odd sizes
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    assert ours.weight is timm_conv.weight and dict(ours.state_dict()).keys() == {"weight", "bias"}


def test_efficientnet_encoders_replace_every_stride_two_same_convolution_and_keep_timms_weight_names():
    import timm
    from timm.layers import Conv2dSame

    from captioner.encoder import StrideTwoSameConv

    stock = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    stock.reset_classifier(0)
    encoder = build_encoder("efficientnet_lite0", pretrained=False)
    assert sum(isinstance(m, StrideTwoSameConv) for m in encoder.modules()) == 5  # the stem and 4 stages
    assert not any(type(m) is Conv2dSame for m in encoder.modules())
    assert list(encoder.net.state_dict()) == list(stock.state_dict())  # checkpoints load as before


def test_replacing_the_same_convolutions_draws_nothing_from_the_global_random_generator():
    """A model's decoder is initialised after its encoder: a draw here would change the trained model."""
    import timm

    from captioner.encoder import drop_padding_copies

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    torch.manual_seed(0)
    assert drop_padding_copies(net) == 5
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))
