"""Attention backends (SDPA, FlexAttention) against the plain-math reference; selecting them by config."""
import pytest
import torch

from itpn_ds import config as run_config
from itpn_ds.config import ConfigError, load_config
from itpn_ds.engine.model import build_model
from itpn_ds.models import layers
from itpn_ds.models.layers import Attention, attention_math, relative_position_index, set_attention_backend
from tests.test_models import tiny_models

HEADS, BATCH, HEAD_DIM = 3, 2, 5
CUDA = torch.cuda.is_available()


def attention(grid: int, with_bias: bool, backend: str, device: str = "cpu") -> Attention:
    torch.manual_seed(0)
    attn = Attention(dim=HEADS * HEAD_DIM, num_heads=HEADS, rpe_grid=grid if with_bias else None).to(device)
    if with_bias:
        torch.nn.init.normal_(attn.relative_position_bias_table)
    attn.backend = backend
    return attn


def reference(attn: Attention, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The module's output with plain-math attention in place of its backend."""
    B, N, C = x.shape
    q, k, v = attn.qkv_heads(x)
    return attn.proj(attention_math(q, k, v, attn.position_bias(index, N)).transpose(1, 2).reshape(B, N, C))


def per_sample_index(grid: int) -> torch.Tensor:
    """(BATCH, N²): sample 0 the true index, sample 1 the keys' order reversed (a different bias per sample)."""
    index = relative_position_index(grid)
    return torch.stack([index, index.flip(-1)]).view(BATCH, -1)


@pytest.mark.parametrize("backend", layers.ATTENTION_BACKENDS)
@pytest.mark.parametrize("grid,with_bias,batched_index", [(3, True, False), (5, True, False), (5, False, False),
                                                          (3, True, True)])
def test_backend_output_equals_plain_math(backend, grid, with_bias, batched_index):
    attn = attention(grid, with_bias, backend).eval()
    index = per_sample_index(grid) if batched_index else relative_position_index(grid).view(-1)
    x = torch.randn(BATCH, grid * grid, HEADS * HEAD_DIM)
    with torch.no_grad():  # FlexAttention has no CPU backward
        torch.testing.assert_close(attn(x, index), reference(attn, x, index), atol=2e-6, rtol=1e-5)


def assert_gradients_equal_plain_math(attn: Attention, grid: int, device: str) -> None:
    index = relative_position_index(grid).view(-1).to(device)
    x = torch.randn(BATCH, grid * grid, HEADS * HEAD_DIM, device=device, requires_grad=True)
    weights = torch.randn(BATCH, grid * grid, HEADS * HEAD_DIM, device=device)  # a loss that weighs every output
    inputs = [x, *attn.parameters()]
    got = torch.autograd.grad((attn(x, index) * weights).sum(), inputs)
    expected = torch.autograd.grad((reference(attn, x, index) * weights).sum(), inputs)
    names = ["x", *(name for name, _ in attn.named_parameters())]
    assert "relative_position_bias_table" in names
    for name, g, e in zip(names, got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("grid", [3, 5])
def test_sdpa_gradients_equal_plain_math_bias_table_included(grid):
    assert_gradients_equal_plain_math(attention(grid, True, "sdpa").train(), grid, "cpu")


@pytest.mark.skipif(not CUDA, reason="FlexAttention's backward runs on CUDA only (torch 2.14 has none on the CPU)")
@pytest.mark.parametrize("grid", [3, 5])
def test_flex_gradients_equal_plain_math_bias_table_included_cuda(grid):
    assert_gradients_equal_plain_math(attention(grid, True, "flex", "cuda").train(), grid, "cuda")


def test_flex_score_mod_adds_the_dense_bias_and_its_gradient():
    """The score_mod, evaluated on every (b, h, q, k) at once, is the SDPA path's dense bias, value and
    table gradient (the CPU check of what FlexAttention differentiates on CUDA)."""
    grid = 3
    attn = attention(grid, True, "flex")
    index = per_sample_index(grid)
    n = grid * grid
    b, h, q, k = torch.meshgrid(torch.arange(BATCH), torch.arange(HEADS), torch.arange(n), torch.arange(n),
                                indexing="ij")
    added = attn.position_score_mod(index, BATCH)(torch.zeros(BATCH, HEADS, n, n), b, h, q, k)
    dense = attn.position_bias(index, n)
    torch.testing.assert_close(added, dense, atol=0, rtol=0)
    weights = torch.randn(BATCH, HEADS, n, n)
    table = attn.relative_position_bias_table
    got, = torch.autograd.grad((added * weights).sum(), table)
    expected, = torch.autograd.grad((dense * weights).sum(), table)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert attention(grid, False, "flex").position_score_mod(index, BATCH) is None


def test_flex_refuses_cpu_backward_and_names_the_fix():
    attn = attention(3, True, "flex").train()
    with pytest.raises(RuntimeError, match="model.attention=sdpa"):
        attn(torch.randn(BATCH, 9, HEADS * HEAD_DIM), relative_position_index(3).view(-1))


@pytest.mark.parametrize("name", ["itpn", "clip", "pixel", "fast"])
def test_every_model_takes_the_flex_backend_with_the_same_parameters_and_outputs(name):
    model, loss_fn = tiny_models()[name]
    model.eval()
    for m in model.modules():
        if isinstance(m, Attention) and m.relative_position_bias_table is not None:
            torch.nn.init.normal_(m.relative_position_bias_table)  # zeros at init would hide a lost bias
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = loss_fn(model, x)
        set_attention_backend(model, "flex")
        torch.manual_seed(1)
        got = loss_fn(model, x)
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and all(m.backend == "flex" for m in attentions)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_attention_config_key_is_validated_and_reaches_the_model():
    assert run_config.ATTENTION_BACKENDS == layers.ATTENTION_BACKENDS
    with pytest.raises(ConfigError, match="model.attention must be one of sdpa, flex"):
        load_config("tiny_pretrain_cpu", ["model.attention=fused"])
    cfg = load_config("tiny_pretrain_cpu", ["model.attention=flex"])
    model = build_model(cfg)
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"flex"}
    cfg = load_config("tiny_pretrain_cpu", ["model.attention=flex", "model.kwargs.attn_drop_rate=0.1"])
    with pytest.raises(ConfigError, match="model.attention=flex: .*no attention dropout"):
        build_model(cfg)
    with pytest.raises(ValueError, match="one of sdpa, flex"):
        set_attention_backend(model, "math")
