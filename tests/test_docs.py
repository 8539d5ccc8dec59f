"""The docs check: links in README.md and docs/*.md resolve, and the README names every DVC stage.

Every relative link must point to an existing file, and every `#anchor` it carries (in the same
file or another .md file) must be a heading there, slugged as GitHub does it. The README's
"The pipeline" section (diagram and stage table) must name every stage in dvc.yaml. Only pyyaml
and the standard library, so it runs in `make test` in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(markdown_text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in markdown_text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, punctuation but - and _ dropped, spaces → -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image in a heading: its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown_text: str) -> set[str]:
    """Every heading's anchor; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(markdown_text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(markdown_text: str) -> list[str]:
    """Link targets in the prose (not in code blocks or inline code)."""
    targets = []
    for line in prose_lines(markdown_text):
        targets += LINK.findall(INLINE_CODE.sub("", line))
    return targets


def broken_links(markdown_text: str, base_dir: Path) -> list[str]:
    """What is wrong with the relative links of one markdown text whose file lies in base_dir."""
    problems = []
    for target in links(markdown_text):
        if SCHEME.match(target):
            continue  # http:, https:, mailto: ... are not checked here
        path, _, anchor = target.partition("#")
        if path:
            file = (base_dir / path).resolve()
            if not file.exists():
                problems.append(f"{target}: no file {path}")
                continue
            text = file.read_text(encoding="utf-8") if file.suffix == ".md" and file.is_file() else None
        else:
            text = markdown_text
        if anchor:
            if text is None:
                problems.append(f"{target}: an anchor into a file that is not markdown")
            elif anchor not in anchors(text):
                problems.append(f"{target}: no heading #{anchor}")
    return problems


def section(markdown_text: str, title: str) -> str:
    """The text under the level-2 heading `title`, up to the next level-1 or level-2 heading."""
    out, inside, fenced = [], False, False
    for line in markdown_text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,2}\s", line):
            inside = line.lstrip("#").strip() == title
            continue
        if inside:
            out.append(line)
    return "\n".join(out)


def missing_stages(pipeline_text: str, stages: list[str]) -> list[str]:
    """The stage names that do not occur as a word (letters and _) in the text."""
    words = set(re.findall(r"[A-Za-z_]+", pipeline_text))
    return [name for name in stages if name not in words]


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_links_and_anchors_resolve():
    problems = []
    for file in doc_files():
        text = file.read_text(encoding="utf-8")
        problems += [f"{file.relative_to(ROOT)}: {p}" for p in broken_links(text, file.parent)]
    assert not problems, "\n".join(problems)


def test_readme_pipeline_names_every_dvc_stage():
    stages = [
        name
        for file in ("dvc.yaml", "screened/dvc.yaml")
        for name in yaml.safe_load((ROOT / file).read_text(encoding="utf-8"))["stages"]
    ]
    pipeline = section((ROOT / "README.md").read_text(encoding="utf-8"), "The pipeline")
    assert pipeline.strip(), "README.md has no '## The pipeline' section"
    missing = missing_stages(pipeline, stages)
    assert not missing, f"README 'The pipeline' does not name: {missing}"


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


# The check itself must be able to fail.


def test_slug_follows_github():
    heading = "Methods screened: what was tried on `modern`, and what was kept"
    assert slug(heading) == "methods-screened-what-was-tried-on-modern-and-what-was-kept"
    assert slug("The seed notebook's protocol, side by side") == "the-seed-notebooks-protocol-side-by-side"
    assert slug("Credentials: never in `.dvc/config`") == "credentials-never-in-dvcconfig"
    assert slug("train_fold@<v> and [a link](x.md)") == "train_foldv-and-a-link"
    assert anchors("# A\n## A\n```\n# Not a heading\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_broken_links_finds_each_kind(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Its part\n", encoding="utf-8")
    (tmp_path / "data.csv").write_text("x\n", encoding="utf-8")
    text = "\n".join(
        [
            "# Here",
            "[ok](other.md) [ok](other.md#its-part) [ok](#here) [ok](data.csv) [web](https://example.org/x#y)",
            "[no file](missing.md) [no anchor](other.md#nowhere) [no local anchor](#elsewhere)",
            "[anchor into csv](data.csv#x)",
            "`[in code](missing-too.md)`",
            "```",
            "[in a fence](missing-three.md)",
            "```",
        ]
    )
    assert broken_links(text, tmp_path) == [
        "missing.md: no file missing.md",
        "other.md#nowhere: no heading #nowhere",
        "#elsewhere: no heading #elsewhere",
        "data.csv#x: an anchor into a file that is not markdown",
    ]


def test_missing_stages_finds_an_unnamed_stage():
    text = "fetch ─► split ─► train@<v> ─► ood@<v> ─► export_cv@<v>"
    assert missing_stages(text, ["fetch", "split", "train", "ood", "ood_cv", "export", "export_cv"]) == [
        "ood_cv",
        "export",
    ]
    readme = "# T\n## The pipeline\nfetch\n```\n## not a heading\nsplit\n```\n## Layout\nreport\n"
    assert missing_stages(section(readme, "The pipeline"), ["fetch", "split", "report"]) == ["report"]
