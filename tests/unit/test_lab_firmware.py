"""The lab firmware's iPXE interpreter against the real rendered scripts, served by the real
boot server on loopback: a known MAC chains to its script and boots the installer with the
rendered kernel command line; an unknown MAC leaves network boot as the chain script says."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from provisioner import boot
from provisioner.lab.installer import NO_BOOT, BootFailed, Ipxe, cmdline_value
from provisioner.render import render_fleet, write_tree
from provisioner.render.writer import site_key
from provisioner.spec import Fleet, load_fleet
from tests.conftest import LAB_SPEC


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, str]]:
    root = tmp_path_factory.mktemp("firmware")
    fleet = load_fleet(LAB_SPEC)
    write_tree(render_fleet(fleet, site_key(fleet, root / "render")), root / "render")
    kernel = root / "images/ubuntu-24.04"
    kernel.mkdir(parents=True)
    (kernel / "vmlinuz").write_bytes(b"kernel")
    (kernel / "initrd").write_bytes(b"initrd")
    server = boot.for_fleet(
        fleet, root / "render", host="127.0.0.1", port=0, images=root / "images"
    )
    with server:
        # The rendered scripts name the spec's boot URL; point them at this server instead.
        for script in (root / "render/boot/ipxe").iterdir():
            script.write_text(script.read_text().replace("http://10.200.0.1:8080/", server.url))
        yield fleet, server.url


def test_a_known_mac_boots_its_installer_with_the_rendered_command_line(
    served: tuple[Fleet, str],
) -> None:
    fleet, url = served
    node = fleet.by_name["gpu-lab-02"]
    firmware = Ipxe(node.mac, str(node.ip))
    assert firmware.run(url + "ipxe/boot.ipxe") == "boot"
    assert firmware.kernel == url + "images/ubuntu-24.04/vmlinuz"
    assert firmware.initrds == [url + "images/ubuntu-24.04/initrd"]
    source = cmdline_value(firmware.cmdline, "ds")
    assert source == f"nocloud-net;s={url}autoinstall/gpu-lab-02/"
    assert "autoinstall" in firmware.cmdline.split()


def test_an_unknown_mac_leaves_network_boot(
    served: tuple[Fleet, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = served
    firmware = Ipxe("02:00:0a:c8:00:63", "10.200.0.99")
    assert firmware.run(url + "ipxe/boot.ipxe") == NO_BOOT
    printed = capsys.readouterr().out
    assert "no boot script for 02:00:0a:c8:00:63" in printed
    assert firmware.kernel is None


def test_variables_expand_as_ipxe_spells_them() -> None:
    firmware = Ipxe("02:00:0A:C8:00:0B", "10.200.0.11")
    text = "${netX/mac:hexhyp} ${net0/mac} ${ip} ${undefined}."
    assert firmware.expand(text) == "02-00-0a-c8-00-0b 02:00:0a:c8:00:0b 10.200.0.11 ."


def test_a_file_that_is_not_an_ipxe_script_fails_the_boot(served: tuple[Fleet, str]) -> None:
    _, url = served
    firmware = Ipxe("02:00:0a:c8:00:0b", "10.200.0.11")
    with pytest.raises(BootFailed, match="is not an iPXE script"):
        firmware.run(url + "images/ubuntu-24.04/vmlinuz")
    with pytest.raises(BootFailed, match="HTTP 404"):
        firmware.run(url + "ipxe/no-such-script.ipxe")
