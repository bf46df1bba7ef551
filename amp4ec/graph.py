"""ModelGraph: a model as an ordered list of units, as plain data that needs no torch.

A unit is a contiguous run of the model's fx nodes (a feature block, or one leaf module).
Cut ``i`` sits before unit ``i``: cut 0 carries the model input, cut ``n`` the model output,
and every cut lists all tensors live across it, so a cut inside a residual block carries the
skip tensor too. Building a graph from an ``nn.Module`` lives in :mod:`amp4ec.torchgraph`;
this module only holds, checks, saves and loads the result.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from amp4ec.errors import FileFormatError, UsageError

GRAPH_SCHEMA = "amp4ec.graph/1"


class TensorSpec(BaseModel):
    """One tensor live across a cut, named after the fx node that produces it."""

    name: str
    shape: list[int]
    dtype: str = "float32"
    bytes: int = Field(ge=0)


class Leaf(BaseModel):
    """A leaf module inside a unit, with the cost the published RALOS rule assigns it.

    ``ralos_cost`` follows the AMP4EC paper (Zhang et al., 2025): ``k_h*k_w*C_in*C_out`` for
    Conv2d (groups and output size ignored), ``in*out`` for Linear, the parameter count for
    any other leaf.
    """

    name: str
    type: str
    params: int = Field(ge=0)
    ralos_cost: int = Field(ge=0)
    macs: int = Field(ge=0, default=0)


class Unit(BaseModel):
    """A contiguous piece of the model that may start or end a segment."""

    name: str
    flops: int = Field(ge=0, description="FLOPs of one batch-1 forward, torch.utils.flop_counter convention (2 per MAC)")
    param_bytes: int = Field(ge=0)
    activation_bytes: int = Field(ge=0, description="bytes of all tensors the unit produces, batch 1")
    leaves: list[Leaf] = Field(default_factory=list)

    @property
    def ralos_cost(self) -> int:
        return sum(leaf.ralos_cost for leaf in self.leaves)


class Cut(BaseModel):
    """The tensors that cross position ``index`` (before unit ``index``)."""

    index: int = Field(ge=0)
    tensors: list[TensorSpec]

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)


class ModelGraph(BaseModel):
    """A model as units in topological order with the tensors live at every cut."""

    schema_: Literal["amp4ec.graph/1"] = Field(default=GRAPH_SCHEMA, alias="schema")
    model: str
    granularity: Literal["block", "leaf"]
    input_shape: list[int]
    units: list[Unit]
    cuts: list[Cut]

    model_config = {"populate_by_name": True}

    @model_validator(mode="after")
    def _check_cuts(self) -> "ModelGraph":
        if not self.units:
            raise ValueError("a model graph needs at least one unit")
        if len(self.cuts) != len(self.units) + 1:
            raise ValueError(f"{len(self.units)} units need {len(self.units) + 1} cuts, found {len(self.cuts)}")
        for i, cut in enumerate(self.cuts):
            if cut.index != i:
                raise ValueError(f"cut at position {i} has index {cut.index}")
        return self

    @property
    def n_units(self) -> int:
        return len(self.units)

    def unit_index(self, name: str) -> int:
        for i, unit in enumerate(self.units):
            if unit.name == name:
                return i
        raise KeyError(name)

    def cut_bytes(self, index: int) -> int:
        return self.cuts[index].bytes

    def segment_flops(self, start: int, stop: int) -> int:
        return sum(u.flops for u in self.units[start:stop])

    def segment_param_bytes(self, start: int, stop: int) -> int:
        return sum(u.param_bytes for u in self.units[start:stop])

    def segment_peak_activation_bytes(self, start: int, stop: int) -> int:
        """Estimate the activation memory of a segment: its input plus its largest unit output."""
        largest = max((u.activation_bytes for u in self.units[start:stop]), default=0)
        return self.cut_bytes(start) + largest

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=1)

    def save(self, path: str | Path) -> None:
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "model graph") -> "ModelGraph":
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != GRAPH_SCHEMA:
            raise FileFormatError(
                f"schema is {schema!r}, expected {GRAPH_SCHEMA!r}; rebuild the graph with this version of amp4ec",
                source=source,
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise FileFormatError(f"invalid model graph: {exc}", source=source) from exc

    @classmethod
    def load(cls, path: str | Path) -> "ModelGraph":
        return cls.from_dict(read_json(Path(path)), source=str(path))


def read_json(path: Path) -> dict:
    """Read a JSON file, turning a missing or corrupt file into a FileFormatError."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise FileFormatError("file not found", source=str(path)) from exc
    except IsADirectoryError as exc:
        raise FileFormatError("is a directory; give the path of a JSON file", source=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"cannot read the file: {exc}", source=str(path)) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"not valid JSON ({exc}); the file is corrupt or truncated", source=str(path)) from exc


def check_output_file(path: Path, *, field: str) -> None:
    """Raise a UsageError unless a file can be written at ``path``, before any work goes into it."""
    if path.is_dir():
        raise UsageError("is a directory; give the path of the file to write", source=str(path), field=field)
    if not path.parent.is_dir():
        raise UsageError(f"directory {path.parent} does not exist; create it first", source=str(path), field=field)
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write in {path.parent} ({exc.strerror}); choose another path", source=str(path), field=field) from exc


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 through :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file readable by its owner only; give it the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
