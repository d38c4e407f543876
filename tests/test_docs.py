"""The documentation says what the code does: every flag `--help` lists is in the docs' tables with
its default, nothing else is, and every link between the pages leads somewhere."""

import re
from dataclasses import fields
from pathlib import Path

import pytest
from kserve import model_server

from predictor.__main__ import build_parser
from predictor.config import Config, env_name
from tools import docs_tables
from predictor.client.__main__ import parser as client_parser
from predictor.protocol import MODEL_PARAMETERS, OUTPUT_TYPES

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def table_flags(page: Path, header: str) -> dict[str, str]:
    """The first table under `header` in a page: its flags, each with its default column."""
    text = page.read_text().split(header, 1)[1]
    table = text[text.index("| flag |"):]
    table = table[:table.index("\n\n")]
    return {flag: default.strip() for flag, default in re.findall(r"^\| `(--[a-z_-]+)` \| ([^|]*) \|", table, re.M)}


def flags(parser) -> set[str]:
    """The flags a parser's --help lists."""
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", parser.format_help())) - {"--help"}


def own_options(parser, inherited=None, positional=()) -> dict[str, object]:
    """Each of the parser's own flags (those `inherited` has not) with its default, as parsing finds it."""
    defaults = vars(parser.parse_args(list(positional)))
    own = flags(parser) - (flags(inherited) if inherited is not None else set())
    return {flag: defaults[flag[2:].replace("-", "_")] for flag in own}


def documented_default_matches(documented: str, default: object) -> bool:
    """A number or a `literal` in the docs is held to the parser's default; words ("the server's") are not."""
    literal = documented.split(" ")[0].strip("`")
    if isinstance(default, bool) or default is None:
        return True
    if isinstance(default, (int, float)) and re.fullmatch(r"[\d.]+", literal):
        return float(literal) == float(default)
    if isinstance(default, str) and documented.startswith("`"):
        return literal == default
    return True


def test_every_server_flag_is_documented_with_its_default():
    # ours, and the one kserve flag the table lists because this server also reads it from the environment
    options = {**own_options(build_parser(environ={}), model_server.parser), "--model_name": "ast"}
    assert options == {f"--{setting.name}": setting.default for setting in fields(Config)}
    documented = table_flags(REPO / "docs" / "configuration.md", "## Configuration")
    assert set(options) == set(documented), (set(options) ^ set(documented))
    wrong = {flag: (documented[flag], options[flag]) for flag in options
             if not documented_default_matches(documented[flag], options[flag])}
    assert not wrong, wrong


def test_every_client_flag_is_documented_with_its_default():
    options = own_options(client_parser(), positional=["clip.wav"])
    documented = table_flags(REPO / "docs" / "api.md", "### The client")
    assert set(options) == set(documented), (set(options) ^ set(documented))
    wrong = {flag: (documented[flag], options[flag]) for flag in options
             if not documented_default_matches(documented[flag], options[flag])}
    assert not wrong, wrong


def test_every_request_parameter_and_output_is_documented():
    api = (REPO / "docs" / "api.md").read_text()
    parameters = api.split("## Parameters", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", parameters, re.M))
    assert set(MODEL_PARAMETERS) | {"sampling_rate"} == documented
    assert not [o["name"] for o in OUTPUT_TYPES if f"`{o['name']}`" not in api]


def test_every_server_flag_names_its_environment_variable_in_help():
    shown = re.sub(r"\s+", " ", build_parser(environ={}).format_help())
    missing = [setting.name for setting in fields(Config) if setting.name != "model_name"
               and f"--{setting.name}" in shown and f"Environment: {env_name(setting.name)}." not in shown]
    assert not missing, missing


def test_the_measurement_tables_are_the_results_files():
    """Every table of measurements in the docs is what `python -m tools.docs_tables` makes from the
    results file its marker names: none copied by hand, none out of date."""
    assert "<!-- results " in (REPO / "docs" / "performance.md").read_text()
    assert docs_tables.main(["--check"]) == 0, "run python -m tools.docs_tables (make docs-tables)"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_lead_somewhere(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor and linked.suffix == ".md":
            headings = {slug(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}
            assert anchor in headings, f"{page.name}: {target}"
