"""The Markdown documentation: every relative link resolves, and the README stays short.

A link to a file must name a file or folder of the repository; a ``#anchor`` on a Markdown
target (or on its own, for the same file) must name a heading of that file, slugged the way
GitHub renders anchors. Links inside code blocks and code spans are not links. The alert rules'
``runbook_url`` annotations are checked the same way, since they are links into the docs too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_BYTES = 12 * 1024

_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """The lines of ``text`` outside fenced code blocks, with their 1-based numbers."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if match is not None:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


def links(text: str) -> list[tuple[int, str]]:
    """Every link target in ``text`` as ``(line, target)``, code blocks and spans excluded."""
    found: list[tuple[int, str]] = []
    for number, line in prose_lines(text):
        definition = _REFERENCE_DEFINITION.match(line)
        if definition is not None:
            found.append((number, definition.group(1)))
            continue
        line = _CODE_SPAN.sub("", line)
        found.extend((number, match.group(1)) for match in _INLINE_LINK.finditer(line))
    return found


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: links reduced to their text, lowercase, punctuation
    other than ``-`` and ``_`` dropped, each space turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text: heading slugs (repeats numbered ``-1``, ``-2``, as on
    GitHub) and explicit ``<a name=...>`` / ``<a id=...>`` anchors."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in prose_lines(text):
        result.update(_HTML_ANCHOR.findall(line))
        match = _HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(path: Path, root: Path) -> list[str]:
    """Problems of the relative links of the Markdown file ``path`` (empty: all resolve)."""
    problems: list[str] = []
    text = path.read_text(encoding="utf-8")
    where = path.relative_to(root)
    for number, target in links(text):
        if _SCHEME.match(target) or target.startswith("//"):
            continue  # external: http(s), mailto and friends are not checked here
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if file_part.startswith("/"):
            problems.append(
                f"{where}:{number}: {target}: use a relative link, not an absolute path"
            )
            continue
        resolved = (path.parent / file_part).resolve() if file_part else path
        try:
            resolved.relative_to(root)
        except ValueError:
            problems.append(f"{where}:{number}: {target}: points outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}:{number}: {target}: {file_part} does not exist")
            continue
        if (
            anchor
            and resolved.suffix == ".md"
            and unquote(anchor) not in anchors(resolved.read_text(encoding="utf-8"))
        ):
            problems.append(f"{where}:{number}: {target}: no heading #{anchor} in {resolved.name}")
    return problems


def markdown_files(root: Path) -> list[Path]:
    """The repository's Markdown files: tracked or new (not ignored), else every file found."""
    git = shutil.which("git")
    if git is not None and (root / ".git").exists():
        listed = subprocess.run(
            [git, "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.md"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        if listed.returncode == 0:
            paths = {root / line for line in listed.stdout.splitlines() if line}
            return sorted(p for p in paths if p.is_file())
    skipped = {".git", ".venv", "node_modules", "build", "dist"}
    return sorted(
        p
        for p in root.rglob("*.md")
        if not any(part in skipped or part.endswith(".egg-info") for part in p.parts)
    )


# --------------------------------------------------------------------------------------------
# The checker itself


SAMPLE = """\
# Guide: the *first* steps

See [the reference](docs/reference.md#every-option), ![a picture](img/a.svg) and
[the top](#guide-the-first-steps); [external](https://example.com/x) is not checked.
Not a link: `[code](nowhere.md)`.

```yaml
also_not: "[a link](inside-a-fence.md)"
```

[defined]: other.md "a title"

## Step 1 — install `pip`
## Step 1 — install `pip`
"""


def test_the_link_extractor_finds_links_outside_code() -> None:
    assert [target for _, target in links(SAMPLE)] == [
        "docs/reference.md#every-option",
        "img/a.svg",
        "#guide-the-first-steps",
        "https://example.com/x",
        "other.md",
    ]


def test_headings_are_slugged_like_github() -> None:
    assert slug("Guide: the *first* steps") == "guide-the-first-steps"
    assert slug("`poll.max_pages` (1..10000)") == "pollmax_pages-110000"
    assert slug("TwilioWirelessSimDown") == "twiliowirelesssimdown"
    assert slug("See [the docs](docs/x.md) now") == "see-the-docs-now"
    assert anchors(SAMPLE) == {
        "guide-the-first-steps",
        "step-1--install-pip",
        "step-1--install-pip-1",
    }


def test_broken_links_and_anchors_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "reference.md").write_text("# Reference\n\n## Every option\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](docs/reference.md#every-option) [gone](docs/missing.md) "
        "[bad anchor](docs/reference.md#no-such-heading) [self](#page) [up](../elsewhere.md)\n"
        "\n# Page\n"
    )
    problems = broken_links(page, tmp_path)
    assert len(problems) == 3, problems
    assert "docs/missing.md does not exist" in problems[0]
    assert "no heading #no-such-heading in reference.md" in problems[1]
    assert "points outside the repository" in problems[2]


# --------------------------------------------------------------------------------------------
# The repository's documentation


def test_the_docs_are_found() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files(ROOT)}
    assert {"README.md", "CONTRIBUTING.md", "docs/architecture.md"} <= names, names


@pytest.mark.parametrize("path", markdown_files(ROOT), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path, ROOT) == []


def test_the_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


def test_the_readme_links_into_docs() -> None:
    targets = {target.partition("#")[0] for _, target in links(README.read_text("utf-8"))}
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages, "no docs/*.md pages"
    assert pages <= targets, f"docs pages the README does not link to: {sorted(pages - targets)}"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line for line in script if line.startswith("python3 -m venv")]
    assert len(commands) == 1, commands
    readme_lines = README.read_text(encoding="utf-8").splitlines()
    assert commands[0] in readme_lines, "the README's test command differs from .ci/run's"


def test_alert_runbook_urls_name_existing_sections() -> None:
    rule_files = sorted((ROOT / "grafana" / "alerts").glob("*.yaml"))
    checked = 0
    for rule_file in rule_files:
        document = yaml.safe_load(rule_file.read_text(encoding="utf-8")) or {}
        for group in document.get("groups", []):
            for rule in group.get("rules", []):
                url = (rule.get("annotations") or {}).get("runbook_url")
                if "alert" not in rule or not url or _SCHEME.match(url):
                    continue
                file_part, _, anchor = str(url).partition("#")
                target = ROOT / file_part
                assert target.is_file(), f"{rule['alert']}: {url}: no such file"
                assert anchor in anchors(target.read_text(encoding="utf-8")), (
                    f"{rule['alert']}: {url}: no such section"
                )
                checked += 1
    assert checked > 0


def option_paths(value: object, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every option in parsed YAML (``sims[].sid`` for list entries)."""
    if isinstance(value, dict):
        for key, child in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            nested = isinstance(child, dict) or (
                isinstance(child, list) and any(isinstance(item, dict) for item in child)
            )
            if nested and path != "sims[].labels":
                yield from option_paths(child, path)
            else:
                yield path
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield from option_paths(item, f"{prefix}[]")


# Options config.example.yaml shows only in comments (alternatives to the active lines).
# "#   key: value   # comment": one value token, so prose such as "environment: A and B" is not.
_COMMENTED_OPTION = re.compile(r"^#\s+(?:#\s+)?([a-z_]+):\s+[^\s#]+(?:\s+#.*)?$")


def commented_options(text: str) -> Iterator[str]:
    """Options of config.example.yaml written as commented-out lines, as dotted paths.

    Their section is the nearest active key above them at a smaller indentation."""
    parents: list[tuple[int, str]] = []
    for line in text.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped:
            continue
        if not stripped.startswith("#"):
            key = stripped.partition(":")[0]
            if re.fullmatch(r"[a-z_]+", key):
                parents = [(i, k) for i, k in parents if i < indent] + [(indent, key)]
            continue
        match = _COMMENTED_OPTION.match(stripped)
        if match is None:
            continue
        section = [k for i, k in parents if i < indent]
        yield ".".join([*section, match.group(1)])


def test_every_option_of_the_example_config_is_documented() -> None:
    example = (ROOT / "config.example.yaml").read_text(encoding="utf-8")
    reference = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    active = set(option_paths(yaml.safe_load(example)))
    commented = set(commented_options(example))
    assert {"poll.interval", "sims[].sid", "twilio.auth.type"} <= active, active
    assert {"twilio.account_sid", "twilio.auth.client_id"} <= commented, commented
    undocumented = sorted(p for p in active | commented if f"`{p}`" not in reference)
    assert undocumented == [], "options of config.example.yaml missing in configuration.md"
