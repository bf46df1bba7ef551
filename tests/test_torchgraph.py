"""Tests of amp4ec.torchgraph: ModelGraph building from torchvision models and segment chaining.

Every partition test compares the chained segments with the unsplit model on the same input.
"""

from __future__ import annotations

import importlib
import os
import random

import pytest


def _import_torch_module(name: str):
    # With AMP4EC_REQUIRE_TORCH=1 a missing torch fails the run instead of skipping it.
    if os.environ.get("AMP4EC_REQUIRE_TORCH") == "1":
        return importlib.import_module(name)
    # exc_type=ImportError also skips a broken install, such as torchvision beside a torch it does not match.
    return pytest.importorskip(name, reason=f"{name} is missing or broken; install amp4ec[torch]", exc_type=ImportError)


torch = _import_torch_module("torch")
_import_torch_module("torchvision")

from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from amp4ec.errors import UsageError  # noqa: E402
from amp4ec.graph import ModelGraph  # noqa: E402
from amp4ec.torchgraph import (  # noqa: E402
    example_inputs,
    load_exported,
    load_model,
    run_pipeline,
    trace_model,
)

pytestmark = pytest.mark.torch

ATOL = 1e-5


@pytest.fixture(scope="module")
def mobilenet():
    return load_model("mobilenet_v2", seed=0)


@pytest.fixture(scope="module")
def mobilenet_block(mobilenet):
    return trace_model(mobilenet, "mobilenet_v2", granularity="block")


@pytest.fixture(scope="module")
def mobilenet_leaf(mobilenet):
    return trace_model(mobilenet, "mobilenet_v2", granularity="leaf")


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _reference(model, x):
    with torch.no_grad():
        return model(x)


def _random_bounds(n_units: int, n_segments: int, rng: random.Random, required: tuple[int, ...] = ()) -> list[int]:
    inner = set(required)
    inner.update(rng.sample(range(1, n_units), n_segments - 1 - len(inner)))
    return [0, *sorted(inner), n_units]


# ----------------------------------------------------------------------------- loading


def test_load_model_unknown_name():
    with pytest.raises(UsageError) as info:
        load_model("mobilenet_v9")
    message = str(info.value)
    assert "'mobilenet_v9'" in message
    assert "mobilenet_v2" in message
    assert "resnet18" in message


def test_load_model_seed_fixes_weights():
    first = load_model("squeezenet1_1", seed=3)
    second = load_model("squeezenet1_1", seed=3)
    other = load_model("squeezenet1_1", seed=4)
    weight = "features.0.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])
    assert not first.training


def test_load_model_factory_spec():
    by_factory = load_model("torchvision.models:squeezenet1_1", seed=3)
    by_name = load_model("squeezenet1_1", seed=3)
    assert torch.equal(by_factory.state_dict()["features.0.weight"], by_name.state_dict()["features.0.weight"])
    assert not by_factory.training


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_such_package_amp4ec:build", "cannot import"),
        ("torchvision.models:no_such_factory", "no attribute"),
        ("math:pi", "not callable"),
        ("builtins:dict", "expected a torch.nn.Module"),
        ("os:system", "failed when called without arguments: TypeError"),
        ("json:loads", "failed when called without arguments: TypeError"),
        ("torchvision.models:", "invalid model spec"),
    ],
)
def test_load_model_bad_factory(spec, expected):
    with pytest.raises(UsageError, match=expected):
        load_model(spec)


# ----------------------------------------------------------------------------- mobilenet_v2 graph


def test_mobilenet_block_units(mobilenet_block):
    graph = mobilenet_block.graph
    assert graph.n_units == 20
    assert [unit.name for unit in graph.units] == [f"features.{i}" for i in range(19)] + ["head"]
    assert graph.granularity == "block"
    assert graph.input_shape == [1, 3, 224, 224]


def test_mobilenet_block_cuts(mobilenet_block):
    graph = mobilenet_block.graph
    assert graph.cut_bytes(0) == 1 * 3 * 224 * 224 * 4
    assert graph.cut_bytes(1) == 1 * 32 * 112 * 112 * 4
    assert graph.cuts[1].tensors[0].shape == [1, 32, 112, 112]
    assert graph.cuts[19].tensors[0].shape == [1, 1280, 7, 7]
    assert graph.cuts[20].tensors[0].shape == [1, 1000]
    assert all(len(cut.tensors) == 1 for cut in graph.cuts)


def test_mobilenet_head_holds_pool_and_classifier(mobilenet_block):
    head_nodes = [node.name for node in mobilenet_block.unit_nodes[-1]]
    assert head_nodes == ["adaptive_avg_pool2d", "flatten", "classifier_0", "classifier_1"]
    head = mobilenet_block.graph.units[-1]
    assert [leaf.type for leaf in head.leaves] == ["Dropout", "Linear"]
    assert head.leaves[1].ralos_cost == 1280 * 1000
    assert head.leaves[1].macs == 1280 * 1000


def test_mobilenet_params_match_model(mobilenet, mobilenet_block):
    graph = mobilenet_block.graph
    leaf_params = sum(leaf.params for unit in graph.units for leaf in unit.leaves)
    assert leaf_params == sum(p.numel() for p in mobilenet.parameters())

    tensor_bytes = sum(t.numel() * t.element_size() for t in [*mobilenet.parameters(), *mobilenet.buffers()])
    assert graph.segment_param_bytes(0, graph.n_units) == tensor_bytes


def test_mobilenet_flops_match_whole_model(mobilenet, mobilenet_block, image):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mobilenet(image)
    whole = counter.get_total_flops()
    total = mobilenet_block.graph.segment_flops(0, mobilenet_block.graph.n_units)
    assert abs(total - whole) <= 0.01 * whole
    assert all(unit.flops > 0 for unit in mobilenet_block.graph.units)


def test_mobilenet_leaf_costs(mobilenet_block):
    first_conv = mobilenet_block.graph.units[0].leaves[0]
    assert first_conv.name == "features.0.0"
    assert first_conv.type == "Conv2d"
    assert first_conv.ralos_cost == 3 * 3 * 3 * 32
    assert first_conv.macs == 3 * 3 * 3 * 32 * 112 * 112

    # Depthwise 3x3 convolution with 32 channels: RALOS ignores groups, MACs do not.
    depthwise = mobilenet_block.graph.units[1].leaves[0]
    assert depthwise.name == "features.1.conv.0.0"
    assert depthwise.ralos_cost == 3 * 3 * 32 * 32
    assert depthwise.macs == 3 * 3 * 32 * 112 * 112

    batch_norm = mobilenet_block.graph.units[0].leaves[1]
    assert batch_norm.type == "BatchNorm2d"
    assert batch_norm.ralos_cost == 2 * 32


def test_mobilenet_activation_bytes(mobilenet_block):
    # features.0 is Conv2d, BatchNorm2d and ReLU6, each producing a 32x112x112 float32 tensor.
    assert mobilenet_block.graph.units[0].activation_bytes == 3 * 32 * 112 * 112 * 4


def test_leaf_cut_inside_residual_carries_skip(mobilenet_leaf):
    graph = mobilenet_leaf.graph
    assert any(len(cut.tensors) == 2 for cut in graph.cuts)

    # features.3 is the first InvertedResidual with a residual connection, so the cut
    # before its depthwise convolution also carries the block input (features.2's output).
    cut = graph.cuts[graph.unit_index("features.3.conv.1.0")]
    assert len(cut.tensors) == 2
    assert cut.tensors[0].name == "features_2_conv_3"
    assert cut.tensors[0].shape == [1, 24, 56, 56]
    assert cut.bytes == cut.tensors[0].bytes + cut.tensors[1].bytes


def test_leaf_residual_add_joins_previous_module(mobilenet_leaf):
    unit = mobilenet_leaf.graph.unit_index("features.3.conv.3")
    names = [node.name for node in mobilenet_leaf.unit_nodes[unit]]
    assert names == ["features_3_conv_3", "add"]


def test_graph_json_round_trip(mobilenet_leaf, tmp_path):
    path = tmp_path / "graph.json"
    mobilenet_leaf.graph.save(path)
    loaded = ModelGraph.load(path)
    assert loaded == mobilenet_leaf.graph
    assert loaded.to_json() == mobilenet_leaf.graph.to_json()


# ----------------------------------------------------------------------------- segments


def test_segment_module_signature(mobilenet_leaf):
    graph = mobilenet_leaf.graph
    index = graph.unit_index("features.3.conv.1.0")
    segment = mobilenet_leaf.segment_module(index, index + 3)
    placeholders = [node.name for node in segment.graph.nodes if node.op == "placeholder"]
    assert placeholders == [t.name for t in graph.cuts[index].tensors]

    with torch.no_grad():
        outputs = segment(*example_inputs(graph, index))
    assert isinstance(outputs, tuple)
    assert [list(t.shape) for t in outputs] == [t.shape for t in graph.cuts[index + 3].tensors]


def test_segment_returns_tuple_for_one_tensor(mobilenet_block):
    with torch.no_grad():
        outputs = mobilenet_block.segment_module(19, 20)(*example_inputs(mobilenet_block.graph, 19))
    assert isinstance(outputs, tuple)
    assert len(outputs) == 1
    assert outputs[0].shape == (1, 1000)


def test_segment_shares_parameters(mobilenet, mobilenet_block):
    segment = mobilenet_block.segment_module(0, 2)
    assert segment.get_submodule("features.0.0").weight is mobilenet.features[0][0].weight


@pytest.mark.parametrize(("start", "stop"), [(3, 3), (-1, 2), (0, 21), (5, 2)])
def test_segment_bounds_rejected(mobilenet_block, start, stop):
    with pytest.raises(UsageError, match="invalid segment"):
        mobilenet_block.segment_module(start, stop)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_partitions_match_model(mobilenet, mobilenet_block, image, seed):
    rng = random.Random(seed)
    bounds = _random_bounds(mobilenet_block.graph.n_units, rng.randint(2, 6), rng)
    output = run_pipeline(mobilenet_block, bounds, image)
    assert torch.allclose(output, _reference(mobilenet, image), atol=ATOL), bounds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leaf_partitions_inside_residuals_match_model(mobilenet, mobilenet_leaf, image, seed):
    graph = mobilenet_leaf.graph
    rng = random.Random(seed)
    residual_cuts = [cut.index for cut in graph.cuts if len(cut.tensors) > 1]
    bounds = _random_bounds(graph.n_units, rng.randint(3, 8), rng, required=(rng.choice(residual_cuts),))
    output = run_pipeline(mobilenet_leaf, bounds, image)
    assert torch.allclose(output, _reference(mobilenet, image), atol=ATOL), bounds


@pytest.mark.parametrize("granularity", ["block", "leaf"])
def test_cut_at_every_unit_matches_model(mobilenet, mobilenet_block, mobilenet_leaf, image, granularity):
    traced = mobilenet_block if granularity == "block" else mobilenet_leaf
    bounds = list(range(traced.graph.n_units + 1))
    output = run_pipeline(traced, bounds, image)
    assert torch.allclose(output, _reference(mobilenet, image), atol=ATOL)


def test_exported_partition_matches_model(mobilenet, mobilenet_leaf, image):
    graph = mobilenet_leaf.graph
    inside_residual = graph.unit_index("features.3.conv.1.0")
    assert len(graph.cuts[inside_residual].tensors) == 2
    bounds = [0, inside_residual, graph.unit_index("features.12.conv.0.0"), graph.n_units]

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        values = [image]
        with torch.no_grad():
            for start, stop in zip(bounds, bounds[1:]):
                blob = mobilenet_leaf.export_segment(start, stop)
                assert isinstance(blob, bytes)
                values = list(load_exported(blob)(*values))
                assert [list(v.shape) for v in values] == [t.shape for t in graph.cuts[stop].tensors]
    finally:
        torch.set_num_threads(previous_threads)

    assert torch.allclose(mobilenet_leaf.output_from_cut(values), _reference(mobilenet, image), atol=ATOL)


@pytest.mark.parametrize(
    "bounds",
    [[0], [1, 20], [0, 5, 19], [0, 5, 5, 20], [0, 10, 3, 20], [0, 21]],
)
def test_run_pipeline_bounds_rejected(mobilenet_block, image, bounds):
    with pytest.raises(UsageError, match="invalid bounds"):
        run_pipeline(mobilenet_block, bounds, image)


def test_example_inputs_shapes(mobilenet_leaf):
    graph = mobilenet_leaf.graph
    index = graph.unit_index("features.3.conv.1.0")
    tensors = example_inputs(graph, index, seed=5)
    assert [list(t.shape) for t in tensors] == [t.shape for t in graph.cuts[index].tensors]
    assert all(t.dtype == torch.float32 for t in tensors)
    assert torch.equal(tensors[0], example_inputs(graph, index, seed=5)[0])
    with pytest.raises(UsageError, match="invalid cut index"):
        example_inputs(graph, graph.n_units + 1)


def test_trace_rejects_unknown_granularity(mobilenet):
    with pytest.raises(UsageError, match="'layer'"):
        trace_model(mobilenet, "mobilenet_v2", granularity="layer")


# ----------------------------------------------------------------------------- other models


@pytest.mark.parametrize(
    ("name", "first_units", "n_units"),
    [
        ("resnet18", ["conv1", "bn1", "relu", "maxpool", "layer1.0", "layer1.1"], 13),
        ("squeezenet1_1", ["features.0", "features.1", "features.2", "features.3"], 14),
        ("efficientnet_b0", ["features.0", "features.1", "features.2"], 10),
    ],
)
def test_block_graph_other_models(name, first_units, n_units, image):
    model = load_model(name)
    traced = trace_model(model, name, granularity="block")
    graph = traced.graph
    assert [unit.name for unit in graph.units[: len(first_units)]] == first_units
    assert graph.n_units == n_units
    assert graph.units[-1].name == "head"
    assert sum(leaf.params for unit in graph.units for leaf in unit.leaves) == sum(p.numel() for p in model.parameters())

    rng = random.Random(name)
    for n_segments in (2, 4):
        bounds = _random_bounds(graph.n_units, n_segments, rng)
        output = run_pipeline(traced, bounds, image)
        assert torch.allclose(output, _reference(model, image), atol=ATOL), bounds


def test_resnet18_head_holds_pool_flatten_fc():
    traced = trace_model(load_model("resnet18"), "resnet18")
    assert [node.name for node in traced.unit_nodes[-1]] == ["avgpool", "flatten", "fc"]


def test_resnet18_leaf_shared_relu_calls():
    traced = trace_model(load_model("resnet18"), "resnet18", granularity="leaf")
    names = [unit.name for unit in traced.graph.units]
    assert "layer1.0.relu" in names
    assert "layer1.0.relu@1" in names
    assert len(names) == len(set(names))


class _SkipModel(nn.Module):
    """A model with a parameter read directly, a skip over a Sequential, a reused leaf and two outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.scale = nn.Parameter(torch.full((1, 8, 1, 1), 0.5))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.act(self.conv(x))
        z = self.act(self.body(y)) * self.scale + y
        pooled = z.mean(dim=(2, 3))
        return self.fc(pooled), pooled


@pytest.mark.parametrize("granularity", ["block", "leaf"])
def test_skip_model_partitions(granularity):
    torch.manual_seed(0)
    model = _SkipModel().eval()
    traced = trace_model(model, "skip", input_shape=(2, 3, 16, 16), granularity=granularity)
    graph = traced.graph
    x = torch.randn(2, 3, 16, 16)
    expected = _reference(model, x)

    assert len(graph.cuts[-1].tensors) == 2
    tensor_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert graph.segment_param_bytes(0, graph.n_units) == tensor_bytes

    output = run_pipeline(traced, list(range(graph.n_units + 1)), x)
    assert isinstance(output, tuple)
    assert torch.allclose(output[0], expected[0], atol=ATOL)
    assert torch.allclose(output[1], expected[1], atol=ATOL)


def test_skip_model_block_units():
    model = _SkipModel().eval()
    graph = trace_model(model, "skip", input_shape=(1, 3, 8, 8)).graph
    assert [unit.name for unit in graph.units] == ["conv", "act", "body.0", "body.1", "head"]
    # The cut before the head carries body.1's output and the skip tensor y.
    assert [t.name for t in graph.cuts[4].tensors] == ["act", "body_1"]
