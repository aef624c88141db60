"""The CIFAR ResNet family: sizes against the paper, options, printing, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import regmodels
from regmodels.resnet import parse_depth


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def option_a_params(
    depth: int, width: int = 1, num_classes: int = 10, in_channels: int = 3
) -> int:
    """Parameter count of a CIFAR ResNet with option A shortcuts, by layer arithmetic."""
    n = (depth - 2) // 6
    c1, c2, c3 = 16 * width, 32 * width, 64 * width
    bn = 2  # a weight and a bias per channel

    def block(c_in: int, c: int) -> int:
        return c_in * c * 9 + c * c * 9 + 2 * bn * c

    stem = in_channels * c1 * 9 + bn * c1
    stages = (
        n * block(c1, c1)
        + block(c1, c2)
        + (n - 1) * block(c2, c2)
        + block(c2, c3)
        + (n - 1) * block(c3, c3)
    )
    return stem + stages + c3 * num_classes + num_classes


# He et al. (2016), Table 6, in millions, with the precision the paper prints them.
PAPER_PARAMS = [("resnet20", 0.27, 2), ("resnet56", 0.85, 2), ("resnet110", 1.7, 1)]


@pytest.mark.parametrize(("name", "millions", "digits"), PAPER_PARAMS)
def test_parameter_counts_match_the_paper(name: str, millions: float, digits: int) -> None:
    params = count_params(regmodels.create_model(name))

    # The exact count of the architecture, derived here layer by layer.
    assert params == option_a_params(parse_depth(name))

    # The paper's figure is that count rounded: ResNet-110's 1,727,962 prints as 1.7M (1.6%
    # above 1.7M exactly), so the two-digit figures are held to 1% and the 1.7M to its rounding.
    assert round(params / 1e6, digits) == millions
    if digits == 2:
        assert abs(params / 1e6 - millions) / millions < 0.01


def test_resnet1202_has_the_papers_19_4_million_parameters() -> None:
    # Built on the meta device: shapes only, no memory and no initialization cost.
    with torch.device("meta"):
        model = regmodels.create_model("resnet1202")
    assert round(count_params(model) / 1e6, 1) == 19.4
    assert len(model.blocks) == 600


def test_projection_shortcuts_add_parameters_only_where_the_shape_changes() -> None:
    a = regmodels.create_model("resnet20", shortcut="A")
    b = regmodels.create_model("resnet20", shortcut="B")

    # Two projections (16->32 and 32->64), each a 1x1 convolution and a batch norm.
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert count_params(b) == count_params(a) + projections
    assert sum(isinstance(u.shortcut, regmodels.PadShortcut) for u in a.blocks) == 2
    assert sum(isinstance(u.shortcut, torch.nn.Identity) for u in b.blocks) == 7
    assert b(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("width", [2, 4])
def test_width_multiplier_widens_every_stage(width: int) -> None:
    model = regmodels.create_model("resnet20", width=width, num_classes=100)

    assert count_params(model) == option_a_params(20, width=width, num_classes=100)
    assert [stage[0].branch.conv1.out_channels for stage in model.stages] == [
        16 * width,
        32 * width,
        64 * width,
    ]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_dataset_sets_input_channels_and_classes() -> None:
    # The digits dataset: one channel, 8x8 images, 10 classes.
    model = regmodels.create_model("resnet8", in_channels=1, num_classes=10)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert count_params(model) == option_a_params(8, in_channels=1)


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    shortcut = regmodels.PadShortcut(in_planes=2, planes=5, stride=2)
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)

    y = shortcut(x)

    assert y.shape == (1, 5, 2, 2)
    assert torch.equal(y[:, :2], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 2:]) == 0
    assert list(shortcut.parameters()) == []


def test_print_shows_every_blocks_survival_probability_and_dropout_rates() -> None:
    model = regmodels.create_model("resnet20", survival_prob=0.5, dropout=0.2, block_dropout=0.1)
    text = str(model)

    for p in model.survival_probs:
        assert f"survival_prob={p:.4f}" in text
    assert text.count("StochasticDepth(") == 9
    assert text.count("Dropout(p=0.1") == 9  # one inside each residual branch
    assert "Dropout(p=0.2" in text  # before the classifier
    assert "dropout=0.2, block_dropout=0.1" in text.splitlines()[1]


ORDER_WITH_DROPOUT = ["conv1", "bn1", "relu", "dropout", "conv2", "bn2"]
ORDER_WITHOUT = ["conv1", "bn1", "relu", "conv2", "bn2"]


@pytest.mark.parametrize(("rate", "order"), [(0.3, ORDER_WITH_DROPOUT), (0.0, ORDER_WITHOUT)])
def test_block_dropout_sits_between_the_two_convolutions(rate: float, order: list[str]) -> None:
    model = regmodels.create_model("resnet8", block_dropout=rate).train()
    branch = model.blocks[0].branch
    calls: list[str] = []
    outputs: dict[str, torch.Tensor] = {}
    for name, module in branch.named_children():

        def record(_module: torch.nn.Module, _args: tuple, out: torch.Tensor, name: str = name):
            calls.append(name)
            outputs[name] = out

        module.register_forward_hook(record)

    torch.manual_seed(0)
    model(torch.randn(4, 3, 8, 8))

    assert calls == order
    if rate > 0:
        # Some activations that ReLU let through are zeroed, the others scaled by 1 / (1 - rate).
        kept = outputs["dropout"] != 0
        assert 0.5 < kept.float().mean() / (outputs["relu"] != 0).float().mean() < 0.9


def plain_resnet_forward(model: regmodels.CifarResNet, x: torch.Tensor) -> torch.Tensor:
    """A plain residual network written out with torch.nn.functional, using model's layers."""
    x = model.stem(x)
    for unit in model.blocks:
        b = unit.branch
        y = F.relu(b.bn1(b.conv1(x)))
        x = F.relu(unit.shortcut(x) + b.bn2(b.conv2(y)))
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return model.fc(x)


@pytest.mark.parametrize("training", [True, False])
def test_survival_prob_one_is_exactly_a_plain_resnet(training: bool) -> None:
    torch.manual_seed(0)
    model = regmodels.create_model("resnet20", survival_prob=1.0).train(training)
    reference = regmodels.create_model("resnet20", survival_prob=1.0).train(training)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 16, 16)

    # No random number is drawn, and the output and its gradients are the plain network's.
    rng = torch.get_rng_state()
    out = model(x)
    assert torch.equal(torch.get_rng_state(), rng)
    expected = plain_resnet_forward(reference, x)
    assert torch.equal(out, expected)

    out.square().sum().backward()
    expected.square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    assert model.survival_probs == [1.0] * 9


def test_channels_last_gives_the_same_outputs_and_keeps_the_format() -> None:
    torch.manual_seed(0)
    model = regmodels.create_model("resnet20", survival_prob=0.5).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)

    model = model.to(memory_format=torch.channels_last)
    formats: list[bool] = []
    for unit in model.blocks:
        unit.register_forward_hook(
            lambda _m, _i, out: formats.append(
                out.is_contiguous(memory_format=torch.channels_last)
            )
        )
    out = model(x.contiguous(memory_format=torch.channels_last))

    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    assert formats == [True] * 9  # the option A shortcut does not fall back to NCHW


@pytest.mark.parametrize("training", [True, False])
def test_bf16_autocast_runs_on_cpu(training: bool) -> None:
    torch.manual_seed(0)
    model = regmodels.create_model("resnet20", survival_prob=0.5).train(training)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = model.eval()(x)
    model.train(training)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = F.cross_entropy(out.float(), torch.arange(8) % 10)
    loss.backward()

    assert out.dtype == torch.bfloat16
    assert math.isfinite(loss.item())
    assert model.fc.weight.grad is not None and model.fc.weight.grad.dtype == torch.float32
    if not training:
        assert torch.allclose(out.float(), reference, atol=0.1, rtol=0.05)


BAD_ARGUMENTS = [
    ({"name": "resnet21"}, "resnet21"),
    ({"name": "resnet2"}, "resnet2"),
    ({"name": "vgg16"}, "vgg16"),
    ({"name": "ResNet20"}, "ResNet20"),
    ({"survival_prob": 0.0}, "survival_prob=0.0"),
    ({"survival_prob": -0.5}, "survival_prob=-0.5"),
    ({"survival_prob": 1.5}, "survival_prob=1.5"),
    ({"survival_prob": float("nan")}, "survival_prob=nan"),
    ({"survival_prob": float("inf")}, "survival_prob=inf"),
    ({"survival_prob": "0.5"}, "survival_prob='0.5'"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"dropout": -0.1}, "dropout=-0.1"),
    ({"dropout": float("nan")}, "dropout=nan"),
    ({"block_dropout": 1.0}, "block_dropout=1.0"),
    ({"block_dropout": float("nan")}, "block_dropout=nan"),
    ({"width": 0}, "width=0"),
    ({"width": 1.5}, "width=1.5"),
    ({"shortcut": "C"}, "shortcut='C'"),
    ({"drop_mode": "row"}, "drop_mode='row'"),
    ({"num_classes": 1}, "num_classes=1"),
    ({"in_channels": 0}, "in_channels=0"),
]


@pytest.mark.parametrize(("kwargs", "named"), BAD_ARGUMENTS)
def test_bad_arguments_raise_an_error_naming_the_value(kwargs: dict, named: str) -> None:
    kwargs = {"name": "resnet8", **kwargs}
    with pytest.raises(ValueError, match="not allowed") as error:
        regmodels.create_model(**kwargs)
    assert named in str(error.value)


@pytest.mark.parametrize("depth", [7, 9, 21, 0, -4])
def test_cifar_resnet_rejects_depths_that_are_not_6n_plus_2(depth: int) -> None:
    with pytest.raises(ValueError, match=f"depth {depth} is not allowed"):
        regmodels.CifarResNet(depth)


@pytest.mark.parametrize(("name", "depth"), [("resnet8", 8), ("resnet110", 110)])
def test_parse_depth(name: str, depth: int) -> None:
    assert parse_depth(name) == depth
