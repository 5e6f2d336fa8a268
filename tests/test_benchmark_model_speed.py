"""benchmarks/model_speed.py's plain-math attention swap (the baseline its SDPA figure is compared with):
the same outputs as SDPA on a tiny iTPN with a random position bias, and the SDPA path restored afterwards."""
import timm
import torch

import itpn_ds.models  # noqa: F401  (registers the iTPN names)
from benchmarks.model_speed import plain_math_attention, plain_math_sdpa
from itpn_ds.models import layers


def test_plain_math_attention_gives_the_sdpa_outputs_and_is_undone():
    torch.manual_seed(0)
    model = timm.create_model("itpn_base_3324_patch16_224", img_size=64, embed_dim=64, mlp_depth1=1, mlp_depth2=1,
                              depth=3, num_heads=2, num_classes=5).eval()
    for m in model.modules():
        if isinstance(m, layers.Attention) and m.relative_position_bias_table is not None:
            torch.nn.init.normal_(m.relative_position_bias_table)  # a bias that matters
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(images)
        with plain_math_attention():
            assert layers.Attention.sdpa is plain_math_sdpa
            got = model(images)
    assert layers.Attention.sdpa is not plain_math_sdpa
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
