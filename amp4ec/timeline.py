"""The dynamics timeline that simulate and replay both read, and the older forms it replaces.

A scenario lists its changes once, as ``[[events]]``. Each mode maps every kind to what it can
do: the simulator changes its model of the node, replay acts on the node's container. A kind
that a mode cannot carry out is rejected before the run, naming the event.

Older scenario files keep loading: ``[[dynamics]]`` (``at_s`` and ``action``),
``[adaptation].capacity_changes`` and ``policy.retries`` are translated into events and
``policy.on_failure`` / ``policy.max_retries``, with a FutureWarning that names the new form.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from amp4ec.errors import UsageError

if TYPE_CHECKING:
    from amp4ec.scenario import Scenario

EVENT_KINDS = (
    "join",
    "leave",
    "fail",
    "recover",
    "restart",
    "pause",
    "resume",
    "cpu",
    "background_load",
    "link_bandwidth",
)

# What each kind does in each mode; docs/scenario-reference.md prints this table.
KIND_EFFECTS: dict[str, tuple[str, str]] = {
    "join": ("the node starts taking stages after its segments are deployed", "start the container, deploy its segments"),
    "leave": ("the node takes no new stages; stages in flight finish", "docker stop (SIGTERM, then SIGKILL after 2 s)"),
    "fail": ("the node dies; stages in flight are lost (policy.on_failure)", "docker kill; stages in flight are cancelled"),
    "recover": ("a failed node comes back and its segments are deployed again", "start the container, deploy its segments"),
    "restart": ("fail, then recover at once", "docker restart, deploy its segments"),
    "pause": (
        "the node freezes: stages in flight and sent to it wait for the resume, for at most 60 s",
        "docker pause (SIGSTOP where the freezer fails); a stage sent to it times out after 60 s, "
        "a forwarded route after 60 s per stage",
    ),
    "resume": ("a paused node carries on where it stopped", "docker unpause (SIGCONT after SIGSTOP)"),
    "cpu": ("the node's CFS quota becomes cpus, as the monitor then reports", "docker update --cpus (NanoCpus) on the running container"),
    "background_load": ("cpus of the node's quota go to other work (0 ends it)", ""),
    "link_bandwidth": ("the node's link changes to bandwidth_mbps / latency_ms", ""),
}

# Kinds each mode can carry out. Replay rejects the others before any container starts.
# NOTE: replay has no background load generator and no live link shaping yet, so
# background_load and link_bandwidth are simulation only.
SUPPORTED_KINDS = {
    "sim": frozenset(EVENT_KINDS),
    "real": frozenset(kind for kind, (_, real) in KIND_EFFECTS.items() if real),
}

# Seconds a stage waits on a paused node before it counts as lost (retried or failed). Replay's
# worker client times out after the same 60 s (STAGE_TIMEOUT_S in amp4ec.real.coordinator).
PAUSED_STAGE_TIMEOUT_S = 60.0

# Old names of event kinds in [[events]] and of actions in [[dynamics]].
RENAMED_KINDS = {"background": "background_load", "bandwidth": "link_bandwidth", "set_cpus": "cpu"}

# Keys still read but no longer written; docs/scenario-reference.md prints this table.
DEPRECATED_KEYS: list[tuple[str, str]] = [
    ("[[dynamics]] with at_s, action", "[[events]] with time_s, kind; action set_cpus is kind cpu"),
    ("[adaptation] capacity_changes", "[[events]] with kind = \"cpu\""),
    (
        "policy.retries = N",
        "policy.on_failure = \"retry\" and policy.max_retries = N (N = 0: on_failure = \"fail\"). "
        "Replay used to allow N retries per stage; max_retries is a budget per request, over all its stages",
    ),
    ("[[events]] kind = \"background\"", "kind = \"background_load\""),
    ("[[events]] kind = \"bandwidth\"", "kind = \"link_bandwidth\""),
]


def warn_deprecated(old: str, new: str) -> None:
    """Emit the note that a scenario used an older form; FutureWarning is shown to users by default."""
    # warn_explicit with no real file, so the note is not followed by a line of amp4ec's source.
    warnings.warn_explicit(
        f"{old} is deprecated and was read as {new}; write the new form "
        "(see docs/scenario-reference.md, section Deprecated keys)",
        FutureWarning,
        filename="scenario",
        lineno=0,
        module="amp4ec.scenario",
    )


def translate_legacy(scenario: "Scenario") -> list[str]:
    """Move ``dynamics`` and ``adaptation.capacity_changes`` into ``events``; return each event's origin.

    Capacity changes go first, so at equal times they apply before the other events, as they
    did when they were a timeline of their own. The origin of an event (``events[2]``,
    ``dynamics[0]``, ``adaptation.capacity_changes[1]``) names it in error messages.
    """
    from amp4ec.scenario import EventSpec

    origins = [f"events[{i}]" for i in range(len(scenario.events))]
    changes = scenario.adaptation.capacity_changes
    dynamics = scenario.dynamics
    if not changes and not dynamics:
        return origins
    translated: list[EventSpec] = []
    translated_origins: list[str] = []
    for j, change in enumerate(changes):
        translated.append(EventSpec.model_construct(time_s=change.time_s, kind="cpu", node=change.node, cpus=change.cpus, bandwidth_mbps=None, latency_ms=None))
        translated_origins.append(f"adaptation.capacity_changes[{j}]")
    dynamics_events: list[EventSpec] = []
    dynamics_origins: list[str] = []
    for j, event in enumerate(dynamics):
        kind = RENAMED_KINDS.get(event.action, event.action)
        dynamics_events.append(EventSpec.model_construct(time_s=event.at_s, kind=kind, node=event.node, cpus=event.cpus, bandwidth_mbps=None, latency_ms=None))
        dynamics_origins.append(f"dynamics[{j}]")
    if changes:
        warn_deprecated("[adaptation] capacity_changes", "[[events]] of kind cpu")
    if dynamics:
        warn_deprecated("[[dynamics]]", "[[events]] (at_s -> time_s, action -> kind, set_cpus -> cpu)")
    scenario.events = translated + list(scenario.events) + dynamics_events
    scenario.adaptation.capacity_changes = []
    scenario.dynamics = []
    return translated_origins + origins + dynamics_origins


def ordered_events(scenario: "Scenario") -> list:
    """Return the events in the order both modes apply them: by time, then as listed."""
    return [event for _, _, event in sorted((e.time_s, i, e) for i, e in enumerate(scenario.events))]


def check_supported(scenario: "Scenario", mode: str, *, source: str | None = None) -> None:
    """Raise UsageError for the first event whose kind ``mode`` ("sim" or "real") cannot carry out."""
    supported = SUPPORTED_KINDS[mode]
    origins = scenario.event_origins()
    for i, event in enumerate(scenario.events):
        if event.kind not in supported:
            name = "replay" if mode == "real" else "simulate"
            raise UsageError(
                f"kind {event.kind!r} cannot be carried out by {name}; it supports "
                f"{', '.join(k for k in EVENT_KINDS if k in supported)}. Remove the event or run it in simulation",
                field=f"{origins[i]}.kind",
                source=source,
            )


def first_kinds(scenario: "Scenario") -> dict[str, str]:
    """Return each node's first event kind, in timeline order."""
    first: dict[str, str] = {}
    for event in ordered_events(scenario):
        first.setdefault(event.node, event.kind)
    return first


def timeline_reference() -> list[str]:
    """Return the Markdown tables of event kinds by mode and of deprecated keys, for the scenario reference."""
    lines = [
        "## Event kinds by mode",
        "",
        "`amp4ec simulate` and `amp4ec replay` read the same `[[events]]`. A kind that replay cannot",
        "carry out (\"not supported\" below) is rejected before any container starts, naming the event",
        "(`events[i].kind`), with exit status 2.",
        "",
        "| kind | simulate | replay |",
        "|---|---|---|",
    ]
    for kind in EVENT_KINDS:
        sim, real = KIND_EFFECTS[kind]
        lines.append(f"| `{kind}` | {sim} | {real or 'not supported'} |")
    lines += [
        "",
        "## Deprecated keys",
        "",
        "These keys still load without error, translated into the new form. Each prints a",
        "FutureWarning naming the new form, and the run's resolved scenario holds the new form only.",
        "",
        "| deprecated | read as |",
        "|---|---|",
    ]
    lines += [f"| `{old}` | {new} |" for old, new in DEPRECATED_KEYS]
    lines.append("")
    return lines
