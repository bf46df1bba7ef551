"""Build a ModelGraph from an ``nn.Module`` with torch.fx, and cut it into exportable segments.

The model is traced once with ``torch.fx.symbolic_trace``. Its call nodes are grouped into
units (contiguous runs in the graph's topological order), and each cut records the fx nodes
whose values are live across it. A segment ``[start, stop)`` is a new fx graph whose
placeholders are the tensors of cut ``start`` and whose output is the tuple of the tensors of
cut ``stop``, so chaining the segments of any partition reproduces the whole model.

Unit rules:

- ``"block"``: each top-level child module is a unit, except that an ``nn.Sequential`` child
  is split one level down into its children (``features.0`` ... ``features.18`` in
  MobileNetV2, ``layer1.0`` ... ``layer4.1`` in ResNet-18). The child the forward calls last
  stays whole and becomes the unit ``"head"``. It absorbs the parameter-free top-level
  modules just before it and the top-level functional calls around it, so the head of
  ResNet-18 is avgpool, flatten and fc, and the head of MobileNetV2 is the pooling, flatten
  and classifier.
- ``"leaf"``: every call of a leaf module is a unit. A leaf module called again (ResNet's
  shared ``relu``) gives one unit per call, named ``<module>@<k>`` from the second call on.

A functional call (``add``, ``flatten``, a tensor method) joins the unit of the module whose
forward contains it. At leaf granularity it joins the module call just before it when that
call belongs to the same enclosing module, so a residual ``add`` joins the last
BatchNorm of its block. Functional calls at the top level of the forward join the next
module call's unit, or the last unit when no module call follows. ``get_attr`` nodes belong
to no unit. Each segment that uses one copies it, so a parameter read with ``get_attr`` never
crosses a cut. A parameter that two units use counts in the ``param_bytes`` of both, because
each segment that runs either unit needs it.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils.flop_counter import FlopCounterMode

from amp4ec.errors import UsageError
from amp4ec.graph import Cut, Leaf, ModelGraph, TensorSpec, Unit

GRANULARITIES = ("block", "leaf")
HEAD_UNIT = "head"

_CALL_OPS = ("call_module", "call_function", "call_method")


# ----------------------------------------------------------------------------- loading


def load_model(spec: str, *, seed: int = 0) -> nn.Module:
    """Build a model in eval mode from a torchvision model name or a ``package.module:factory`` spec.

    Weights are never downloaded: torchvision models get a random initialization drawn after
    ``torch.manual_seed(seed)``, so the same seed gives the same weights. A factory is called
    with no arguments under the same seed. The caller's global RNG state is left unchanged.
    """
    import torchvision

    if ":" in spec:
        factory = _import_factory(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = factory()
            except Exception as exc:
                raise UsageError(
                    f"factory {spec!r} failed when called without arguments: {type(exc).__name__}: {exc}; "
                    "give a function that builds the model with no arguments",
                    field="model",
                ) from exc
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"factory {spec!r} returned {type(model).__name__}, expected a torch.nn.Module",
                field="model",
            )
        return model.eval()

    valid_names = sorted(torchvision.models.list_models(module=torchvision.models))
    if spec not in valid_names:
        raise UsageError(
            f"unknown model {spec!r}; use a torchvision classification model "
            f"({', '.join(valid_names)}) or a 'package.module:factory' spec",
            field="model",
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(spec, weights=None)
    return model.eval()


def _import_factory(spec: str) -> Callable[[], object]:
    module_name, _, attribute_path = spec.partition(":")
    if not module_name or not attribute_path:
        raise UsageError(f"invalid model spec {spec!r}; expected 'package.module:factory'", field="model")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {module_name!r} of model spec {spec!r}: {exc}", field="model") from exc
    for attribute in attribute_path.split("."):
        if not hasattr(target, attribute):
            raise UsageError(
                f"module {module_name!r} has no attribute {attribute_path!r} (model spec {spec!r})", field="model"
            )
        target = getattr(target, attribute)
    if not callable(target):
        raise UsageError(f"{spec!r} is not callable; name a function or class that builds the model", field="model")
    return target


# ----------------------------------------------------------------------------- tracing


@dataclass
class TracedModel:
    """A traced model with its ModelGraph and the fx nodes behind every unit and cut.

    ``unit_nodes[i]`` are the nodes of unit ``i`` in topological order, and ``cut_nodes[i]``
    are the nodes whose values cross cut ``i``, in the order of ``graph.cuts[i].tensors``.
    """

    model: nn.Module
    graph_module: fx.GraphModule
    graph: ModelGraph
    unit_nodes: list[list[fx.Node]]
    cut_nodes: list[list[fx.Node]]

    def segment_module(self, start: int, stop: int) -> fx.GraphModule:
        """Build the GraphModule of units ``start .. stop-1``, sharing the model's parameters.

        It takes the tensors of cut ``start`` as positional arguments and returns a tuple of
        the tensors of cut ``stop``, also for a single tensor.
        """
        _check_segment_bounds(start, stop, len(self.unit_nodes))
        return _build_segment(self.graph_module, self.unit_nodes, self.cut_nodes, start, stop)

    def export_segment(self, start: int, stop: int) -> bytes:
        """Export segment ``[start, stop)`` with ``torch.export`` for the cut shapes and serialize it.

        The shapes are static, batch size included. Load the bytes with :func:`load_exported`.
        """
        segment = self.segment_module(start, stop)
        inputs = tuple(example_inputs(self.graph, start))
        with torch.no_grad():
            program = torch.export.export(segment, inputs, strict=False)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        return buffer.getvalue()

    def output_from_cut(self, values: Sequence[torch.Tensor]) -> object:
        """Rebuild the model's output structure from the tensors of the last cut, in its order."""
        by_node = dict(zip(self.cut_nodes[-1], values, strict=True))
        output_node = _output_node(self.graph_module.graph)
        return fx.node.map_arg(output_node.args[0], lambda node: by_node[node])


def load_exported(blob: bytes) -> Callable[..., tuple[torch.Tensor, ...]]:
    """Load a segment serialized by :meth:`TracedModel.export_segment` as a callable module."""
    program = torch.export.load(io.BytesIO(blob))
    return program.module()


def trace_model(
    model: nn.Module,
    model_name: str,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    granularity: str = "block",
) -> TracedModel:
    """Trace ``model`` with torch.fx and measure its units and cuts for one input of ``input_shape``.

    The model is put in eval mode. Unit FLOPs come from ``FlopCounterMode`` running each
    unit's segment alone on random inputs of the cut shapes.
    """
    if granularity not in GRANULARITIES:
        raise UsageError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}", field="granularity")
    shape = list(input_shape)
    if not shape or not all(isinstance(size, int) and size > 0 for size in shape):
        raise UsageError(f"invalid input shape {shape!r}; expected positive integers such as 1,3,224,224", field="input_shape")

    model.eval()
    try:
        graph_module = fx.symbolic_trace(model)
    except fx.proxy.TraceError as exc:
        raise UsageError(
            f"torch.fx cannot trace model {model_name!r}: {exc}; models with data-dependent control flow are not supported",
            field="model",
        ) from exc

    generator = torch.Generator().manual_seed(0)
    example = torch.randn(shape, generator=generator)
    with torch.no_grad():
        ShapeProp(graph_module).propagate(example)

    if granularity == "block":
        runs = _block_runs(model, graph_module.graph)
    else:
        runs = _leaf_runs(graph_module.graph)
    unit_names = _unique_names([name for name, _ in runs])
    unit_nodes = [nodes for _, nodes in runs]
    cut_nodes = _live_nodes(graph_module.graph, unit_nodes)
    cuts = [Cut(index=i, tensors=[_tensor_spec(node, model_name) for node in nodes]) for i, nodes in enumerate(cut_nodes)]

    units = []
    for i, (name, nodes) in enumerate(zip(unit_names, unit_nodes)):
        segment = _build_segment(graph_module, unit_nodes, cut_nodes, i, i + 1)
        flops, flops_by_module = _count_flops(segment, _random_tensors(cuts[i].tensors, seed=i))
        units.append(
            Unit(
                name=name,
                flops=flops,
                param_bytes=_param_bytes(graph_module, nodes),
                activation_bytes=sum(_produced_bytes(node) for node in nodes),
                leaves=_leaves(graph_module, nodes, flops_by_module),
            )
        )

    graph = ModelGraph(model=model_name, granularity=granularity, input_shape=shape, units=units, cuts=cuts)
    return TracedModel(model=model, graph_module=graph_module, graph=graph, unit_nodes=unit_nodes, cut_nodes=cut_nodes)


# ----------------------------------------------------------------------------- units


def _module_path(node: fx.Node) -> str:
    """Return the module a node belongs to: the called module, or the module whose forward made the call."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _module_type = list(stack.values())[-1]
    return path


def _is_within(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + ".")


def _block_runs(model: nn.Module, graph: fx.Graph) -> list[tuple[str, list[fx.Node]]]:
    """Group nodes into blocks: top-level children, with nn.Sequential children split one level down."""
    called = [str(node.target) for node in graph.nodes if node.op == "call_module"]
    if not called:
        raise UsageError("the traced model calls no modules, so it has no units to split", field="model")
    head_child = called[-1].split(".")[0]
    children = dict(model.named_children())
    # The head child is kept whole only when the model has other units to split off.
    keep_head = len({path.split(".")[0] for path in called}) > 1

    blocks: set[str] = set()
    for name, child in children.items():
        if isinstance(child, nn.Sequential) and len(child) > 0 and not (keep_head and name == head_child):
            blocks.update(f"{name}.{sub_name}" for sub_name, _ in child.named_children())
        else:
            blocks.add(name)

    def block_of(node: fx.Node) -> str | None:
        parts = _module_path(node).split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in blocks:
                return prefix
        return None

    runs = _group_runs(graph, lambda node, previous: block_of(node))

    if keep_head:
        runs = _merge_head(runs, head_child, children)
    return runs


def _merge_head(
    runs: list[tuple[str, list[fx.Node]]], head_child: str, children: dict[str, nn.Module]
) -> list[tuple[str, list[fx.Node]]]:
    """Rename the last run of the head child to "head" and absorb the parameter-free top-level modules before it."""
    head_index = max(i for i, (name, _) in enumerate(runs) if name == head_child)
    first = head_index
    while first > 0:
        name = runs[first - 1][0]
        child = children.get(name)
        if child is None or any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            break
        first -= 1
    head_nodes = [node for _, nodes in runs[first : head_index + 1] for node in nodes]
    return runs[:first] + [(HEAD_UNIT, head_nodes)] + runs[head_index + 1 :]


def _leaf_runs(graph: fx.Graph) -> list[tuple[str, list[fx.Node]]]:
    """Make every leaf module call a unit, with functional calls attached as the module docstring describes."""
    if not any(node.op == "call_module" for node in graph.nodes):
        raise UsageError("the traced model calls no modules, so it has no units to split", field="model")

    def key_of(node: fx.Node, previous_module_call: fx.Node | None) -> fx.Node | None:
        if node.op == "call_module":
            return node
        scope = _module_path(node)
        if scope and previous_module_call is not None and _is_within(str(previous_module_call.target), scope):
            return previous_module_call
        return None

    runs = _group_runs(graph, key_of)
    return [(str(key.target), nodes) for key, nodes in runs]


def _group_runs(graph: fx.Graph, key_of: Callable) -> list[tuple[object, list[fx.Node]]]:
    """Split call nodes into runs of equal key, in graph order.

    ``key_of(node, previous_module_call)`` returns a unit key, or None for a node that joins
    the next keyed run (the last run when no keyed node follows). Pending nodes always join
    the run of the next keyed node, so every run stays contiguous.
    """
    runs: list[tuple[object, list[fx.Node]]] = []
    pending: list[fx.Node] = []
    previous_module_call = None
    for node in graph.nodes:
        if node.op not in _CALL_OPS:
            continue
        key = key_of(node, previous_module_call)
        if node.op == "call_module":
            previous_module_call = node
        if key is None:
            pending.append(node)
            continue
        if runs and runs[-1][0] == key:
            runs[-1][1].extend(pending)
            runs[-1][1].append(node)
        else:
            runs.append((key, pending + [node]))
        pending = []
    if pending:
        runs[-1][1].extend(pending)
    return runs


def _unique_names(names: list[str]) -> list[str]:
    """Suffix repeated unit names with ``@1``, ``@2``, ... so each unit name is unique."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        count = seen.get(name, 0)
        unique.append(name if count == 0 else f"{name}@{count}")
        seen[name] = count + 1
    return unique


# ----------------------------------------------------------------------------- cuts


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(node for node in reversed(graph.nodes) if node.op == "output")


def _live_nodes(graph: fx.Graph, unit_nodes: list[list[fx.Node]]) -> list[list[fx.Node]]:
    """List, for each cut, the nodes produced before it and used at or after it, in graph order.

    Cut 0 is every placeholder and the last cut is the model output, in the output's order.
    """
    n_units = len(unit_nodes)
    unit_of: dict[fx.Node, int] = {}
    for i, nodes in enumerate(unit_nodes):
        for node in nodes:
            unit_of[node] = i
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    output = _output_node(graph)

    def position_of_user(user: fx.Node) -> int:
        if user is output:
            return n_units
        return unit_of[user]

    produced_at: dict[fx.Node, int] = {node: -1 for node in placeholders}
    produced_at.update(unit_of)
    last_use = {node: max((position_of_user(user) for user in node.users), default=-1) for node in produced_at}

    order = {node: i for i, node in enumerate(graph.nodes)}
    cuts = [list(placeholders)]
    for cut in range(1, n_units):
        live = [node for node in produced_at if produced_at[node] < cut <= last_use[node]]
        cuts.append(sorted(live, key=order.__getitem__))
    outputs: list[fx.Node] = []
    fx.node.map_arg(output.args[0], lambda node: outputs.append(node) if node not in outputs else None)
    cuts.append(outputs)
    return cuts


def _tensor_spec(node: fx.Node, model_name: str) -> TensorSpec:
    meta = node.meta.get("tensor_meta")
    if not isinstance(meta, TensorMetadata):
        raise UsageError(
            f"node {node.name!r} of model {model_name!r} crosses a cut but does not produce one tensor "
            f"({type(meta).__name__}); only tensors can be sent between segments, try granularity 'block'",
            field="model",
        )
    dtype = str(meta.dtype).removeprefix("torch.")
    numel = 1
    for size in meta.shape:
        numel *= size
    return TensorSpec(name=node.name, shape=list(meta.shape), dtype=dtype, bytes=numel * _element_size(meta.dtype))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _produced_bytes(node: fx.Node) -> int:
    """Return the bytes of every tensor a node produces, walking tuples and lists of outputs."""
    total = 0
    stack = [node.meta.get("tensor_meta")]
    while stack:
        meta = stack.pop()
        if isinstance(meta, TensorMetadata):
            numel = 1
            for size in meta.shape:
                numel *= size
            total += numel * _element_size(meta.dtype)
        elif isinstance(meta, (tuple, list)):
            stack.extend(meta)
        elif isinstance(meta, dict):
            stack.extend(meta.values())
    return total


# ----------------------------------------------------------------------------- segments


def _check_segment_bounds(start: int, stop: int, n_units: int) -> None:
    if not (0 <= start < stop <= n_units):
        raise UsageError(
            f"invalid segment [{start}, {stop}); expected 0 <= start < stop <= {n_units} (the number of units)",
            field="segment",
        )


def _build_segment(
    root: fx.GraphModule,
    unit_nodes: list[list[fx.Node]],
    cut_nodes: list[list[fx.Node]],
    start: int,
    stop: int,
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in cut_nodes[start]:
        placeholder = graph.placeholder(node.name)
        placeholder.meta = dict(node.meta)
        env[node] = placeholder

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise RuntimeError(f"node {node.name} is used in segment [{start}, {stop}) but is not live at cut {start}")
            env[node] = graph.node_copy(node)
        return env[node]

    for nodes in unit_nodes[start:stop]:
        for node in nodes:
            env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(node) for node in cut_nodes[stop]))
    graph.lint()
    # The GraphModule copies references to the submodules and attributes the graph uses, so
    # segments share parameters with the traced model instead of duplicating them.
    return fx.GraphModule(root, graph, class_name="Segment")


def _count_flops(segment: fx.GraphModule, inputs: list[torch.Tensor]) -> tuple[int, dict[str, int]]:
    """Run a segment once under FlopCounterMode; return total FLOPs and FLOPs per module path."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        segment(*inputs)
    by_module: dict[str, int] = {}
    for key, counts in counter.get_flop_counts().items():
        # Keys are "Global", the root's class name, and "<root class>.<module path>".
        _root, dot, path = key.partition(".")
        if dot:
            by_module[path] = sum(counts.values())
    return counter.get_total_flops(), by_module


def _unit_modules(root: fx.GraphModule, nodes: list[fx.Node]) -> dict[str, nn.Module]:
    modules: dict[str, nn.Module] = {}
    for node in nodes:
        if node.op == "call_module" and node.target not in modules:
            modules[str(node.target)] = root.get_submodule(str(node.target))
    return modules


def _param_bytes(root: fx.GraphModule, nodes: list[fx.Node]) -> int:
    """Sum the bytes of the parameters and buffers a unit's nodes use, counting each tensor once."""
    tensors: dict[int, torch.Tensor] = {}
    for module in _unit_modules(root, nodes).values():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensors[id(tensor)] = tensor
    for node in nodes:
        for argument in node.all_input_nodes:
            if argument.op == "get_attr":
                value = _fetch_attr(root, str(argument.target))
                if isinstance(value, torch.Tensor):
                    tensors[id(value)] = value
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def _fetch_attr(root: nn.Module, target: str) -> object:
    value: object = root
    for attribute in target.split("."):
        value = getattr(value, attribute)
    return value


def _leaves(root: fx.GraphModule, nodes: list[fx.Node], flops_by_module: dict[str, int]) -> list[Leaf]:
    leaves = []
    for path, module in _unit_modules(root, nodes).items():
        params = sum(p.numel() for p in module.parameters())
        leaves.append(
            Leaf(
                name=path,
                type=type(module).__name__,
                params=params,
                ralos_cost=ralos_cost(module),
                macs=flops_by_module.get(path, 0) // 2,
            )
        )
    return leaves


def ralos_cost(module: nn.Module) -> int:
    """Return the published RALOS layer cost of a leaf module.

    Convolutions cost the product of kernel sizes times in and out channels, ignoring groups
    and output size. Linear costs in times out features. Any other module costs its
    parameter count.
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = 1
        for size in module.kernel_size:
            kernel *= size
        return kernel * module.in_channels * module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- running


def _random_tensors(specs: Sequence[TensorSpec], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point:
            tensors.append(torch.randn(spec.shape, generator=generator, dtype=dtype))
        else:
            tensors.append(torch.zeros(spec.shape, dtype=dtype))
    return tensors


def example_inputs(graph: ModelGraph, cut_index: int, seed: int = 0) -> list[torch.Tensor]:
    """Make random tensors with the shapes and dtypes of the tensors of cut ``cut_index``.

    Floating-point tensors are standard normal, integer and boolean tensors are zeros.
    """
    if not 0 <= cut_index < len(graph.cuts):
        raise UsageError(f"invalid cut index {cut_index}; the graph has cuts 0 to {len(graph.cuts) - 1}", field="cut")
    return _random_tensors(graph.cuts[cut_index].tensors, seed)


def run_pipeline(
    traced: TracedModel,
    bounds: Sequence[int],
    x: torch.Tensor | Sequence[torch.Tensor],
    *,
    exported: bool = False,
) -> object:
    """Run the model as a chain of segments cut at ``bounds`` and return the model's output.

    ``bounds`` lists cut positions from 0 to the number of units, such as ``[0, 5, 12, 20]``.
    ``x`` is the model input, or a sequence of inputs for a model with several. With
    ``exported``, every segment goes through ``export_segment`` and ``load_exported`` first.
    """
    n_units = traced.graph.n_units
    bounds = list(bounds)
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != n_units:
        raise UsageError(f"invalid bounds {bounds}; they must start at 0 and end at {n_units}", field="bounds")
    for start, stop in zip(bounds, bounds[1:]):
        if start >= stop:
            raise UsageError(f"invalid bounds {bounds}; they must increase strictly", field="bounds")

    values = [x] if isinstance(x, torch.Tensor) else list(x)
    with torch.no_grad():
        for start, stop in zip(bounds, bounds[1:]):
            if exported:
                segment = load_exported(traced.export_segment(start, stop))
            else:
                segment = traced.segment_module(start, stop)
            values = list(segment(*values))
    return traced.output_from_cut(values)
