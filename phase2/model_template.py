# The model.py of a Phase II zip (written by `./run.sh export`, phase2/model_zip.py).
#
# The organizers load it as `sys.path.append(dir); from model import Model; Model().float()`
# in an environment with torch 1.5, Python 3.6 and no timm, so this file uses plain torch only
# (ops that torch 1.5 has: no `approximate=` GELU, no `antialias=` resize, no autocast) and no
# syntax newer than Python 3.6. Everything it needs lies beside it: model.json (architecture
# and defense settings) and weights.pth (a state dict saved in the pre-1.6 format).
#
# Input: N x 3 x H x W float in [0, 1], channel order as model.json says (the organizers feed
# BGR). Output: N x num_classes log-probabilities (softmax of the temperature-scaled logits, in
# log space: valid logits for any softmax-based loss, and argmax is the prediction).
# Pipeline, the one `./run.sh submit` runs for a single model without TTA:
#   channel flip -> GCM (float32) -> random resize-pad (optional) -> resize to the training
#   size -> normalization -> ConvNeXt -> log_softmax(logits / temperature)

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


class GradientConcealment(nn.Module):
    """x + eps * sin(w * x) in float32 (in float16, w * x overflows and every pixel is NaN).

    `bpda = True` keeps the forward value and passes the gradient straight through (the
    adaptive attack's view); an evaluator finds this layer by its `is_gcm` marker.
    """

    is_gcm = True

    def __init__(self, w, eps):
        super(GradientConcealment, self).__init__()
        self.w = float(w)
        self.eps = float(eps)
        self.bpda = False

    def forward(self, x):
        x = x.float()
        y = x + self.eps * torch.sin(self.w * x)
        if self.bpda:
            return y.detach() + (x - x.detach())
        return y


class RandomResizePad(nn.Module):
    """Resize to a random side in [min_ratio, max_ratio] x size, zero-pad back at a random offset.

    A new box on every call, drawn from torch's global RNG (torch.manual_seed reproduces it):
    the side with randint, then the top and left offsets with one rand each.
    """

    def __init__(self, min_ratio, max_ratio):
        super(RandomResizePad, self).__init__()
        self.min_ratio = float(min_ratio)
        self.max_ratio = float(max_ratio)

    def side_range(self, size):
        lo = max(1, int(round(self.min_ratio * size)))
        hi = max(lo, min(size, int(round(self.max_ratio * size))))
        return lo, hi

    def draw_box(self, height, width):
        lo, hi = self.side_range(height)
        lo_w, hi_w = self.side_range(width)
        h = int(torch.randint(lo, hi + 1, ()).item())
        w = min(max(int(round(h * width / float(height))), lo_w), hi_w)
        # float32 products, as `./run.sh export`'s in-process copy of this layer draws them
        top = min(max(int(torch.floor(torch.rand(()) * (height - h + 1)).item()), 0), height - h)
        left = min(max(int(torch.floor(torch.rand(()) * (width - w + 1)).item()), 0), width - w)
        return top, left, h, w

    def forward(self, x):
        height, width = int(x.shape[-2]), int(x.shape[-1])
        top, left, h, w = self.draw_box(height, width)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return F.pad(x, (left, width - w - left, top, height - h - top), value=0.0)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an N x C x H x W tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GELU(nn.Module):
    """GELU, exact (erf) or the tanh approximation (written out: torch 1.5 has no `approximate=`)."""

    def __init__(self, tanh):
        super(GELU, self).__init__()
        self.tanh = bool(tanh)

    def forward(self, x):
        if self.tanh:
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))
        return F.gelu(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, conv, tanh):
        super(Mlp, self).__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1) if conv else nn.Linear(dim, hidden)
        self.act = GELU(tanh)
        self.fc2 = nn.Conv2d(hidden, dim, 1) if conv else nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """ConvNeXt block: depthwise conv, LayerNorm, MLP, layer scale, residual."""

    def __init__(self, dim, spec):
        super(Block, self).__init__()
        k = spec["kernel_size"]
        self.conv_mlp = spec["conv_mlp"]
        self.conv_dw = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        eps = spec["norm_eps"]
        self.norm = LayerNorm2d(dim, eps=eps) if self.conv_mlp else nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(spec["mlp_ratio"] * dim), self.conv_mlp, spec["gelu_tanh"])
        self.gamma = nn.Parameter(torch.ones(dim)) if spec["layer_scale"] else None

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x * self.gamma.reshape(1, -1, 1, 1)
        return x + shortcut


class Stage(nn.Module):
    def __init__(self, index, spec):
        super(Stage, self).__init__()
        dims, eps = spec["dims"], spec["norm_eps"]
        if index > 0:
            self.downsample = nn.Sequential(
                LayerNorm2d(dims[index - 1], eps=eps), nn.Conv2d(dims[index - 1], dims[index], 2, stride=2)
            )
        else:
            self.downsample = nn.Sequential()
        self.blocks = nn.Sequential(*[Block(dims[index], spec) for _ in range(spec["depths"][index])])

    def forward(self, x):
        return self.blocks(self.downsample(x))


def create_stem(spec):
    """The stems of timm's ConvNeXt: patch (4x4, stride 4), overlap and overlap_tiered (two 3x3, stride 2)."""
    dim, eps = spec["dims"][0], spec["norm_eps"]
    if spec["stem"] == "patch":
        return nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), LayerNorm2d(dim, eps=eps))
    mid = spec["stem_mid"]
    return nn.Sequential(
        nn.Conv2d(3, mid, 3, stride=2, padding=1),
        nn.Conv2d(mid, dim, 3, stride=2, padding=1),
        LayerNorm2d(dim, eps=eps),
    )


class Head(nn.Module):
    """Global average pool -> LayerNorm -> linear classifier."""

    def __init__(self, spec):
        super(Head, self).__init__()
        dim = spec["dims"][-1]
        self.norm = LayerNorm2d(dim, eps=spec["norm_eps"])
        self.fc = nn.Linear(dim, spec["num_classes"])

    def forward(self, x):
        x = self.norm(x.mean((2, 3), keepdim=True))
        return self.fc(x.flatten(1))


class ConvNeXt(nn.Module):
    def __init__(self, spec):
        super(ConvNeXt, self).__init__()
        self.stem = create_stem(spec)
        self.stages = nn.Sequential(*[Stage(i, spec) for i in range(4)])
        self.head = Head(spec)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class Model(nn.Module):
    """The Phase II model: no arguments, everything it needs is read from beside this file."""

    # a temperature below 1 saturates the softmax and masks the gradient; the adaptive attacker's
    # stand-in (BPDA, switched by the project's evaluate) is the temperature 1
    has_bpda = True

    def __init__(self):
        super(Model, self).__init__()
        with open(os.path.join(HERE, "model.json")) as fh:
            spec = json.load(fh)
        self.spec = spec
        self.bgr = spec["channel_order"] == "bgr"
        self.gcm = GradientConcealment(spec["gcm_w"], spec["gcm_eps"]) if spec["gcm"] else None
        self.random_pad = RandomResizePad(spec["pad_min_ratio"], spec["pad_max_ratio"]) if spec["random_pad"] else None
        self.image_size = int(spec["image_size"])
        self.temperature = float(spec["temperature"])
        self.bpda = False
        self.normalize = spec["mean"] is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float32).reshape(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float32).reshape(1, 3, 1, 1))
        self.net = ConvNeXt(spec)
        state = torch.load(os.path.join(HERE, "weights.pth"), map_location="cpu")
        self.net.load_state_dict(state)
        self.eval()

    def forward(self, x):
        if self.bgr:
            x = torch.flip(x, [1])
        if self.gcm is not None:
            x = self.gcm(x)
        if self.random_pad is not None:
            x = self.random_pad(x)
        if x.shape[-2] != self.image_size or x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if self.normalize:
            x = (x - self.mean) / self.std
        logits = self.net(x).float()
        if self.bpda and self.temperature != 1.0:
            stand_in = F.log_softmax(logits, dim=1)
            return F.log_softmax(logits.detach() / self.temperature, dim=1) + (stand_in - stand_in.detach())
        return F.log_softmax(logits / self.temperature, dim=1)
