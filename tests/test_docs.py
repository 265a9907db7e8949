"""The docs stay true to the tree: every relative link resolves, every setting is documented.

Text only (no server, no model): the README and `docs/` are the front door, and a link that 404s on
GitHub or an `IMGCLF_*` variable nobody documented is a bug a newcomer meets first. The settings are
read from `service/settings.py` itself, so a variable added there fails here until it has a row in
docs/serving.md's configuration table with the code's default.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ROOT / "service" / "settings.py"
CONFIG_TABLE = ROOT / "docs" / "serving.md"
ENV_NAME = re.compile(r"IMGCLF_[A-Z0-9_]*[A-Z0-9]")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}#{1,6}(?:\s+(.*?))?(?:\s+#+)?\s*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"""<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
SCHEME = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)


def doc_files() -> list[Path]:
    """The pages a reader follows links through: the README, docs/, and the folder READMEs it links."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    pages += [p for p in (ROOT / "models" / "README.md", ROOT / "data" / "README.md") if p.exists()]
    return pages


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a shell block is not a heading)."""
    out: list[str] = []
    fence = ""
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip(fence[0] + " "):
                fence = ""
            out.append("")
        elif m:
            fence = m.group(1)
            out.append("")
        else:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's heading anchor: the rendered text, lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link's text, not its target
    text = re.sub(r"<[^>]+>", "", text)                          # inline HTML tags
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())         # \w keeps letters, digits and _
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every fragment a page answers to: heading slugs (repeats get -1, -2, ...) and explicit ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    lines = prose_lines(text)
    for i, line in enumerate(lines):
        heading = None
        if m := ATX.match(line):
            heading = m.group(1) or ""
        elif i > 0 and SETEXT.match(line) and lines[i - 1].strip() and not lines[i - 1].lstrip().startswith(("|", "-", "*", ">")):
            heading = lines[i - 1].strip()
        if heading is None:
            continue
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found.update(HTML_ANCHOR.findall(text))
    return found


def links(text: str) -> list[str]:
    """Link targets in prose: inline and reference links, images, HTML href/src; code is skipped."""
    prose = CODE_SPAN.sub("", "\n".join(prose_lines(text)))
    return INLINE_LINK.findall(prose) + REF_DEF.findall(prose) + HTML_LINK.findall(prose)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with each relative link of `page`: a missing file, a path outside the repository,
    or a #fragment that no heading of the target page produces."""
    problems: list[str] = []
    text = page.read_text(encoding="utf-8")
    for target in links(text):
        if not target or SCHEME.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        path_part = unquote(path_part.split("?", 1)[0])
        if not path_part:
            dest = page
        elif path_part.startswith("/"):
            dest = (root / path_part.lstrip("/")).resolve()
        else:
            dest = (page.parent / path_part).resolve()
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{target}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file {dest.relative_to(root.resolve())}")
        elif fragment and dest.suffix.lower() == ".md":
            if unquote(fragment) not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{target}: no heading with anchor #{fragment} in {dest.name}")
        elif fragment and dest.is_dir():
            problems.append(f"{target}: a #fragment on a folder")
    return problems


def settings_variables() -> set[str]:
    """Every IMGCLF_* name service/settings.py spells out, plus IMGCLF_<FIELD> for each model field
    (Settings.from_env maps fields to variables that way, so most names never appear literally)."""
    text = SETTINGS.read_text(encoding="utf-8")
    names = set(ENV_NAME.findall(text))
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                        and not item.target.id.startswith("_") and item.target.id != "model_config"
                        and "ClassVar" not in ast.unparse(item.annotation)):
                    names.add(f"IMGCLF_{item.target.id.upper()}")
    return names


def config_table() -> dict[str, str]:
    """docs/serving.md's configuration rows: variable -> its documented default (backticks stripped)."""
    rows: dict[str, str] = {}
    for line in CONFIG_TABLE.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (m := re.fullmatch(r"`(IMGCLF_[A-Z0-9_]+)`", cells[0])):
            rows[m.group(1)] = cells[1].strip("`")
    return rows


def default_matches(documented: str, default: object) -> bool:
    """A number must be the same number, a word the same word; no value (None, an empty list) is
    written as a parenthesised phrase such as `(unset)`."""
    if default is None or default == [] or default == ():
        return documented.startswith("(")
    if isinstance(default, bool):
        return documented.lower() == str(default).lower()
    if isinstance(default, int | float):
        try:
            return float(documented) == float(default)
        except ValueError:
            return False
    return documented == str(default)


# --- the checker itself can fail --------------------------------------------------------------------

def test_slugs_follow_githubs_rules() -> None:
    assert slug("Preprocessing: the one path") == "preprocessing-the-one-path"
    assert slug("What `image_to_tensor(bytes, spec)` does") == "what-image_to_tensorbytes-spec-does"
    assert slug("[Export](x.md) and int8/fp16") == "export-and-int8fp16"
    text = "# Notes\n\n## Notes\n\n```bash\n# not a heading\n```\n\nNotes\n-----\n"
    assert anchors(text) == {"notes", "notes-1", "notes-2"}


def test_broken_links_and_anchors_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Real heading\n")
    page = tmp_path / "docs" / "a.md"
    page.write_text("# A\n[ok](b.md#real-heading) [self](#a) [web](https://example.com/x) `[code](gone.md)`\n"
                    "[missing](gone.md) [bad anchor](b.md#no-such) [escape](../../etc/passwd)\n"
                    "```\n[in a fence](gone-too.md)\n```\n")
    problems = broken_links(page, root=tmp_path)
    assert len(problems) == 3, problems
    assert any("gone.md" in p for p in problems) and any("#no-such" in p for p in problems)
    assert any("outside" in p for p in problems)


# --- the real docs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert not broken_links(page), f"{page.relative_to(ROOT)}: " + "; ".join(broken_links(page))


def test_every_docs_page_is_in_the_index() -> None:
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    listed = {Path(t.partition("#")[0]).name for t in links(index)}
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name != "README.md" and p.name not in listed]
    assert not missing, f"docs/README.md does not link {missing}"


def test_every_setting_is_documented() -> None:
    names = settings_variables()
    assert len(names) >= 20, f"found only {sorted(names)} in {SETTINGS}: has the way settings are declared changed?"
    docs = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md"))
    assert not [n for n in sorted(names) if f"`{n}`" not in docs], "IMGCLF_* variables missing from docs/"
    rows = config_table()
    missing = sorted(names - rows.keys())
    assert not missing, f"no row in the configuration table of {CONFIG_TABLE.relative_to(ROOT)}: {missing}"


def test_documented_defaults_are_the_codes() -> None:
    from service import settings as module

    wrong = []
    for cls in vars(module).values():
        if not (isinstance(cls, type) and cls.__module__ == module.__name__ and hasattr(cls, "model_fields")):
            continue
        for name, field in cls.model_fields.items():
            alias = field.alias if field.alias and field.alias.startswith("IMGCLF_") else None
            env = alias or f"IMGCLF_{name.upper()}"
            documented = config_table().get(env)
            default = field.get_default(call_default_factory=True)
            if documented is not None and not default_matches(documented, default):
                wrong.append(f"{env}: docs say {documented!r}, code has {default!r}")
    assert not wrong, "; ".join(wrong)
