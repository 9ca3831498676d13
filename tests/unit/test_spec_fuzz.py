"""Fuzz the spec loader: whatever a file holds, ``load_fleet`` returns a Fleet or raises SpecError.

Nothing else may escape (no TypeError, RecursionError, yaml error ...), and every problem it
reports points into the spec file with a message. Two generators: (a) arbitrary text and bytes,
YAML-looking token soup, deep nesting, alias bombs and splices of the lab spec; (b) structured
mutations of the parsed lab spec, dumped back to YAML.

Inputs that once crashed the loader are kept as plain regression tests at the end.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from provisioner.errors import SpecError
from provisioner.spec import Fleet, load_fleet
from tests.conftest import LAB_SPEC

LAB_TEXT = LAB_SPEC.read_text(encoding="utf-8")
LAB_DATA = yaml.safe_load(LAB_TEXT)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file every example overwrites (hypothesis runs examples one after another)."""
    return tmp_path_factory.mktemp("fuzz") / "fleet.yaml"


def _check_outcome(path: Path) -> Fleet | SpecError:
    """Load ``path``; fail on anything but a Fleet or a well-formed SpecError."""
    try:
        return load_fleet(path)
    except SpecError as exc:
        assert exc.problems, "a SpecError must carry at least one problem"
        errors = [p for p in exc.problems if p.severity == "error"]
        assert errors, "a SpecError must carry at least one error, not only warnings"
        for problem in exc.problems:
            assert problem.message.strip(), f"empty message: {problem!r}"
            assert problem.location.line >= 0, f"negative line: {problem!r}"
            assert problem.location.column >= 0, f"negative column: {problem!r}"
            assert Path(problem.location.file).resolve() == path.resolve(), (
                f"problem points at {problem.location.file!r}, not the spec: {problem}"
            )
            assert problem.severity in ("error", "warning")
        return exc


# --------------------------------------------------------------------------- (a) arbitrary text

_TOKENS = [
    "version: 1\n",
    "metadata:\n",
    "  site: lab\n",
    "racks:\n",
    "  - ",
    "- ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    ": ",
    ":",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "? ",
    "&a ",
    "&b ",
    "*a",
    "*b",
    "<<: *a\n",
    "<<: ",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "%TAG !e! tag:example.com,2000:\n",
    "!e!thing ",
    "!local ",
    "!!str ",
    "!!map ",
    "!!seq ",
    "!!binary ",
    "!!set ",
    "!!omap ",
    "!!pairs ",
    "!!null ",
    "!!merge ",
    "!!python/object:os.system ",
    "!!int ",
    "!!float ",
    "!!timestamp ",
    "!!binary é",
    "|\n",
    ">-\n",
    "'",
    '"',
    "\\",
    "# comment\n",
    "\x00",
    "\x07",
    "\x1b",
    "\ufeff",
    "\u2028",
    "\x85",
    "\U0001f600",
    "~",
    "null",
    "true",
    "no",
    ".inf",
    "-.nan",
    "0x1F",
    "0o17",
    "0b101",
    "0777",
    "1_000",
    "1:30:00",
    "1e999999",
    "-1e-999999",
    "2001-12-14",
    "2001-12-14 21:59:43.10 -5",
    "2001-13-45",
    "2024-02-30",
    "2001-12-14t21:59:43.10-25:00",
    "0b_",
    "0x_",
    "=",
    "<<",
    "gpu-lab-01",
    "ipmi://10.200.0.1:9001",
    "redfish+https://[fd00::1]/redfish/v1/Systems/1",
    "env:X",
    "file:/nonexistent",
    "02:00:0a:c8:00:0b",
    "10.200.0.11",
    "10.200.0.0/24",
]

_huge_numbers = st.integers(min_value=1, max_value=5000).flatmap(
    lambda digits: st.sampled_from(["", "-", "+"]).map(lambda sign: sign + "9" * digits)
)

_token_soup = st.lists(
    st.sampled_from(_TOKENS) | st.text(max_size=8) | _huge_numbers, max_size=60
).map("".join)


@st.composite
def _deep_nesting(draw: st.DrawFn) -> str:
    # Far below the ~30,000 levels that crash libyaml's composer (see test_cli.py).
    depth = draw(st.integers(min_value=1, max_value=3000))
    kind = draw(st.sampled_from(["flow-seq", "flow-map", "block-map", "block-seq", "mixed"]))
    if kind == "flow-seq":
        return "[" * depth + "]" * depth
    if kind == "flow-map":
        return "{a: " * depth + "1" + "}" * depth
    if kind == "block-map":
        depth = min(depth, 400)
        return "".join("  " * i + "a:\n" for i in range(depth)) + "  " * depth + "1\n"
    if kind == "block-seq":
        depth = min(depth, 400)
        return "".join("  " * i + "-\n" for i in range(depth)) + "  " * depth + "1\n"
    return "version: 1\nracks: " + "[{nodes: " * depth + "[]" + "}]" * depth + "\n"


@st.composite
def _alias_bomb(draw: st.DrawFn) -> str:
    """A small "billion laughs": each level lists the previous one ``fanout`` times."""
    levels = draw(st.integers(min_value=1, max_value=5))
    fanout = draw(st.integers(min_value=1, max_value=9))
    as_maps = draw(st.booleans())
    lines = ['l0: &l0 ["lol", "lol"]']
    for level in range(1, levels):
        if as_maps:
            items = ", ".join(f"k{i}: *l{level - 1}" for i in range(fanout))
            lines.append(f"l{level}: &l{level} {{{items}}}")
        else:
            lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * fanout) + "]")
    where = draw(st.sampled_from(["top", "racks", "metadata", "merge"]))
    if where == "racks":
        lines.append(f"racks: *l{levels - 1}")
    elif where == "metadata":
        lines.append(f"metadata: {{site: lab, description: *l{levels - 1}}}")
    elif where == "merge":
        lines.append("base: &base {site: lab}")
        lines.append("metadata: {<<: [*base, *base], description: x}")
    return "\n".join(lines) + "\n"


@st.composite
def _lab_splice(draw: st.DrawFn) -> str:
    """The lab spec with a stretch replaced by random text (reaches the deeper checks)."""
    start = draw(st.integers(min_value=0, max_value=len(LAB_TEXT)))
    length = draw(st.integers(min_value=0, max_value=40))
    filler = draw(st.sampled_from(_TOKENS) | st.text(max_size=20))
    return LAB_TEXT[:start] + filler + LAB_TEXT[start + length :]


_any_text = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
    _token_soup,
    _deep_nesting(),
    _alias_bomb(),
    _lab_splice(),
)


@FUZZ
@given(text=_any_text)
@example(text="")
@example(text="\x00")
@example(text="\t- a\n\t- b\n")
@example(text="a: &a [*a]\n")
@example(text="a: &a {<<: *a}\n")
@example(text="? [a, b]\n: c\n")
@example(text="1: x\ntrue: y\nnull: z\n")
@example(text="version: " + "9" * 4000 + "\n")
@example(text="version: 1\nversion: 1\n")
@example(text="--- a\n--- b\n")
@example(text="[" * 3000 + "]" * 3000)
@example(text=LAB_TEXT)
def test_any_text_gives_a_fleet_or_a_spec_error(spec_file: Path, text: str) -> None:
    spec_file.write_text(text, encoding="utf-8")
    _check_outcome(spec_file)


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"\xff\xfe\x00\x00")
@example(data=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
@example(data=b"version: 1\n\xc3\x28\n")
@example(data=b"\xef\xbb\xbfversion: 1\n")
def test_any_bytes_give_a_fleet_or_a_spec_error(spec_file: Path, data: bytes) -> None:
    spec_file.write_bytes(data)
    _check_outcome(spec_file)


def test_billion_laughs_is_refused(spec_file: Path) -> None:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    spec_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"too large|too far"):
        load_fleet(spec_file)


def test_aliases_nesting_too_deep_are_reported_at_the_deepest_alias(spec_file: Path) -> None:
    lines = ["version: 1", "x0: &x0 [a]"]
    lines += [f"x{i}: &x{i} [*x{i - 1}]" for i in range(1, 800)]
    spec_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    outcome = _check_outcome(spec_file)
    assert isinstance(outcome, SpecError)
    (problem,) = outcome.problems
    assert problem.location.line == 801
    assert "aliases nest too deeply" in problem.message and "*x798" in problem.message


# --------------------------------------------------------------------------- (b) mutations


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


LAB_PATHS = _paths(LAB_DATA)

# Field names the spec knows (and a few it does not), so inserted keys reach real validators.
# "manifest" is left out on purpose: it would point the loader at other files.
_FIELD_NAMES = sorted(
    {str(p[-1]) for p in LAB_PATHS if p and isinstance(p[-1], str)}
    | {
        "ranges",
        "first_ip",
        "first_mac",
        "first_bmc",
        "first_index",
        "bmc_step",
        "bmc_protocol",
        "count",
        "serials",
        "location",
        "bmc_mac",
        "callback_key",
        "terraform",
        "backend",
        "conn_str",
        "scheduler",
        "type",
        "kubeconfig",
        "render",
        "templates",
        "mtu",
        "dhcp",
        "kernel_args",
        "repo_url",
        "mirror_url",
        "floors",
        "gemm_tflops",
        "branch",
        "keyring",
        "max_unavailable_per_rack",
        "drain_timeout",
        "unknown_field",
    }
)

# Values that look like what the spec holds, so mutations pass the type checks and reach the
# cross-checks (duplicates, address plans, references).
_DOMAIN_VALUES = [
    "gpu-lab-01",
    "gpu-lab-05",
    "lab1",
    "hgx-h100",
    "h100-580",
    "ubuntu-2404",
    "H100-SXM5-80GB",
    "B200-HGX-180GB",
    "10.200.0.11",
    "10.200.0.1",
    "10.200.0.200",
    "10.200.0.255",
    "10.201.0.5",
    "10.200.0.0/24",
    "10.200.0.0/16",
    "02:00:0a:c8:00:0b",
    "03:00:0a:c8:00:0b",
    "ipmi://127.0.0.1:9001",
    "ipmi://10.9.9.9",
    "redfish+https://bmc1/redfish/v1/Systems/1",
    "redfish+https://[fd00::1]:8443",
    "env:PROVISIONER_LAB_BMC_PASSWORD",
    "file:/nonexistent/secret",
    "literal-password",
    "570.133.20",
    "535.54.03",
    "12.8",
    "13.0",
    "99.9",
    "10%",
    "0%",
    "open",
    "proprietary",
    "ubuntu",
    "rocky",
    "24.04",
    "http://10.200.0.1:8080/",
    "gpu-r01-{index:02d}",
    "{rack}-{index}",
    "xid_79",
    "",
]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(_DOMAIN_VALUES),
)
_keys = st.sampled_from(_FIELD_NAMES) | st.text(max_size=12)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=12,
)
_random_edit = st.tuples(
    st.sampled_from(["replace", "delete", "insert"]),
    st.sampled_from(LAB_PATHS),
    _keys,
    st.integers(min_value=0, max_value=10),
    _values,
)


def _field(*choices: object) -> st.SearchStrategy[Any]:
    return st.sampled_from(choices) | _scalars


# Whole nodes and ranges built from plausible parts, so the expansion and the cross-checks
# (duplicates, address plans, BMC counting) see many near-valid inputs.
_node = st.fixed_dictionaries(
    {
        "name": _field("gpu-lab-01", "gpu-lab-05", "gpu-lab-06"),
        "ip": _field("10.200.0.11", "10.200.0.15", "10.200.0.16", "10.200.0.220", "10.9.0.1"),
        "mac": _field("02:00:0a:c8:00:0b", "02:00:0a:c8:00:1f", "02:00:0a:c8:00:20"),
        "bmc": _field("ipmi://127.0.0.1:9001", "ipmi://127.0.0.1:9005", "ipmi://10.9.9.9"),
    },
    optional={
        "serial": _field("LAB0001", "LAB0009"),
        "bmc_mac": _field("02:00:0a:c8:00:0b", "02:00:0a:c8:01:0b"),
        "profile": _field("hgx-h100", "nope"),
        "stack": _field("h100-580", "nope"),
        "image": _field("ubuntu-2404", "nope"),
    },
)
_range = st.fixed_dictionaries(
    {
        "name": _field("gpu-x-{index:02d}", "{rack}-{index}", "gpu-lab-{index:02d}", "x{index:c}"),
        "count": st.integers(min_value=-1, max_value=40),
        "first_ip": _field("10.200.0.11", "10.200.0.100", "10.200.0.254", "255.255.255.250"),
    },
    optional={
        "first_mac": _field("02:00:0a:c8:00:0b", "02:00:00:00:01:00", "fe:ff:ff:ff:ff:fe"),
        "first_bmc": _field("ipmi://127.0.1.1", "ipmi://127.0.0.1:9001", "ipmi://bmc1:65530"),
        "bmc_step": _field("address", "port"),
        "first_index": st.integers(min_value=-1, max_value=10**6),
        "bmc_protocol": _field("ipmi", "redfish"),
        "serials": st.lists(_field("LAB0001", "S1"), max_size=3),
    },
)
_add_node = st.tuples(
    st.just("insert"), st.just(("racks", 0, "nodes")), st.just(""), st.integers(0, 5), _node
)
_add_range = st.tuples(
    st.just("insert"),
    st.just(("racks", 0)),
    st.just("ranges"),
    st.just(0),
    st.lists(_range, min_size=1, max_size=2),
)
_mutation = st.one_of(_random_edit, _add_node, _add_range)


def _apply(data: Any, mutation: tuple[str, tuple[Any, ...], str, int, Any]) -> Any:
    operation, path, key, index, value = mutation
    parent: Any = None
    target: Any = data
    for part in path:
        parent = target
        present = (
            part in target
            if isinstance(target, dict)
            else (isinstance(target, list) and isinstance(part, int) and part < len(target))
        )
        if not present:
            return data  # an earlier mutation removed this path
        target = target[part]
    if operation == "insert":
        if isinstance(target, dict):
            target[key] = value
        elif isinstance(target, list):
            target.insert(index, value)
        return data
    if not path:
        return value if operation == "replace" else data
    if operation == "replace":
        parent[path[-1]] = value
    else:
        del parent[path[-1]]
    return data


@FUZZ
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_lab_spec_gives_a_fleet_or_a_spec_error(
    spec_file: Path, mutations: list[tuple[str, tuple[Any, ...], str, int, Any]]
) -> None:
    data = copy.deepcopy(LAB_DATA)
    for mutation in mutations:
        data = _apply(data, mutation)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    spec_file.write_text(text, encoding="utf-8")
    _check_outcome(spec_file)


def test_unmutated_lab_spec_round_trips_to_a_fleet(spec_file: Path) -> None:
    """The mutation harness starts from a valid spec: dumping it back must still load."""
    spec_file.write_text(yaml.safe_dump(LAB_DATA, sort_keys=False), encoding="utf-8")
    outcome = _check_outcome(spec_file)
    assert isinstance(outcome, Fleet)
    assert [node.name for node in outcome.nodes] == [f"gpu-lab-0{i}" for i in range(1, 5)]


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("racks", 0, "nodes", 1, "ip"), "10.200.0.11", "racks[0].nodes[1].ip"),
        (("racks", 0, "nodes", 0, "mac"), "not-a-mac", "racks[0].nodes[0].mac"),
        (("bmc", "password"), "literal-password", "bmc.password"),
        (("profiles", "hgx-h100", "gpus"), 99, "profiles.hgx-h100.gpus"),
        (("racks", 0, "stack"), "h100-999", "racks[0].stack"),
    ],
)
def test_mutation_is_reported_at_its_field_and_line(
    spec_file: Path, path: tuple[Any, ...], value: Any, field: str
) -> None:
    """The harness's SpecError check is not vacuous: a known-bad mutation is found, at its
    written line, under its field path."""
    data = _apply(copy.deepcopy(LAB_DATA), ("replace", path, "", 0, value))
    text = yaml.safe_dump(data, sort_keys=False)
    spec_file.write_text(text, encoding="utf-8")
    outcome = _check_outcome(spec_file)
    assert isinstance(outcome, SpecError)
    matching = [p for p in outcome.problems if p.path == field]
    assert matching, [str(p) for p in outcome.problems]
    line = matching[0].location.line
    assert line > 0
    leaf = str(path[-1])
    assert f"{leaf}:" in text.splitlines()[line - 1]


# --------------------------------------------------------------------------- regressions

# Scalars PyYAML's constructors reject with ValueError/OverflowError; they once escaped
# load_fleet as those exceptions.
FORMER_CRASHES = {
    "impossible date value": "version: 2001-13-45\n",
    "impossible date key": "2024-02-30: x\n",
    "timestamp offset over 24h": "version: 2001-12-14t21:59:43.10-25:00\n",
    "binary prefix without digits": "version: 0b_\n",
    "hex prefix without digits": "version: 0x_\n",
    "explicit int tag": "version: !!int one\n",
    "explicit float tag": 'version: !!float "one"\n',
    "explicit timestamp tag on plain text": "version: !!timestamp soon\n",
    "quoted impossible timestamp": 'version: !!timestamp "2001-13-45"\n',
    "integer over 4300 digits": "version: " + "1" * 5000 + "\n",
    "non-ASCII base64": "version: !!binary é\n",
}


@pytest.mark.parametrize("text", FORMER_CRASHES.values(), ids=FORMER_CRASHES.keys())
def test_scalars_yaml_cannot_construct_give_a_spec_error(spec_file: Path, text: str) -> None:
    spec_file.write_text(text, encoding="utf-8")
    outcome = _check_outcome(spec_file)
    assert isinstance(outcome, SpecError)
    assert any(p.location.line == 1 for p in outcome.problems)


TAGGED_JUNK = {
    "bool tag on a non-bool": "version: !!bool maybe\n",
    "bool tag on an empty key": "!!bool : 1\n",
    "timestamp tag on quoted text": 'version: !!timestamp "soon"\n',
    "int tag on nothing": "version: !!int\n",
    "int tag on a lone sign": "version: !!int '-'\n",
    "float tag on an empty string": 'version: !!float ""\n',
    "float tag on an underscore": "racks: [!!float '_']\n",
}


@pytest.mark.parametrize("text", TAGGED_JUNK.values(), ids=TAGGED_JUNK.keys())
def test_tagged_junk_gives_a_spec_error(spec_file: Path, text: str) -> None:
    spec_file.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError):
        load_fleet(spec_file)


_BAD_BMC_HOST = LAB_TEXT.replace('"ipmi://127.0.0.1:9001"', '"ipmi://²7.0.0.1:9001"')


def test_non_ascii_digit_in_a_bmc_host_gives_a_spec_error(spec_file: Path) -> None:
    assert _BAD_BMC_HOST != LAB_TEXT
    spec_file.write_text(_BAD_BMC_HOST, encoding="utf-8")
    with pytest.raises(SpecError):
        load_fleet(spec_file)


def test_name_pattern_width_does_not_blow_up_the_message(spec_file: Path) -> None:
    data = copy.deepcopy(LAB_DATA)
    data["racks"][0]["ranges"] = [
        {
            "name": "g{index:10000000}",
            "count": 1,
            "first_ip": "10.200.0.50",
            "first_mac": "02:00:00:00:01:01",
            "first_bmc": "ipmi://127.0.1.1",
        }
    ]
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    outcome = _check_outcome(spec_file)
    assert isinstance(outcome, SpecError)
    assert max(len(str(problem)) for problem in outcome.problems) < 1000


def _with_range(name: str, first_index: int = 1) -> str:
    data = copy.deepcopy(LAB_DATA)
    data["racks"][0]["ranges"] = [
        {
            "name": name,
            "count": 2,
            "first_index": first_index,
            "first_ip": "10.200.0.50",
            "first_mac": "02:00:00:00:01:01",
            "first_bmc": "ipmi://127.0.1.1",
        }
    ]
    return yaml.safe_dump(data, sort_keys=False)


def test_range_with_a_plain_pattern_loads(spec_file: Path) -> None:
    """Control for the two tests below: the same range with an ordinary pattern is valid."""
    spec_file.write_text(_with_range("g{index}", 2_000_000), encoding="utf-8")
    fleet = _check_outcome(spec_file)
    assert isinstance(fleet, Fleet)
    assert [node.name for node in fleet.nodes][-2:] == ["g2000000", "g2000001"]


def test_character_name_pattern_past_unicode_gives_a_spec_error(spec_file: Path) -> None:
    spec_file.write_text(_with_range("x{index:c}", 2_000_000), encoding="utf-8")
    assert isinstance(_check_outcome(spec_file), SpecError)


def test_name_pattern_that_adds_a_newline_gives_a_spec_error(spec_file: Path) -> None:
    spec_file.write_text(_with_range("g{index:\n<2}"), encoding="utf-8")
    outcome = _check_outcome(spec_file)
    assert isinstance(outcome, SpecError), [node.name for node in outcome.nodes]
