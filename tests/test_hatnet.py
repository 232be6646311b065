"""HAT-Net: H-MHSA against a naive loop implementation, published parameter and FLOP counts, reference names."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cascadevision.errors import CheckpointError
from cascadevision.models.classifier import count_parameters
from cascadevision.io.pretrained import load_hatnet_weights
from cascadevision.models.hatnet import HATNET_CONFIGS, HMHSA, build_hatnet

PUBLISHED_PARAMS_M = {"tiny": 12.66, "small": 25.75, "medium": 42.94, "large": 63.13}  # README: 12.7/25.7/42.9/63.1
PUBLISHED_GFLOPS = {"tiny": 2.0, "small": 4.3, "medium": 8.3, "large": 11.5}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------
# H-MHSA against loops over heads and grids


def naive_group_norm(x, gn):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + gn.eps) * gn.weight[:, None, None] + gn.bias[:, None, None]


def naive_conv1x1(x, conv):
    return torch.einsum("oi,bihw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[:, None, None]


def naive_attention(q, k, v, scale):
    """q (n, d), k and v (m, d): each query's softmax over keys, one query at a time."""
    out = torch.empty(q.shape[0], v.shape[1], dtype=q.dtype)
    for i in range(q.shape[0]):
        logits = (k * q[i]).sum(1) * scale
        weights = torch.exp(logits - logits.max())
        out[i] = (weights[:, None] * v).sum(0) / weights.sum()
    return out


def naive_hmhsa(x, m):
    batch, channels, height, width = x.shape
    heads, hd, grid, r = m.num_heads, m.head_dim, m.grid_size, m.ds_ratio
    scale = hd ** -0.5
    qkv = naive_conv1x1(naive_group_norm(x, m.norm), m.qkv)  # channels: [q | k | v], each [head 0 | head 1 | ...]

    def tokens(t, part, h, rows=slice(None), cols=slice(None)):  # (n tokens, hd)
        block = t[part * channels + h * hd: part * channels + (h + 1) * hd, rows, cols]
        return block.reshape(hd, -1).T

    if grid == 1:
        out = torch.empty_like(x)
        for b in range(batch):
            for h in range(heads):
                o = naive_attention(tokens(qkv[b], 0, h), tokens(qkv[b], 1, h), tokens(qkv[b], 2, h), scale)
                out[b, h * hd:(h + 1) * hd] = o.T.reshape(hd, height, width)
        return naive_conv1x1(out, m.proj)
    local = torch.empty_like(x)
    for b in range(batch):
        for h in range(heads):
            for gr in range(height // grid):
                for gc in range(width // grid):
                    rows, cols = slice(gr * grid, (gr + 1) * grid), slice(gc * grid, (gc + 1) * grid)
                    o = naive_attention(*(tokens(qkv[b], p, h, rows, cols) for p in range(3)), scale)
                    local[b, h * hd:(h + 1) * hd, rows, cols] = o.T.reshape(hd, grid, grid)
    x_grid = naive_group_norm(x + local, m.grid_norm)
    q = naive_conv1x1(x_grid, m.q)
    pooled = x_grid.reshape(batch, channels, height // r, r, width // r, r).mean((3, 5))
    kv = naive_conv1x1(naive_group_norm(pooled, m.ds_norm), m.kv)
    glob = torch.empty_like(x)
    for b in range(batch):
        for h in range(heads):
            o = naive_attention(tokens(q[b], 0, h), tokens(kv[b], 0, h), tokens(kv[b], 1, h), scale)
            glob[b, h * hd:(h + 1) * hd] = o.T.reshape(hd, height, width)
    return naive_conv1x1(glob + x_grid, m.proj)


def randomized(module):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module.eval()


@pytest.mark.parametrize("grid,ratio,size", [(4, 2, (8, 12)), (3, 3, (6, 6)), (1, 1, (5, 7))])
def test_hmhsa_matches_naive_loops(grid, ratio, size):
    m = randomized(HMHSA(dim=12, head_dim=4, grid_size=grid, ds_ratio=ratio).double())
    x = torch.randn(2, 12, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), naive_hmhsa(x, m), atol=1e-10, rtol=1e-10)


def test_hmhsa_needs_maps_divisible_by_the_grid():
    m = HMHSA(dim=8, head_dim=4, grid_size=4, ds_ratio=2)
    with pytest.raises(ValueError, match="6x8 map cannot be cut into 4x4 grids"):
        m(torch.randn(1, 8, 6, 8))


# ----------------------------------------------------------------------------------------------------------
# counts against the published numbers


def attention_macs(cfg, img_size=224):
    """q.k and attn.v of every block: local over G^2 tokens plus global over (H/r)(W/r) pooled ones, or global."""
    total = 0
    for stage, (dim, depth, grid, r) in enumerate(zip(cfg.dims, cfg.depths, cfg.grid_sizes, cfg.ds_ratios)):
        tokens = (img_size // 4 // 2 ** stage) ** 2
        per_block = 2 * tokens * tokens * dim if grid == 1 else 2 * tokens * dim * (grid ** 2 + tokens // r ** 2)
        total += depth * per_block
    return total


def elementwise_ops(model, x):
    """What mmcv's complexity counter adds to conv/linear MACs: conv bias adds, 2 per GroupNorm element
    (affine), 1 per average-pooled input element."""
    counts = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            counts.append(output.numel())
        elif isinstance(module, nn.GroupNorm):
            counts.append(2 * output.numel())
        elif isinstance(module, nn.AvgPool2d):
            counts.append(inputs[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model(x)
    for handle in handles:
        handle.remove()
    return sum(counts)


@pytest.mark.parametrize("name", list(HATNET_CONFIGS))
def test_parameter_and_flop_counts_match_published(name):
    """Parameters match to 0.01M. The published GFLOPs are conv/linear MACs plus mmcv's elementwise terms, without
    the attention matmuls; our counter, which includes those matmuls, gives that much more."""
    with torch.device("meta"):
        model = build_hatnet(name).eval()
        x = torch.empty(1, 3, 224, 224)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        with torch.no_grad():
            extra = elementwise_ops(model, x)
    assert round(count_parameters(model) / 1e6, 2) == PUBLISHED_PARAMS_M[name]
    by_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.bmm"] == attention_macs(model.cfg)
    conv_linear = by_op["aten.convolution"] + by_op["aten.addmm"]
    assert round((conv_linear + extra) / 1e9, 1) == PUBLISHED_GFLOPS[name]


def test_forward_and_reference_names(tmp_path):
    source = build_hatnet("tiny", num_classes=10).eval()
    keys = set(source.state_dict())
    for key in ["patch_embed.0.weight", "patch_embed.1.weight", "patch_embed.3.bias", "blocks.0.0.attn.qkv.weight",
                "blocks.0.1.attn.grid_norm.weight", "blocks.0.0.attn.ds_norm.bias", "blocks.2.5.attn.kv.weight",
                "blocks.0.0.attn.proj_norm.weight", "blocks.1.0.conv.conv1.0.weight", "blocks.1.0.conv.conv1.1.weight",
                "blocks.1.0.conv.conv2.0.weight", "blocks.1.0.conv.conv3.0.weight", "blocks.1.0.conv.conv3.1.bias",
                "ds2.conv.weight", "ds4.norm.bias", "classifier.1.weight"]:
        assert key in keys, key
    assert "blocks.3.0.attn.q.weight" not in keys  # the last stage (G = 1) has no separate global q/kv
    path = tmp_path / "hat_net_tiny.pth"
    torch.save({"model": source.state_dict()}, path)
    model = build_hatnet("tiny", num_classes=10)
    assert load_hatnet_weights(model, path)["reinitialised"] == []
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = model.eval()(x)
        assert logits.shape == (1, 10)
        torch.testing.assert_close(logits, source(x), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="missing .*blocks.2.6.attn"):
        load_hatnet_weights(build_hatnet("tiny", num_classes=10, depths=(2, 2, 7, 3)), path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_hatnet_weights(build_hatnet("small"), path)
