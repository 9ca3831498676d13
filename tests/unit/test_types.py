"""The spec's small value types: MACs, BMC URLs, secret references, counts, SSH keys, versions.

Each type is checked through what the spec uses: the validator function or the pydantic
annotated type, exactly as a model field would apply it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from provisioner.errors import SecretError
from provisioner.spec.types import (
    BmcEndpoint,
    BmcUrl,
    CountOrPercent,
    CountPercent,
    DriverVersion,
    MacAddress,
    Secret,
    SecretRef,
    SshPublicKey,
    Version,
    check_name,
    ipv4_int,
    ipv4_plus,
    mac_plus,
    normalize_mac,
    parse_bmc_url,
    parse_count_or_percent,
    parse_secret_ref,
    version_tuple,
)

# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("written", "expected"),
    [("gpu-lab-01", "gpu-lab-01"), ("a", "a"), (7, "7"), ("x" * 63, "x" * 63)],
)
def test_dns_label_names_are_accepted(written: object, expected: str) -> None:
    assert check_name(written) == expected


@pytest.mark.parametrize(
    "written", ["", "-gpu", "gpu-", "GPU-01", "gpu_01", "gpu.01", "x" * 64, "gpu 01", True, None]
)
def test_names_that_are_not_dns_labels_are_refused(written: object) -> None:
    with pytest.raises(ValueError):
        check_name(written)


def test_name_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ValueError):
        check_name("gpu-01\n")


# --------------------------------------------------------------------------- MAC addresses


@pytest.mark.parametrize(
    "written",
    [
        "aa:bb:cc:dd:ee:ff",
        "AA:BB:CC:DD:EE:FF",
        "aa-bb-cc-dd-ee-ff",
        "AA-BB-CC-DD-EE-FF",
        "aabb.ccdd.eeff",
        "AABB.CCDD.EEFF",
        "aabbccddeeff",
        "AaBbCcDdEeFf",
        "  aa:bb:cc:dd:ee:ff\n",
    ],
)
def test_mac_spellings_normalise_to_lowercase_colons(written: str) -> None:
    assert normalize_mac(written) == "aa:bb:cc:dd:ee:ff"
    assert TypeAdapter(MacAddress).validate_python(written) == "aa:bb:cc:dd:ee:ff"


@pytest.mark.parametrize(
    "multicast", ["01:00:5e:00:00:01", "33:33:00:00:00:01", "ff:ff:ff:ff:ff:ff", "0300.0000.0001"]
)
def test_multicast_mac_is_refused(multicast: str) -> None:
    with pytest.raises(ValueError, match="multicast"):
        normalize_mac(multicast)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "aa:bb:cc:dd:ee",
        "aa:bb:cc:dd:ee:ff:00",
        "aa:bb-cc:dd:ee:ff",  # mixed separators
        "gg:bb:cc:dd:ee:ff",
        "a:b:c:d:e:f",
        "aa.bb.cc.dd.ee.ff",
        "aabbccddeef",
        "aabbccddeeff00",
        "aa:bb:cc:dd:ee:ff junk",
    ],
)
def test_malformed_mac_is_refused(garbage: str) -> None:
    with pytest.raises(ValueError, match="not a MAC address"):
        normalize_mac(garbage)


@pytest.mark.parametrize("not_text", [None, 12, 0xAABBCCDDEEFF, ["aa:bb:cc:dd:ee:ff"]])
def test_mac_that_is_not_text_is_refused(not_text: object) -> None:
    with pytest.raises(ValueError, match="as text"):
        normalize_mac(not_text)
    with pytest.raises(ValidationError):
        TypeAdapter(MacAddress).validate_python(not_text)


def test_mac_plus_counts_across_octets() -> None:
    assert mac_plus("02:00:00:00:00:0b", 0) == "02:00:00:00:00:0b"
    assert mac_plus("02:00:00:00:00:0b", 1) == "02:00:00:00:00:0c"
    assert mac_plus("02:00:00:00:00:ff", 1) == "02:00:00:00:01:00"
    assert mac_plus("02:ff:ff:ff:ff:ff", 1) == "03:00:00:00:00:00"
    assert mac_plus("ff:ff:ff:ff:ff:fe", 1) == "ff:ff:ff:ff:ff:ff"


def test_mac_plus_refuses_to_run_past_the_last_address() -> None:
    with pytest.raises(ValueError, match="overflows"):
        mac_plus("ff:ff:ff:ff:ff:fe", 2)


# --------------------------------------------------------------------------- BMC URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ipmi://10.0.0.5", BmcEndpoint("ipmi", "10.0.0.5", 623)),
        ("ipmi://10.0.0.5/", BmcEndpoint("ipmi", "10.0.0.5", 623)),
        ("ipmi://127.0.0.1:9001", BmcEndpoint("ipmi", "127.0.0.1", 9001)),
        ("IPMI://BMC-01.Example.NET", BmcEndpoint("ipmi", "bmc-01.example.net", 623)),
        ("redfish+https://bmc1", BmcEndpoint("redfish", "bmc1", 443)),
        ("redfish+https://bmc1:8443", BmcEndpoint("redfish", "bmc1", 8443)),
        (
            "redfish+https://bmc1:8443/redfish/v1/Systems/1",
            BmcEndpoint("redfish", "bmc1", 8443, "/redfish/v1/Systems/1"),
        ),
        (
            "redfish+https://bmc1/redfish/v1/Systems/System.Embedded.1/",
            BmcEndpoint("redfish", "bmc1", 443, "/redfish/v1/Systems/System.Embedded.1"),
        ),
        ("redfish+https://[fd00::5]", BmcEndpoint("redfish", "fd00::5", 443)),
        (
            "redfish+https://[fd00::5]:8000/redfish/v1/Systems/a",
            BmcEndpoint("redfish", "fd00::5", 8000, "/redfish/v1/Systems/a"),
        ),
        ("ipmi://[::1]:9001", BmcEndpoint("ipmi", "::1", 9001)),
        ("  ipmi://10.0.0.5  ", BmcEndpoint("ipmi", "10.0.0.5", 623)),
    ],
)
def test_bmc_url_is_parsed(url: str, expected: BmcEndpoint) -> None:
    assert parse_bmc_url(url) == expected
    assert TypeAdapter(BmcUrl).validate_python(url) == expected


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        ("ipmi://10.0.0.5:623", "ipmi://10.0.0.5"),
        ("ipmi://10.0.0.5:9001", "ipmi://10.0.0.5:9001"),
        ("redfish+https://bmc1:443/", "redfish+https://bmc1"),
        ("redfish+https://[fd00::5]:8443", "redfish+https://[fd00::5]:8443"),
        (
            "redfish+https://bmc1/redfish/v1/Systems/1/",
            "redfish+https://bmc1/redfish/v1/Systems/1",
        ),
    ],
)
def test_bmc_url_round_trips_to_its_canonical_spelling(url: str, canonical: str) -> None:
    endpoint = parse_bmc_url(url)
    assert endpoint.url == canonical
    assert TypeAdapter(BmcUrl).dump_python(endpoint) == canonical
    assert parse_bmc_url(canonical) == endpoint


@pytest.mark.parametrize(
    "url",
    [
        "ipmi://admin:S3cr3t-BMC-pw@10.0.0.5",
        "ipmi://admin:S3cr3t-BMC-pw@10.0.0.5:623",
        "ipmi://:S3cr3t-BMC-pw@10.0.0.5",
        "redfish+https://root:S3cr3t-BMC-pw@bmc1/redfish/v1/Systems/1",
        "redfish+https://root:S3cr3t-BMC-pw@[fd00::5]:8443",
        "redfish+http://root:S3cr3t-BMC-pw@bmc1",
        "gopher://root:S3cr3t-BMC-pw@bmc1",
        # A password holding URL delimiters must not be split into "port" or "path" parts.
        "ipmi://admin:S3cr3t-BMC-pw#1@10.0.0.5",
        "ipmi://admin:S3cr3t-BMC-pw/1@10.0.0.5",
        "redfish+https://root:S3cr3t-BMC-pw?1@bmc1",
        "ipmi:admin:S3cr3t-BMC-pw@10.0.0.5",
        "admin:S3cr3t-BMC-pw@10.0.0.5",
    ],
)
def test_credentials_in_a_bmc_url_are_refused_without_echoing_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="credentials are not allowed") as caught:
        parse_bmc_url(url)
    assert "S3cr3t-BMC-pw" not in str(caught.value)


@pytest.mark.parametrize("url", ["ipmi://admin@10.0.0.5", "redfish+https://root@bmc1"])
def test_a_user_name_in_a_bmc_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="credentials are not allowed"):
        parse_bmc_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ssh://10.0.0.5", "unknown BMC scheme 'ssh'"),
        ("10.0.0.5", "has no scheme: write ipmi://10.0.0.5 or redfish"),
        ("bmc1:623", "has no scheme: write ipmi://bmc1:623"),
        ("idrac://10.0.0.5", "unknown BMC scheme 'idrac'"),
        ("redfish+http://bmc1", "use redfish\\+https://"),
        ("redfish://bmc1", "use redfish\\+https://"),
        ("https://bmc1", "use redfish\\+https://"),
        ("http://bmc1", "use redfish\\+https://"),
        ("ipmi://10.0.0.5/redfish/v1/Systems/1", "an ipmi:// URL has no path"),
        ("ipmi://10.0.0.5/x", "an ipmi:// URL has no path"),
        ("ipmi://10.0.0.5?timeout=3", "takes no query or fragment"),
        ("redfish+https://bmc1/redfish/v1/Systems/1?x=1", "takes no query or fragment"),
        ("redfish+https://bmc1#top", "takes no query or fragment"),
        ("redfish+https://bmc1/Systems/1", "looks like /redfish/v1/Systems/ID"),
        ("ipmi://", "has no host"),
        ("ipmi://10.0.0.5:70000", "not a valid BMC URL"),
        ("ipmi://10.0.0.5:port", "not a valid BMC URL"),
        ("redfish+https://[fd00::5", "not a valid BMC URL"),
    ],
)
def test_bad_bmc_url_is_refused_with_a_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bmc_url(url)


@pytest.mark.parametrize("value", [None, "", 623, ["ipmi://10.0.0.5"], {"host": "x"}])
def test_bmc_url_that_is_not_text_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="a BMC endpoint is a URL"):
        parse_bmc_url(value)


@pytest.mark.parametrize("url", ["ipmi://10.0.0.5:0", "redfish+https://bmc1:0"])
def test_bmc_port_zero_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_bmc_url(url)


@pytest.mark.parametrize("url", ["ipmi://bmc 01", "ipmi://bmc$(reboot)", "ipmi://bmc;01"])
def test_bmc_url_with_an_impossible_host_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_bmc_url(url)


# --------------------------------------------------------------------------- secret references


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("env:BMC_PASSWORD", SecretRef("env", "BMC_PASSWORD")),
        ("  env:_lower_ok9  ", SecretRef("env", "_lower_ok9")),
        ("file:/etc/provisioner/bmc", SecretRef("file", "/etc/provisioner/bmc")),
        ("file:secrets/bmc", SecretRef("file", "secrets/bmc")),
        ("file:~/bmc", SecretRef("file", "~/bmc")),
    ],
)
def test_secret_reference_is_parsed_and_written_back(written: str, expected: SecretRef) -> None:
    assert parse_secret_ref(written) == expected
    adapter = TypeAdapter(Secret)
    assert adapter.validate_python(written) == expected
    assert adapter.dump_python(expected) == str(expected) == written.strip()


@pytest.mark.parametrize(
    "literal", ["Hunter2-literal-secret", "Hunter2-literal-secret env:X", "vault:Hunter2-literal"]
)
def test_literal_secret_is_refused_without_echoing_it(literal: str) -> None:
    with pytest.raises(ValueError, match="literal secret is not allowed") as caught:
        parse_secret_ref(literal)
    assert "Hunter2" not in str(caught.value)


@pytest.mark.parametrize("value", [None, 123456, True, ["env:X"], "file:", ""])
def test_secret_that_is_not_a_reference_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="literal secret is not allowed"):
        parse_secret_ref(value)


@pytest.mark.parametrize("written", ["env:", "env:1BAD", "env:BAD-NAME", "env:TWO WORDS"])
def test_env_reference_must_name_a_variable(written: str) -> None:
    with pytest.raises(ValueError, match="must name an environment variable"):
        parse_secret_ref(written)


def test_env_secret_resolves_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISIONER_TEST_SECRET", "value-from-env")
    assert parse_secret_ref("env:PROVISIONER_TEST_SECRET").resolve() == "value-from-env"


def test_missing_env_secret_names_the_variable_but_no_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROVISIONER_TEST_SECRET", raising=False)
    monkeypatch.setenv("PROVISIONER_TEST_SECRET_OTHER", "decoy-value-7d1c")
    with pytest.raises(SecretError) as caught:
        SecretRef("env", "PROVISIONER_TEST_SECRET").resolve()
    message = str(caught.value)
    assert "PROVISIONER_TEST_SECRET" in message
    assert "not set" in message
    assert "decoy-value-7d1c" not in message


def test_file_secret_resolves_absolute_and_relative_paths(tmp_path: Path) -> None:
    secret = tmp_path / "bmc-password"
    secret.write_text("file-secret-value\n", encoding="utf-8")
    secret.chmod(0o600)
    assert SecretRef("file", str(secret)).resolve() == "file-secret-value"
    assert SecretRef("file", "bmc-password").resolve(base_dir=tmp_path) == "file-secret-value"


def test_secret_file_relative_to_home_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    secret = tmp_path / "bmc"
    secret.write_text("from-home\n", encoding="utf-8")
    secret.chmod(0o600)
    assert parse_secret_ref("file:~/bmc").resolve() == "from-home"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o777])
def test_file_secret_readable_by_others_is_refused_with_a_chmod_remedy(
    tmp_path: Path, mode: int
) -> None:
    secret = tmp_path / "bmc-password"
    secret.write_text("file-secret-value\n", encoding="utf-8")
    secret.chmod(mode)
    with pytest.raises(SecretError) as caught:
        SecretRef("file", str(secret)).resolve()
    message = str(caught.value)
    assert f"chmod 600 {secret}" in message
    assert "file-secret-value" not in message


def test_missing_file_secret_is_a_secret_error(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="cannot read file:"):
        SecretRef("file", str(tmp_path / "absent")).resolve()
    with pytest.raises(SecretError, match="cannot read file:absent"):
        SecretRef("file", "absent").resolve(base_dir=tmp_path)


# --------------------------------------------------------------------------- counts or percents


@pytest.mark.parametrize(
    ("written", "count", "percent"),
    [
        (1, 1.0, False),
        (4, 4.0, False),
        ("4", 4.0, False),
        (" 12 ", 12.0, False),
        ("10%", 10.0, True),
        ("10 %", 10.0, True),
        ("2.5%", 2.5, True),
        ("100%", 100.0, True),
    ],
)
def test_count_or_percent_is_parsed(written: object, count: float, percent: bool) -> None:
    parsed = parse_count_or_percent(written)
    assert parsed == CountOrPercent(count, percent)
    assert TypeAdapter(CountPercent).validate_python(written) == parsed


@pytest.mark.parametrize(
    ("written", "message"),
    [
        (0, "at least 1"),
        (-3, "at least 1"),
        ("0", "at least 1"),
        ("0%", "above 0 and at most 100"),
        ("101%", "above 0 and at most 100"),
        ("1000%", "give a count"),
        (True, "give a count"),
        (2.5, "give a count"),
        ("ten", "give a count"),
        ("10%%", "give a count"),
        ("-5%", "give a count"),
        (None, "give a count"),
    ],
)
def test_bad_count_or_percent_is_refused(written: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_count_or_percent(written)


@pytest.mark.parametrize(
    ("written", "total", "expected"),
    [
        (3, 100, 3),
        ("10%", 128, 12),
        ("10%", 5, 1),  # a positive percentage is at least one node
        ("100%", 7, 7),
        ("50%", 0, 0),
    ],
)
def test_count_or_percent_of_a_total(written: object, total: int, expected: int) -> None:
    assert parse_count_or_percent(written).of(total) == expected


def test_count_or_percent_serialises_as_written() -> None:
    adapter = TypeAdapter(CountPercent)
    assert adapter.dump_python(parse_count_or_percent("10%")) == "10%"
    assert adapter.dump_python(parse_count_or_percent(3)) == 3
    assert str(parse_count_or_percent("2.5%")) == "2.5%"


# --------------------------------------------------------------------------- SSH public keys


@dataclass(frozen=True)
class GeneratedKeys:
    ed25519_public: str
    rsa_public: str
    ed25519_private: str


@pytest.fixture(scope="module")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> GeneratedKeys:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen is not installed")
    folder = tmp_path_factory.mktemp("ssh")
    for kind, bits in (("ed25519", []), ("rsa", ["-b", "2048"])):
        subprocess.run(
            [keygen, "-q", "-t", kind, *bits, "-N", "", "-C", f"test {kind}", "-f", folder / kind],
            check=True,
            timeout=60,
        )
    return GeneratedKeys(
        ed25519_public=(folder / "ed25519.pub").read_text(encoding="ascii").strip(),
        rsa_public=(folder / "rsa.pub").read_text(encoding="ascii").strip(),
        ed25519_private=(folder / "ed25519").read_text(encoding="ascii"),
    )


def test_generated_public_keys_are_accepted(ssh_keys: GeneratedKeys) -> None:
    adapter = TypeAdapter(SshPublicKey)
    for key in (ssh_keys.ed25519_public, ssh_keys.rsa_public):
        assert adapter.validate_python(key) == key
        assert adapter.validate_python(f"  {key}\n") == key
    without_comment = " ".join(ssh_keys.ed25519_public.split()[:2])
    assert adapter.validate_python(without_comment) == without_comment


def test_private_key_is_refused(ssh_keys: GeneratedKeys) -> None:
    with pytest.raises(ValidationError, match="this is a private key"):
        TypeAdapter(SshPublicKey).validate_python(ssh_keys.ed25519_private)


def test_key_whose_data_is_of_another_type_is_refused(ssh_keys: GeneratedKeys) -> None:
    _, blob, comment = ssh_keys.ed25519_public.split(None, 2)
    with pytest.raises(ValidationError, match="not of type ssh-rsa"):
        TypeAdapter(SshPublicKey).validate_python(f"ssh-rsa {blob} {comment}")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "not an SSH public key"),
        ("ssh-ed25519", "not an SSH public key"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "not an SSH public key"),
        ("AAAAC3NzaC1lZDI1NTE5AAAAIJ6GFuN4SG+YD2Cp", "not an SSH public key"),
        ("ssh-ed25519 not*base64!", "base64 part is damaged"),
        ("ssh-ed25519 AAA=", "base64 part is damaged"),
        (42, "one line of text"),
    ],
)
def test_malformed_public_key_is_refused(key: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TypeAdapter(SshPublicKey).validate_python(key)


def test_two_keys_on_two_lines_are_refused(ssh_keys: GeneratedKeys) -> None:
    both = f"{ssh_keys.ed25519_public}\n{ssh_keys.rsa_public}"
    with pytest.raises(ValidationError, match="one line"):
        TypeAdapter(SshPublicKey).validate_python(both)


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize("written", ["570.133.20", "570.86", "535.261.03", " 580.65.06 "])
def test_driver_version_is_accepted(written: str) -> None:
    assert TypeAdapter(DriverVersion).validate_python(written) == written.strip()


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("570", "not an NVIDIA driver version"),
        (570, "not an NVIDIA driver version"),
        ("57.1", "not an NVIDIA driver version"),
        ("5700.1", "not an NVIDIA driver version"),
        ("570.133.20.1", "not an NVIDIA driver version"),
        ("r570", "not an NVIDIA driver version"),
        (570.86, "write a version as text"),
        (True, "a version is text"),
        (None, "a version is text"),
    ],
)
def test_bad_driver_version_is_refused(written: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TypeAdapter(DriverVersion).validate_python(written)


@pytest.mark.parametrize(
    ("written", "expected"),
    [("12.8", "12.8"), ("1.17.5", "1.17.5"), ("4.1.1-1", "4.1.1-1"), (12, "12"), ("9", "9")],
)
def test_version_is_accepted(written: object, expected: str) -> None:
    assert TypeAdapter(Version).validate_python(written) == expected


@pytest.mark.parametrize("written", ["", "v1.2", "1.2.3.4.5", "1..2", "1.2-", "latest", 12.8])
def test_bad_version_is_refused(written: object) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(Version).validate_python(written)


def test_version_tuple_orders_numerically() -> None:
    assert version_tuple("570.133.20") == (570, 133, 20)
    assert version_tuple("4.1.1-1") == (4, 1, 1)
    assert version_tuple("12.10") > version_tuple("12.9")
    assert version_tuple("580.65.06") > version_tuple("570.133.20")


# --------------------------------------------------------------------------- IPv4 helpers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.1", 1),
        ("10.200.0.11", int(IPv4Address("10.200.0.11"))),
        ("255.255.255.255", 2**32 - 1),
    ],
)
def test_ipv4_int_reads_dotted_quads(text: str, expected: int) -> None:
    assert ipv4_int(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "10.0.0", "10.0.0.1.2", "256.0.0.1", "010.0.0.1", "10.0.0.-1", "a.b.c.d", "bmc1", "::1"],
)
def test_ipv4_int_is_none_for_anything_else(text: str) -> None:
    assert ipv4_int(text) is None


@pytest.mark.parametrize("text", ["².0.0.1", "١.0.0.1"])
def test_ipv4_int_is_none_for_non_ascii_digits(text: str) -> None:
    assert ipv4_int(text) is None


def test_ipv4_plus_counts_up_to_the_last_address() -> None:
    assert ipv4_plus(IPv4Address("10.0.0.250"), 10) == IPv4Address("10.0.1.4")
    assert ipv4_plus(IPv4Address("255.255.255.250"), 5) == IPv4Address("255.255.255.255")


@pytest.mark.parametrize(("start", "offset"), [("255.255.255.250", 6), ("0.0.0.3", -4)])
def test_ipv4_plus_refuses_to_leave_the_address_space(start: str, offset: int) -> None:
    with pytest.raises(ValueError, match=re.escape("runs past 255.255.255.255")):
        ipv4_plus(IPv4Address(start), offset)
