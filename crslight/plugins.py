"""Plugins: installed packages that declare entry points in the groups ``crslight.signals``, ``crslight.metrics``,
``crslight.simulators`` and ``crslight.datasets`` (dataset loaders: :func:`crslight.data.load_corpus` reads a name it
does not know from there; the loader protocol is in ``docs/plugins.md``).

There is one mechanism and no decorator registry beside it: :func:`load_plugins` imports every entry point once, which
makes each plugin class a visible subclass of its base (``SignalExtractor``, ``torchmetrics.Metric``, ...), so that
jsonargparse resolves its short class name in YAML (``class_path: SentimentShiftSignal``). crslight's own signals and
metrics are declared the same way, in its ``pyproject.toml``.

A plugin that fails to import is reported once, as a one-line warning naming the distribution that declared it and the
error; everything else keeps working, and only asking for that plugin (:func:`get`) raises.

The shape follows Lightning's ``lightning/fabric/utilities/registry.py`` (external callbacks from an entry-point group).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from importlib.metadata import EntryPoint, entry_points
from typing import Any

_log = logging.getLogger(__name__)

#: The entry-point groups crslight reads, by short name.
GROUPS = {"signals": "crslight.signals", "metrics": "crslight.metrics", "simulators": "crslight.simulators",
          "datasets": "crslight.datasets"}


class UnknownPluginError(LookupError):
    """Asked for a plugin name that no installed distribution declares (or that failed to import)."""


@dataclass(frozen=True)
class Plugin:
    """One entry point as loaded.

    Attributes:
        group: the entry-point group (``crslight.signals`` ...).
        name: the entry-point name (equal to the class name by convention).
        class_path: ``module.Class`` of the loaded object, or the entry point's value when it failed to import.
        distribution: the installed distribution that declares it (``unknown`` when importlib cannot tell).
        version: that distribution's version (empty when unknown).
        error: ``ExceptionType: message`` when importing failed, else None.
    """

    group: str
    name: str
    class_path: str
    distribution: str
    version: str
    error: str | None = None
    obj: Any = None


_registry: dict[str, dict[str, Plugin]] | None = None


def _group_name(group: str) -> str:
    if group in GROUPS.values():
        return group
    if group in GROUPS:
        return GROUPS[group]
    raise ValueError(f"unknown plugin group {group!r}: expected one of {', '.join(GROUPS.values())}")


def _load_one(ep: EntryPoint, group: str) -> Plugin:
    dist = getattr(ep, "dist", None)
    dist_name = dist.name if dist is not None else "unknown"
    version = dist.version if dist is not None else ""
    try:
        obj = ep.load()
    except Exception as err:  # noqa: BLE001 - any failure of third-party code must not take the run down
        error = f"{type(err).__name__}: {err}".splitlines()[0]
        _log.warning("crslight plugin %r (group %s) from distribution %s %s failed to import: %s",
                     ep.name, group, dist_name, version, error)
        return Plugin(group, ep.name, ep.value, dist_name, version, error)
    class_path = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', ep.name)}"
    return Plugin(group, ep.name, class_path, dist_name, version, obj=obj)


def load_plugins(reload: bool = False) -> dict[str, dict[str, Plugin]]:
    """Imports every entry point of the crslight groups, once (later calls return the same registry).

    Call it before parsing a config: afterwards every plugin class is a visible subclass of its base, so jsonargparse
    resolves short class names.

    Args:
        reload: read the entry points again (tests; after installing a package into the running interpreter).

    Returns:
        ``{group: {name: Plugin}}`` for the groups, failed imports included (with ``error`` set).
    """
    global _registry
    if _registry is not None and not reload:
        return _registry
    registry: dict[str, dict[str, Plugin]] = {}
    for group in GROUPS.values():
        plugins: dict[str, Plugin] = {}
        for ep in entry_points(group=group):
            if ep.name in plugins:  # the same name twice: keep the first, say so once
                _log.warning("crslight plugin %r (group %s) is declared twice; keeping %s, ignoring %s", ep.name,
                             group, plugins[ep.name].distribution, getattr(ep.dist, "name", "unknown"))
                continue
            plugins[ep.name] = _load_one(ep, group)
        registry[group] = plugins
    _registry = registry
    return registry


def available(group: str) -> list[str]:
    """The names that import cleanly in ``group`` (``"signals"`` or ``"crslight.signals"``), sorted."""
    return sorted(name for name, p in load_plugins()[_group_name(group)].items() if p.error is None)


def get(group: str, name: str) -> Any:
    """The object (class) registered as ``name`` in ``group``.

    Raises:
        UnknownPluginError: no such name (the message lists the available ones), or the plugin failed to import
            (the message carries the distribution and the import error).
    """
    group = _group_name(group)
    plugin = load_plugins()[group].get(name)
    if plugin is None:
        names = ", ".join(available(group)) or "none installed"
        raise UnknownPluginError(f"no plugin {name!r} in {group}; available: {names}")
    if plugin.error is not None:
        raise UnknownPluginError(f"plugin {name!r} in {group} from {plugin.distribution} {plugin.version} "
                                 f"failed to import: {plugin.error}")
    return plugin.obj


def plugins_listing(as_json: bool = False) -> str:
    """What ``crslight plugins [--json]`` prints: every registered signal, metric, simulator and dataset loader and its
    package.

    Args:
        as_json: a JSON list of ``{group, name, class_path, distribution, version}`` objects (plus ``error`` for a
            plugin that failed to import) instead of a table.
    """
    rows = []
    for _group, plugins in load_plugins().items():
        for name in sorted(plugins):
            row = {f.name: getattr(plugins[name], f.name) for f in fields(Plugin) if f.name != "obj"}
            if row["error"] is None:
                row.pop("error")
            rows.append(row)
    if as_json:
        return json.dumps(rows, indent=2)
    header = ("group", "name", "distribution", "version", "class_path")
    table = [header] + [
        (r["group"], r["name"], r["distribution"], r["version"],
         r["class_path"] if "error" not in r else f"{r['class_path']}  [failed: {r['error']}]")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in table)
    return "\n".join(lines)
