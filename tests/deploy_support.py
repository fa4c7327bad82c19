"""Shared helpers for the deployment checks: read the Dockerfile, compose, Prometheus and
Grafana files of the repo, and derive the loopback Prometheus config from the real one.

Not a test module (no ``test_`` prefix): ``test_deploy_static.py`` and ``test_topology.py``
import what they use.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import os
import re
import shlex
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

import yaml
from packaging.requirements import Requirement

ROOT: Final = Path(__file__).resolve().parents[1]
PYPROJECT: Final = ROOT / "pyproject.toml"
DOCKERFILE: Final = ROOT / "Dockerfile"
DOCKERIGNORE: Final = ROOT / ".dockerignore"
COMPOSE: Final = ROOT / "docker-compose.yml"
DEPLOY: Final = ROOT / "deploy"
COMPOSE_SCHEMA: Final = DEPLOY / "schemas" / "compose-spec.json"
PROMETHEUS_CONFIG: Final = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_RULES: Final = DEPLOY / "prometheus" / "rules"
PROMETHEUS_RULE_TESTS: Final = DEPLOY / "prometheus" / "tests"
GRAFANA: Final = DEPLOY / "grafana"
GRAFANA_DASHBOARDS: Final = GRAFANA / "dashboards"
GRAFANA_PROVISIONING: Final = GRAFANA / "provisioning"

API_JOB: Final = "apd-api"
"""The Prometheus job that scrapes every api replica (deploy/prometheus/prometheus.yml)."""


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------
# Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # everything after the keyword, continuation lines joined
    line: int  # 1-based line of the keyword


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def find(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The stage's ENV as one mapping (``ENV A=1 B=2`` form)."""
        out: dict[str, str] = {}
        for ins in self.find("ENV"):
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                if not sep:
                    raise ValueError(f"line {ins.line}: use the ENV key=value form, not {token!r}")
                out[key] = value
        return out


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Dockerfile lines with ``\\`` continuations joined and comments dropped."""
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        yield start, " ".join(p for p in buf if p)
        buf = []
    if buf:
        yield start, " ".join(p for p in buf if p)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ``ARG`` defaults and the build stages, in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, logical in _logical_lines(text):
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, rest, line))
    return args, stages


def copy_sources(ins: Instruction) -> list[str]:
    """Sources of a ``COPY`` (shell form), without its ``--flags``; [] for ``--from``."""
    words = [w for w in shlex.split(ins.args)]
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


@dataclass(frozen=True)
class ImageRepository:
    """The model repository the runtime image carries, read from the Dockerfile."""

    path: str  # where it lies in the runtime image
    owner: str  # the --chown of its COPY into the runtime stage
    files: dict[PurePosixPath, str]  # path in the repository -> the builder file copied there


def image_model_repository(stages: list[Stage]) -> ImageRepository:
    """The runtime stage's ``COPY --from=builder --chown=U DIR DIR`` of a folder that the
    builder stage fills with ``cp SRC DIR/...`` commands (each RUN's ``&&``-joined commands)."""
    (runtime,) = [s for s in stages if s.name == "runtime"]
    (builder,) = [s for s in stages if s.name == "builder"]
    found = []
    for ins in runtime.find("COPY"):
        words = shlex.split(ins.args)
        flags = dict(w.removeprefix("--").split("=", 1) for w in words if w.startswith("--"))
        paths = [w for w in words if not w.startswith("--")]
        if flags.get("from") == "builder" and paths[0] != "/opt/venv":
            found.append((flags, paths))
    assert len(found) == 1, f"expected one COPY of a model repository from builder: {found}"
    ((flags, (src, dest)),) = found
    assert src == dest, f"the repository moves from {src} to {dest}"
    files: dict[PurePosixPath, str] = {}
    for ins in builder.find("RUN"):
        for command in ins.args.split("&&"):
            words = shlex.split(command)
            if words[:1] == ["cp"] and PurePosixPath(words[-1]).is_relative_to(src):
                (source,) = [w for w in words[1:-1] if not w.startswith("-")]
                files[PurePosixPath(words[-1]).relative_to(src)] = source
    return ImageRepository(dest, flags.get("chown", ""), files)


# --------------------------------------------------------------------------------------
# .dockerignore (the moby patternmatcher rules: last match wins, `!` re-includes, a pattern
# that matches a directory matches everything under it)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c)))
        i += 1
    return re.compile("".join(out))


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per pattern; ``excludes`` is False for ``!`` exceptions."""
    out = []
    for raw in text.splitlines():
        p = raw.strip()
        if not p or p.startswith("#"):
            continue
        negate = p.startswith("!")
        p = p.lstrip("!").strip().strip("/")
        p = re.sub(r"/+", "/", p)
        out.append((not negate, _pattern_regex(p)))
    return out


def is_ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether ``path`` (relative to the context, ``/``-separated) is left out of the context."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for excludes, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = excludes
    return ignored


# --------------------------------------------------------------------------------------
# Prometheus


def loopback_prometheus_config(
    repo_config: dict[str, Any],
    api_targets: Iterable[str],
    *,
    self_target: str,
    scrape_interval: str = "1s",
    rules_dir: Path = PROMETHEUS_RULES,
) -> dict[str, Any]:
    """The repo's config with Docker DNS discovery swapped for loopback static targets.

    Job names, metrics paths, schemes and rule files are kept; ``rule_files`` become absolute
    (they resolve against the config file's directory, which is a temporary one here).
    """
    cfg = copy.deepcopy(repo_config)
    glob = cfg.setdefault("global", {})
    glob["scrape_interval"] = scrape_interval
    glob["evaluation_interval"] = scrape_interval
    glob["scrape_timeout"] = scrape_interval
    cfg["rule_files"] = [
        str(rules_dir / Path(p).relative_to("rules")) for p in cfg.get("rule_files", [])
    ]
    for job in cfg["scrape_configs"]:
        sd = [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]
        for key in sd:
            del job[key]
        targets = list(api_targets) if job["job_name"] == API_JOB else [self_target]
        job["static_configs"] = [{"targets": targets}]
    return cfg


# --------------------------------------------------------------------------------------
# Metric names in PromQL and in the exposition format

# The service's own metrics and prometheus-client's process metrics.
_METRIC = re.compile(r"(?<![\w:\"'])((?:apd|process)_[A-Za-z0-9_:]*)")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'")
_HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")


def promql_metric_names(expr: str) -> set[str]:
    """The ``apd_*`` and ``process_*`` metric names an expression selects (label values are
    skipped)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def exported_metric_names(exposition: str) -> set[str]:
    """Every series name a ``/metrics`` text can hold: samples, and each family's ``# TYPE``
    (so a labelled counter that has not been incremented yet still counts)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names.update(name + s for s in _HISTOGRAM_SUFFIXES)
            elif kind == "summary":
                names.update((name, name + "_sum", name + "_count"))
            elif kind == "counter":
                base = name.removesuffix("_total")
                names.update((base + "_total", base + "_created"))
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


# --------------------------------------------------------------------------------------
# Grafana

# Grafana's built-in interval variables, replaced by fixed ranges for offline parsing.
GRAFANA_VARIABLES: Final = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${__rate_interval}": "1m",
    "${__interval}": "15s",
    "${__range}": "1h",
}


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], str, str]]:
    """(panel, refId, PromQL with Grafana's interval variables filled in) per query."""
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            yield panel, str(target.get("refId", "")), expr


def rule_exprs(rules_dir: Path = PROMETHEUS_RULES) -> Iterator[tuple[str, str]]:
    """(rule name, expr) for every alerting and recording rule in the repo."""
    for path in sorted(rules_dir.glob("*.yml")):
        for group in load_yaml(path)["groups"]:
            for rule in group["rules"]:
                yield rule.get("alert") or rule["record"], rule["expr"]


# --------------------------------------------------------------------------------------
# Tools


def find_tool(name: str, hint: str) -> str:
    """A tool beside this interpreter (the venv's bin/) or on PATH.

    Missing, the calling test is skipped with ``hint``; where ``REQUIRE_DEPLOY_TOOLS`` is
    set (``.ci/run`` sets it, after installing them) it fails instead, so CI cannot pass by
    skipping.
    """
    import shutil
    import sys

    import pytest

    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is not None:
        return found
    message = f"{name} is not installed ({hint})"
    if os.environ.get("REQUIRE_DEPLOY_TOOLS"):
        pytest.fail(message + "; REQUIRE_DEPLOY_TOOLS is set", pytrace=False)
    pytest.skip(message)


# --------------------------------------------------------------------------------------
# Python packages: apd's requirements (pyproject.toml) and what they bring in (installed metadata)


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(extras: Iterable[str]) -> list[Requirement]:
    """apd's core requirements and those of ``extras``, read from pyproject.toml: the installed
    metadata of an editable install goes stale when pyproject.toml changes."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    raw = list(project["dependencies"])
    for extra in extras:
        raw += project["optional-dependencies"][extra]
    return [Requirement(r) for r in raw]


def installed_closure(requirements: Iterable[Requirement]) -> tuple[dict[str, str], set[str]]:
    """Every distribution that installing ``requirements`` brings in, walked through the
    installed metadata (extras and environment markers honoured), as normalised name ->
    installed version; and the names that are required but not installed."""
    found: dict[str, str] = {}
    missing: set[str] = set()
    visited: set[tuple[str, frozenset[str]]] = set()
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        key = (normalise(req.name), frozenset(req.extras))
        if key in visited:
            continue
        visited.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            missing.add(key[0])
            continue
        found[key[0]] = dist.version
        envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate(e) for e in envs):
                todo.append(sub)
    return found, missing
