"""The boot server over real HTTP on loopback: what a booting node fetches, what it may not
fetch, and which install callbacks are believed.

Each test renders a spec into its own folder, starts a BootServer on 127.0.0.1 (an ephemeral
port) in a fixture and stops it afterwards; the CLI tests run ``provisioner boot serve`` in a
subprocess. Tokens always come from the rendered files or from ``callback_token``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from provisioner import boot
from provisioner.boot import BootEvent, BootServer
from provisioner.render import render_fleet, write_tree
from provisioner.render.boot import callback_token, mac_file
from provisioner.render.writer import site_key
from provisioner.spec import Fleet, load_fleet
from tests.conftest import DATA, LAB_SPEC, RunCli

pytestmark = pytest.mark.integration
ROCKY_SPEC = DATA / "render" / "rocky-redfish" / "input" / "fleet.yaml"
TOKEN_HEADER = "X-Provisioner-Token"
KERNEL_BYTES = 3 * 1024 * 1024 + 17  # a few MiB, not a multiple of any buffer size
DEADLINE = 10.0  # seconds any one request may take


@dataclass
class Site:
    """A rendered spec: the fleet, the folder render wrote, and its callback key."""

    fleet: Fleet
    render: Path
    key: bytes

    def boot_file(self, relative: str) -> bytes:
        return (self.render / "boot" / relative).read_bytes()

    def token_in_user_data(self, node: str) -> str:
        text = self.boot_file(f"autoinstall/{node}/user-data").decode()
        match = re.search(rf"{TOKEN_HEADER}: ([0-9a-f]+)", text)
        assert match, "the rendered user-data carries no callback token"
        return match.group(1)

    def all_tokens(self) -> list[str]:
        return [callback_token(self.key, node.name) for node in self.fleet.nodes]


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _render(spec: Path, out: Path) -> Site:
    fleet = load_fleet(spec)
    key = site_key(fleet, out)
    write_tree(render_fleet(fleet, key), out)
    return Site(fleet, out, site_key(fleet, out, create=False))


def _spec_copy(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "fleet.yaml"
    spec.write_text(text, encoding="utf-8")
    return spec


def request(
    server: BootServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request on a new connection; ``path`` is sent exactly as given."""
    with closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)) as conn:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())


def get(server: BootServer, relative: str) -> Reply:
    """GET a path under the server's base path."""
    return request(server, "GET", server.base_path + relative)


def callback(server: BootServer, node: str, token: str | None, body: bytes | None = None) -> Reply:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers[TOKEN_HEADER] = token
    payload = json.dumps({"node": node, "event": "installed"}).encode() if body is None else body
    return request(server, "POST", f"{server.base_path}callback/{node}", payload, headers)


def events_after(server: BootServer, count: int) -> list[BootEvent]:
    """The server's events once there are ``count`` of them (a fetch is recorded just after
    its reply is sent)."""
    deadline = time.monotonic() + DEADLINE
    while len(server.events) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.events) == count, [e.as_dict() for e in server.events]
    return list(server.events)


def _rebase(url: str, site: Site, server: BootServer) -> str:
    """The path on our server of a URL a rendered file points at under the spec's boot.url."""
    boot_url = str(site.fleet.document.boot.url)
    assert url.startswith(boot_url), (url, boot_url)
    return server.base_path + url[len(boot_url) :]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def lab(tmp_path: Path) -> Site:
    return _render(LAB_SPEC, tmp_path / "render")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside every served folder; it must never be served."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside-the-served-folders " + os.urandom(16).hex().encode())
    return secret


@pytest.fixture
def images(tmp_path: Path, outside: Path) -> Path:
    """An images folder: a kernel-sized file, one in a subfolder, and symlinks leading out."""
    folder = tmp_path / "images"
    (folder / "ubuntu-24.04").mkdir(parents=True)
    (folder / "ubuntu-24.04" / "vmlinuz").write_bytes(os.urandom(KERNEL_BYTES))
    (folder / "ubuntu-24.04" / "initrd").write_bytes(os.urandom(4096))
    (folder / "leak").symlink_to(outside)
    (folder / "leak-dir").symlink_to(outside.parent)
    (folder / "loop-a").symlink_to(folder / "loop-b")
    (folder / "loop-b").symlink_to(folder / "loop-a")
    return folder


@pytest.fixture
def server(lab: Site, images: Path, tmp_path: Path) -> Iterator[BootServer]:
    served = boot.for_fleet(
        lab.fleet,
        lab.render,
        host="127.0.0.1",
        port=0,
        images=images,
        events=tmp_path / "events.jsonl",
    )
    with served:
        yield served


# --------------------------------------------------------------------------- what nodes fetch


def test_each_node_gets_its_rendered_ipxe_script_by_mac(lab: Site, server: BootServer) -> None:
    for node in lab.fleet.nodes:
        name = f"ipxe/{mac_file(node.mac)}.ipxe"
        reply = get(server, name)
        assert reply.status == 200
        assert reply.body == lab.boot_file(name)
        assert reply.headers["Content-Length"] == str(len(reply.body))
    fetched = events_after(server, len(lab.fleet.nodes))
    # Each fetch is recorded just after its reply is sent, so two in a row may be recorded in
    # either order: every node once, attributed by its MAC.
    assert sorted(e.node for e in fetched) == sorted(node.name for node in lab.fleet.nodes)
    assert all(e.kind == "fetch" and e.accepted and e.status == 200 for e in fetched)


def test_the_chain_script_is_served_and_points_at_served_scripts(
    lab: Site, server: BootServer
) -> None:
    reply = get(server, "ipxe/boot.ipxe")
    assert reply.status == 200
    assert reply.body == lab.boot_file("ipxe/boot.ipxe")
    target = re.search(r"chain --autofree (\S+)\$\{netX/mac:hexhyp\}\.ipxe", reply.body.decode())
    assert target, reply.body.decode()
    node = lab.fleet.nodes[0]
    path = _rebase(target.group(1), lab, server) + f"{mac_file(node.mac)}.ipxe"
    script = request(server, "GET", path)
    assert script.body == lab.boot_file(f"ipxe/{mac_file(node.mac)}.ipxe")


def test_autoinstall_user_data_and_meta_data_are_served_where_the_script_says(
    lab: Site, server: BootServer
) -> None:
    for node in lab.fleet.nodes:
        script = get(server, f"ipxe/{mac_file(node.mac)}.ipxe").body.decode()
        seed = re.search(r"ds=nocloud-net;s=(\S+)", script)
        assert seed, script
        for name in ("user-data", "meta-data"):
            reply = request(server, "GET", _rebase(seed.group(1), lab, server) + name)
            assert reply.status == 200
            assert reply.body == lab.boot_file(f"autoinstall/{node.name}/{name}")
    fetched = events_after(server, 3 * len(lab.fleet.nodes))
    assert {e.node for e in fetched} == {node.name for node in lab.fleet.nodes}


def test_kickstart_is_served_where_the_script_says(tmp_path: Path) -> None:
    site = _render(ROCKY_SPEC, tmp_path / "render")
    with boot.for_fleet(site.fleet, site.render, host="127.0.0.1", port=0) as server:
        for node in site.fleet.nodes:
            script = get(server, f"ipxe/{mac_file(node.mac)}.ipxe")
            assert script.body == site.boot_file(f"ipxe/{mac_file(node.mac)}.ipxe")
            ks = re.search(r"inst\.ks=(\S+)", script.body.decode())
            assert ks, script.body.decode()
            reply = request(server, "GET", _rebase(ks.group(1), site, server))
            assert reply.status == 200
            assert reply.body == site.boot_file(f"kickstart/{node.name}.ks")
            assert reply.body.startswith(b"# " + node.name.encode())
        assert get(server, "autoinstall/a100-b01-canary/user-data").status == 404


def test_images_are_streamed_byte_for_byte(server: BootServer, images: Path) -> None:
    for name in ("ubuntu-24.04/vmlinuz", "ubuntu-24.04/initrd"):
        expected = (images / name).read_bytes()
        reply = get(server, f"images/{name}")
        assert reply.status == 200
        assert reply.headers["Content-Length"] == str(len(expected))
        assert reply.body == expected


def test_head_gives_the_length_and_no_body(server: BootServer) -> None:
    """Read at the socket: http.client would hide a body sent after a HEAD."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as sock:
        sock.sendall(
            b"HEAD /images/ubuntu-24.04/vmlinuz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"content-length: {KERNEL_BYTES}".encode() in head.lower()
    assert rest == b""


def test_an_unknown_mac_gets_404(lab: Site, server: BootServer) -> None:
    reply = get(server, "ipxe/02-00-0a-c8-00-99.ipxe")
    assert reply.status == 404
    assert b"#!ipxe" not in reply.body
    (event,) = events_after(server, 1)
    assert (event.status, event.accepted, event.node) == (404, False, None)


@pytest.mark.parametrize(
    "path",
    [
        "/ipxe/../../.callback-key",
        "/ipxe/%2e%2e/%2e%2e/.callback-key",
        "/ipxe/%2E%2E%2F%2E%2E%2F.callback-key",
        "/autoinstall/../../.callback-key",
        "/kickstart/..%2f..%2f.callback-key",
        "/ipxe/../autoinstall/gpu-lab-01/user-data",
        "/images/../secret.txt",
        "/images/%2e%2e/secret.txt",
        "/images/ubuntu-24.04/../../secret.txt",
        "/images/{absolute}",
        "/images/{absolute_quoted}",
        "/images//{absolute}",
        "/ipxe/{absolute}",
        "/images/leak",
        "/images/leak-dir/secret.txt",
        "/images/loop-a",
        pytest.param("/images/" + "x" * 300, id="name-too-long"),
        "/images/ubuntu-24.04",
        "/images/",
        "/ipxe/",
        "/",
        "/callback/gpu-lab-01",
    ],
)
def test_no_path_reaches_outside_the_served_folders(
    lab: Site, server: BootServer, outside: Path, path: str
) -> None:
    path = path.format(absolute=outside, absolute_quoted=quote(str(outside), safe=""))
    reply = request(server, "GET", path)
    assert reply.status == 404
    assert reply.body == b"not found\n"
    assert lab.key not in reply.body
    # and the server still serves the next request
    assert get(server, "ipxe/boot.ipxe").status == 200


def test_a_new_render_is_served_without_a_restart(lab: Site, tmp_path: Path) -> None:
    node = lab.fleet.nodes[0]
    name = f"ipxe/{mac_file(node.mac)}.ipxe"
    with boot.for_fleet(lab.fleet, lab.render, host="127.0.0.1", port=0) as server:
        before = get(server, name).body
        assert b"console=ttyS1" not in before
        text = LAB_SPEC.read_text(encoding="utf-8").replace(
            "packages: [python3, linux-headers-generic]",
            "packages: [python3, linux-headers-generic]\n    kernel_args: [console=ttyS1]",
        )
        spec = _spec_copy(tmp_path / "changed", text)
        report = write_tree(render_fleet(load_fleet(spec), lab.key), lab.render)
        assert f"boot/{name}" in report.changed
        after = get(server, name).body
    assert after == lab.boot_file(name)
    assert b"console=ttyS1" in after


# --------------------------------------------------------------------------- callbacks


def test_a_callback_with_the_rendered_token_is_accepted(lab: Site, server: BootServer) -> None:
    node = lab.fleet.nodes[1].name
    token = lab.token_in_user_data(node)
    assert token == callback_token(site_key(lab.fleet, lab.render, create=False), node)
    started = time.time()
    reply = callback(server, node, token)
    assert reply.status == 200
    assert json.loads(reply.body) == {"ok": True}
    event = server.wait_for_callback(node, after=started, timeout=DEADLINE)
    assert event is not None
    assert (event.kind, event.node, event.client, event.status) == (
        "callback",
        node,
        "127.0.0.1",
        200,
    )
    assert event.body == {"node": node, "event": "installed"}
    assert set(server.installed()) == {node}
    assert server.wait_for_callback(lab.fleet.nodes[0].name, after=started, timeout=0.2) is None


def test_the_rendered_late_command_calls_back_successfully(lab: Site, server: BootServer) -> None:
    """Run the curl line of the rendered user-data, only its URL moved to this server."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    node = lab.fleet.nodes[2].name
    text = lab.boot_file(f"autoinstall/{node}/user-data").decode()
    line = next(line for line in text.splitlines() if "curl " in line)
    command = json.loads(line.strip().removeprefix("- "))
    url = re.search(r"(http://\S+/callback/\S+)", command)
    assert url, command
    command = command.replace(
        url.group(1), f"{server.url.rstrip('/')}{urlsplit(url.group(1)).path}"
    )
    command = command.replace(" || true", "")
    subprocess.run(["sh", "-c", command], check=True, timeout=60, capture_output=True)
    assert set(server.installed()) == {node}
    assert server.installed()[node].body == {"node": node, "event": "installed"}


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong token", "wrong token"),
        ("no token", "no X-Provisioner-Token header"),
        ("empty token", "no X-Provisioner-Token header"),
        ("another node's token", "wrong token"),
        ("key as token", "wrong token"),
        ("unknown node", "unknown node"),
    ],
)
def test_a_callback_without_the_node_s_token_is_refused(
    lab: Site, server: BootServer, case: str, reason: str
) -> None:
    node, other = lab.fleet.nodes[0].name, lab.fleet.nodes[1].name
    good = callback_token(lab.key, node)
    token: str | None = {
        "wrong token": "0" * len(good),
        "no token": None,
        "empty token": "",
        "another node's token": lab.token_in_user_data(other),
        "key as token": lab.key.decode(),
        "unknown node": callback_token(lab.key, "gpu-lab-99"),
    }[case]
    target = "gpu-lab-99" if case == "unknown node" else node
    started = time.time()
    reply = callback(server, target, token)
    assert reply.status == 403
    assert reply.body == f"refused: {reason}\n".encode()
    (event,) = events_after(server, 1)
    assert (event.kind, event.node, event.status, event.accepted) == (
        "callback",
        target,
        403,
        False,
    )
    assert event.reason == reason
    assert event.body is None
    assert server.installed() == {}
    assert server.wait_for_callback(target, after=started, timeout=0.3) is None


def test_a_node_name_with_a_newline_cannot_forge_a_log_line(
    lab: Site, server: BootServer, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "gpu-lab-99%0Ainstall%20callback%20from%20gpu-lab-01%20accepted"
    with caplog.at_level("INFO", logger="provisioner.boot"):
        reply = callback(server, forged, "0" * 32)
    assert reply.status == 403
    (event,) = events_after(server, 1)
    assert event.node is not None and "\n" not in event.node and "\\n" in event.node
    (record,) = [r for r in caplog.records if "callback" in r.getMessage()]
    assert "\n" not in record.getMessage() and record.getMessage().endswith("unknown node")


@pytest.mark.parametrize(
    "path", ["/ipxe/boot.ipxe", "/callback/", "/callback/gpu-lab-01/extra", "/elsewhere"]
)
def test_a_post_to_a_non_callback_path_gets_404(lab: Site, server: BootServer, path: str) -> None:
    token = callback_token(lab.key, "gpu-lab-01")
    reply = request(server, "POST", path, b'{"event": "installed"}', {TOKEN_HEADER: token})
    assert reply.status == 404
    (event,) = events_after(server, 1)
    assert (event.status, event.accepted) == (404, False)
    assert server.installed() == {}


@pytest.mark.parametrize("size", [64 * 1024 + 1, 8 * 1024 * 1024])
def test_an_oversized_callback_body_gets_413(lab: Site, server: BootServer, size: int) -> None:
    node = lab.fleet.nodes[0].name
    body = b'{"pad": "' + b"x" * (size - 11) + b'"}'
    assert len(body) == size
    reply = callback(server, node, lab.token_in_user_data(node), body)
    assert reply.status == 413
    assert reply.headers["Connection"] == "close"
    (event,) = events_after(server, 1)
    assert (event.status, event.accepted, event.node) == (413, False, node)
    assert server.installed() == {}


@pytest.mark.parametrize("body", [b"installed", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_a_callback_body_that_is_not_a_json_object_gets_400(
    lab: Site, server: BootServer, body: bytes
) -> None:
    node = lab.fleet.nodes[0].name
    reply = callback(server, node, lab.token_in_user_data(node), body)
    assert reply.status == 400
    (event,) = events_after(server, 1)
    assert (event.status, event.accepted) == (400, False)
    assert server.installed() == {}


def test_a_chunked_callback_body_is_refused_not_ignored(lab: Site, server: BootServer) -> None:
    """Without Content-Length the body would be left unread and taken as the next request."""
    node = lab.fleet.nodes[0].name
    headers = {TOKEN_HEADER: lab.token_in_user_data(node), "Transfer-Encoding": "chunked"}
    with closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)) as conn:
        conn.request(
            "POST",
            f"/callback/{node}",
            body=iter([b'{"event": ', b'"installed"}']),
            headers=headers,
            encode_chunked=True,
        )
        response = conn.getresponse()
        response.read()
    assert response.status == 411
    (event,) = events_after(server, 1)
    assert (event.status, event.accepted) == (411, False)
    assert server.installed() == {}


# --------------------------------------------------------------------------- events and logs


def test_every_request_is_one_json_line_and_no_token_is_written_or_logged(
    lab: Site, images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="provisioner.boot")
    events = tmp_path / "events.jsonl"
    a, b = lab.fleet.nodes[0], lab.fleet.nodes[1]
    token_a = lab.token_in_user_data(a.name)
    with boot.for_fleet(
        lab.fleet, lab.render, host="127.0.0.1", port=0, images=images, events=events
    ) as server:
        statuses = [
            get(server, "ipxe/boot.ipxe").status,
            get(server, f"ipxe/{mac_file(a.mac)}.ipxe").status,
            get(server, f"autoinstall/{a.name}/user-data").status,
            get(server, "ipxe/ff-ff-ff-ff-ff-ff.ipxe").status,
            request(server, "HEAD", "/images/ubuntu-24.04/vmlinuz").status,
            callback(server, a.name, token_a + "0").status,
            callback(server, b.name, token_a).status,
            callback(server, "nobody", token_a).status,
            callback(server, b.name, None).status,
            callback(server, a.name, token_a, b"not json").status,
            callback(server, a.name, token_a).status,
        ]
        events_after(server, len(statuses))
    lines = events.read_text(encoding="utf-8").splitlines()
    # A fetch is recorded just after its reply is sent, so the next request may be written
    # first: fetches are put back in the order they were asked for (each path once), then
    # the callbacks, which are recorded before their replies, in their own order.
    asked = ["boot.ipxe", f"{mac_file(a.mac)}.ipxe", "user-data", "ff-ff-ff-ff-ff-ff.ipxe",
             "vmlinuz"]  # fmt: skip
    records = sorted(
        (json.loads(line) for line in lines),
        key=lambda r: (
            r["kind"] != "fetch",
            asked.index(r["path"].rsplit("/", 1)[-1]) if r["kind"] == "fetch" else 0,
        ),
    )
    assert [r["status"] for r in records] == statuses
    assert statuses == [200, 200, 200, 404, 200, 403, 403, 403, 403, 400, 200]
    assert [r["kind"] for r in records] == ["fetch"] * 5 + ["callback"] * 6
    assert all(r["client"] == "127.0.0.1" and r["path"].startswith("/") for r in records)
    assert records[-1]["accepted"] is True
    assert records[-1]["body"] == {"node": a.name, "event": "installed"}
    refused = [r for r in records if r["kind"] == "callback" and not r["accepted"]]
    assert [r["reason"] for r in refused] == [
        "wrong token",
        "wrong token",
        "unknown node",
        "no X-Provisioner-Token header",
        "the body is not a JSON object",
    ]
    log = caplog.text
    assert "refused: wrong token" in log
    assert f"install callback from {a.name} (127.0.0.1) accepted" in log
    written = events.read_text(encoding="utf-8")
    for secret in [*lab.all_tokens(), token_a + "0", lab.key.decode()]:
        assert secret not in written
        assert secret not in log


def test_events_append_across_restarts(lab: Site, tmp_path: Path) -> None:
    events = tmp_path / "deeper" / "events.jsonl"
    for _ in range(2):
        with boot.for_fleet(
            lab.fleet, lab.render, host="127.0.0.1", port=0, events=events
        ) as server:
            get(server, "ipxe/boot.ipxe")
            events_after(server, 1)
    assert len(events.read_text(encoding="utf-8").splitlines()) == 2


# --------------------------------------------------------------------------- connections


def test_keep_alive_serves_many_requests_on_one_connection(
    lab: Site, server: BootServer, images: Path
) -> None:
    node = lab.fleet.nodes[0]
    token = lab.token_in_user_data(node.name)
    with closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)) as conn:
        conn.connect()
        sock = conn.sock
        local = sock.getsockname()

        def ask(method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            reply = Reply(response.status, response.headers, response.read())
            assert conn.sock is sock, f"{method} {path} closed the connection"
            return reply

        assert ask("GET", "/ipxe/boot.ipxe").body == lab.boot_file("ipxe/boot.ipxe")
        assert ask("GET", f"/ipxe/{mac_file(node.mac)}.ipxe").status == 200
        assert ask("GET", f"/autoinstall/{node.name}/meta-data").status == 200
        assert ask("GET", "/ipxe/00-00-00-00-00-00.ipxe").status == 404
        assert ask("HEAD", "/images/ubuntu-24.04/vmlinuz").body == b""
        kernel = ask("GET", "/images/ubuntu-24.04/vmlinuz").body
        assert kernel == (images / "ubuntu-24.04" / "vmlinuz").read_bytes()
        refused = ask("POST", f"/callback/{node.name}", b"{}", **{TOKEN_HEADER: "0" * 32})
        assert refused.status == 403
        assert ask("POST", f"/callback/{node.name}", b"{}", **{TOKEN_HEADER: token}).status == 200
        assert ask("GET", f"/autoinstall/{node.name}/user-data").status == 200
        assert sock.getsockname() == local
    assert len(events_after(server, 9)) == 9
    assert set(server.installed()) == {node.name}


def test_stop_ends_idle_keep_alive_connections(lab: Site) -> None:
    server = boot.for_fleet(lab.fleet, lab.render, host="127.0.0.1", port=0).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
        conn.request("GET", "/ipxe/boot.ipxe")
        conn.getresponse().read()
        assert conn.sock is not None
        sock = conn.sock
    finally:
        server.stop()
    with closing(conn):
        sock.settimeout(DEADLINE)
        assert sock.recv(1) == b"", "the connection outlived the server"


# --------------------------------------------------------------------------- base path


def test_the_base_path_of_boot_url_is_honoured(tmp_path: Path) -> None:
    text = LAB_SPEC.read_text(encoding="utf-8").replace(
        "url: http://10.200.0.1:8080/", "url: http://10.0.0.1:8080/provision/"
    )
    site = _render(_spec_copy(tmp_path / "spec", text), tmp_path / "render")
    node = site.fleet.nodes[0]
    with boot.for_fleet(site.fleet, site.render, host="127.0.0.1", port=0) as server:
        assert server.base_path == "/provision/"
        assert server.url == f"http://127.0.0.1:{server.port}/provision/"
        chain = request(server, "GET", "/provision/ipxe/boot.ipxe")
        assert chain.status == 200
        assert chain.body == site.boot_file("ipxe/boot.ipxe")
        assert b"http://10.0.0.1:8080/provision/ipxe/" in chain.body
        script = request(server, "GET", f"/provision/ipxe/{mac_file(node.mac)}.ipxe")
        seed = re.search(r"ds=nocloud-net;s=(\S+)", script.body.decode())
        assert seed, script.body.decode()
        user_data = request(server, "GET", _rebase(seed.group(1), site, server) + "user-data")
        assert user_data.body == site.boot_file(f"autoinstall/{node.name}/user-data")
        for outside_base in (
            "/ipxe/boot.ipxe",
            "/provisionX/ipxe/boot.ipxe",
            "/provision",
            "/provision/../ipxe/boot.ipxe",
        ):
            assert request(server, "GET", outside_base).status == 404, outside_base
        token = site.token_in_user_data(node.name)
        assert f"http://10.0.0.1:8080/provision/callback/{node.name}" in (
            site.boot_file(f"autoinstall/{node.name}/user-data").decode()
        )
        headers = {TOKEN_HEADER: token}
        assert request(server, "POST", f"/callback/{node.name}", b"{}", headers).status == 404
        assert server.installed() == {}
        assert callback(server, node.name, token).status == 200
        assert set(server.installed()) == {node.name}


# --------------------------------------------------------------------------- the CLI


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Serving:
    """``provisioner boot serve`` in a subprocess, its stdout read line by line by a thread
    (so that waiting for a line is bounded in time)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float = 60) -> str:
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"the server ended (exit {self.process.wait(timeout=30)})"
        self.stdout.append(line)
        return line


@contextmanager
def serving(*args: str | os.PathLike[str]) -> Iterator[Serving]:
    process = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "boot", "serve", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield Serving(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_cli_serves_reports_callbacks_and_stops_on_sigterm(run_cli: RunCli, tmp_path: Path) -> None:
    render = tmp_path / "render"
    rendered = run_cli("render", LAB_SPEC, "--out", render)
    assert rendered.returncode == 0, rendered.stderr
    fleet = load_fleet(LAB_SPEC)
    site = Site(fleet, render, site_key(fleet, render, create=False))
    node = site.fleet.nodes[0]
    token = site.token_in_user_data(node.name)
    port = _free_port()
    events = tmp_path / "events.jsonl"
    args = (LAB_SPEC, "--render", render, "--listen", f"127.0.0.1:{port}", "--events", events)
    with serving(*args) as served:
        assert served.next_line() == f"ready http://127.0.0.1:{port}/"
        with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)) as conn:
            conn.request("GET", f"/ipxe/{mac_file(node.mac)}.ipxe")
            assert conn.getresponse().read() == site.boot_file(f"ipxe/{mac_file(node.mac)}.ipxe")
            for sent in ("f" * 32, token):
                conn.request("POST", f"/callback/{node.name}", b"{}", {TOKEN_HEADER: sent})
                conn.getresponse().read()
        assert served.next_line() == f"callback {node.name} from 127.0.0.1: refused (wrong token)"
        assert served.next_line() == f"callback {node.name} from 127.0.0.1: accepted"
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=30) == 0
        stdout, stderr = served.process.communicate(timeout=30)
    assert "Traceback" not in stdout + stderr
    assert stderr.strip().splitlines()[-1] == "stopped"
    everything = "\n".join(served.stdout) + stdout + stderr + events.read_text(encoding="utf-8")
    assert token not in everything
    assert len(events.read_text(encoding="utf-8").splitlines()) == 3


def test_cli_json_output_prints_each_event(run_cli: RunCli, tmp_path: Path) -> None:
    render = tmp_path / "render"
    assert run_cli("render", LAB_SPEC, "--out", render).returncode == 0
    port = _free_port()
    args = (LAB_SPEC, "--render", render, "--listen", f"127.0.0.1:{port}", "-o", "json")
    with serving(*args) as served:
        assert served.process.stderr is not None
        ready = served.process.stderr.readline().strip()
        assert ready == f"ready http://127.0.0.1:{port}/"
        with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)) as conn:
            conn.request("GET", "/ipxe/boot.ipxe")
            conn.getresponse().read()
            conn.request("POST", "/callback/gpu-lab-01", b"{}")
            conn.getresponse().read()
        fetch, refused = json.loads(served.next_line()), json.loads(served.next_line())
        served.process.send_signal(signal.SIGINT)
        assert served.process.wait(timeout=30) == 0
    assert (fetch["kind"], fetch["status"], fetch["path"]) == ("fetch", 200, "/ipxe/boot.ipxe")
    assert (refused["kind"], refused["status"], refused["node"]) == ("callback", 403, "gpu-lab-01")
    assert refused["reason"] == "no X-Provisioner-Token header"


def test_cli_listen_on_a_port_in_use_is_a_one_line_error(run_cli: RunCli, tmp_path: Path) -> None:
    render = tmp_path / "render"
    assert run_cli("render", LAB_SPEC, "--out", render).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "boot",
            "serve",
            LAB_SPEC,
            "--render",
            render,
            "--listen",
            f"127.0.0.1:{port}",
            timeout=60,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert "ready" not in result.stdout


@pytest.mark.parametrize("folder", ["boot removed", "empty", "missing"])
def test_cli_render_folder_without_boot_files_is_a_one_line_error(
    run_cli: RunCli, tmp_path: Path, folder: str
) -> None:
    render = tmp_path / "render"
    if folder == "boot removed":
        assert run_cli("render", LAB_SPEC, "--out", render).returncode == 0
        shutil.rmtree(render / "boot")
    elif folder == "empty":
        render.mkdir()
    result = run_cli(
        "boot",
        "serve",
        LAB_SPEC,
        "--render",
        render,
        "--listen",
        f"127.0.0.1:{_free_port()}",
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(render) in lines[0]
    assert "render" in lines[0]


@pytest.mark.parametrize("listen", ["8080", "127.0.0.1:http", "127.0.0.1:70000"])
def test_cli_bad_listen_is_a_one_line_error(run_cli: RunCli, listen: str) -> None:
    result = run_cli("boot", "serve", LAB_SPEC, "--render", ".", "--listen", listen, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: --listen {listen!r}: give HOST:PORT, e.g. 0.0.0.0:8080"
    ]
