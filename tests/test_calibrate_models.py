"""The models calibrate accepts: torchvision classifiers by name at both granularities, and factories."""

from __future__ import annotations

import pytest

from conftest import require_torch

pytestmark = pytest.mark.torch


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "efficientnet_b0", "squeezenet1_1"])
@pytest.mark.parametrize("granularity", ["block", "leaf"])
def test_classifier_units_export_and_chain(name, granularity):
    """Units chained at every cut give the model's output; block units also after export."""
    torch = require_torch()
    from amp4ec.torchgraph import load_exported, load_model, run_pipeline, trace_model

    model = load_model(name)
    traced = trace_model(model, name, granularity=granularity, input_shape=(1, 3, 64, 64))
    n_units = traced.graph.n_units
    assert n_units > 3
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(image)
    # Exporting every leaf unit takes minutes for efficientnet_b0, so leaf units chain unexported.
    chained = run_pipeline(traced, list(range(n_units + 1)), image, exported=granularity == "block")
    output = chained[0] if isinstance(chained, (tuple, list)) else chained
    assert torch.allclose(output, expected, atol=1e-4, rtol=1e-3)
    assert load_exported(traced.export_segment(0, 1)) is not None


def test_factory_model_with_input_shape():
    require_torch()
    from amp4ec.calibrate.run import parse_input_shape
    from amp4ec.torchgraph import load_model, trace_model

    shape = parse_input_shape("1,3,16,16")
    assert shape == [1, 3, 16, 16]
    traced = trace_model(load_model("tiny_models:make"), "tiny_models:make", granularity="leaf", input_shape=shape)
    assert traced.graph.input_shape == [1, 3, 16, 16]
    assert [u.name for u in traced.graph.units][:1] == ["conv"]


@pytest.mark.parametrize("text", ["", "1,a", "1,0,3", "-1"])
def test_invalid_input_shape_is_a_usage_error(text):
    from amp4ec.calibrate.run import parse_input_shape
    from amp4ec.errors import UsageError

    with pytest.raises(UsageError, match="positive integers"):
        parse_input_shape(text)
