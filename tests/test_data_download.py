"""Dataset download against a loopback HTTP server the tests start themselves.

Archives are built here from tiny generated images (with a manifest made for them) and, in one
test, from real DreamBooth files with the real manifest entries.
"""

from __future__ import annotations

import hashlib
import io
import re
import socket
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub  # noqa: F401 - fix its constants now (offline, default endpoint)
import pytest
from PIL import Image

from benchmark.cli import main
from data.download import GITHUB_COMMIT, download_dataset
from data.errors import DatasetError
from data.manifest import shipped_manifest
from data.verify import verify_dataset

PREFIX = f"dreambooth-{GITHUB_COMMIT}/dataset/"


# ----------------------------------------------------------------------------- helpers


def png_bytes(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tiny_files() -> dict[str, bytes]:
    files = {
        "alpha/00.png": png_bytes((255, 0, 0)),
        "alpha/01.png": png_bytes((0, 255, 0)),
        "beta/00.png": png_bytes((0, 0, 255)),
        "prompts_and_classes.txt": b"Classes\n\nsubject_name,class\nalpha,toy\nbeta,toy\n",
    }
    # Make the body big enough that a mid-way drop leaves real partial content.
    files["beta/01.png"] = png_bytes((9, 9, 9), size=200) + bytes(range(256)) * 200
    return files


def manifest_of(files: dict[str, bytes]) -> dict[str, str]:
    return {name: sha(data) for name, data in files.items()}


def tar_gz(files: dict[str, bytes], prefix: str = PREFIX, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        readme = tarfile.TarInfo(prefix.split("/")[0] + "/README.md")
        readme.size = 6
        archive.addfile(readme, io.BytesIO(b"readme"))
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra:
            archive.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buffer.getvalue()


class ArchiveServer:
    """Serves one payload at any path; can drop the connection mid-body and honour Range."""

    def __init__(self, payload: bytes, ranges: bool = True, drop_after: int | None = None,
                 drops: int = 0, content_type: str = "application/gzip"):
        self.payload, self.ranges, self.content_type = payload, ranges, content_type
        self.drop_after, self.drops = drop_after, drops
        self.requests: list[dict] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                state.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                       "if_range": self.headers.get("If-Range")})
                data, start = state.payload, 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and state.ranges:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", state.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"v1"')
                self.end_headers()
                if state.drops > 0 and state.drop_after is not None:
                    state.drops -= 1
                    self.wfile.write(body[: state.drop_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/archive/{GITHUB_COMMIT}.tar.gz"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(payload: bytes, **kwargs) -> ArchiveServer:
        servers.append(ArchiveServer(payload, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/archive.tar.gz"


def fetch(target: Path, manifest, url: str, logs: list[str] | None = None, **kwargs):
    kwargs.setdefault("retry_wait", 0)
    return download_dataset(target, source="github", manifest=manifest, url=url,
                            log=(logs.append if logs is not None else lambda message: None),
                            **kwargs)


def files_below(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- success, idempotence


def test_download_places_the_verified_dataset(tmp_path, tiny_files, serve):
    server = serve(tar_gz(tiny_files))
    target = tmp_path / "db"
    result = fetch(target, manifest_of(tiny_files), server.url)
    assert result.source == "github" and result.path == target
    for name, data in tiny_files.items():
        assert (target / name).read_bytes() == data
    assert not (target / "README.md").exists()  # only the dataset folder is taken
    assert verify_dataset(target, manifest_of(tiny_files)).ok
    assert (target / ".subjectbench-source.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # staging folder cleaned up


def test_second_run_is_verified_and_offline(tmp_path, tiny_files, serve):
    server = serve(tar_gz(tiny_files))
    target = tmp_path / "db"
    fetch(target, manifest_of(tiny_files), server.url)
    contacted = len(server.requests)
    result = fetch(target, manifest_of(tiny_files), closed_port_url())
    assert result.source == "present"
    assert "already present and verified" in result.message
    assert len(server.requests) == contacted


def test_zip_archive_is_accepted(tmp_path, tiny_files, serve):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in tiny_files.items():
            archive.writestr(PREFIX + name, data)
    server = serve(buffer.getvalue(), content_type="application/zip")
    assert fetch(tmp_path / "db", manifest_of(tiny_files), server.url).source == "github"


def test_real_subjects_round_trip(tmp_path, dreambooth_dir, serve):
    names = [n for n in shipped_manifest() if n.split("/")[0] in ("dog", "duck_toy")]
    manifest = {n: shipped_manifest()[n] for n in names}
    files = {n: (dreambooth_dir / n).read_bytes() for n in names}
    server = serve(tar_gz(files))
    target = tmp_path / "db"
    fetch(target, manifest, server.url)
    assert len(names) == 9
    for name in names:
        assert (target / name).read_bytes() == (dreambooth_dir / name).read_bytes()


# ----------------------------------------------------------------------------- refusals


def test_checksum_mismatch_is_refused_and_nothing_placed(tmp_path, tiny_files, serve):
    manifest = manifest_of(tiny_files)
    tampered = dict(tiny_files, **{"alpha/01.png": png_bytes((0, 254, 0))})
    server = serve(tar_gz(tampered))
    target = tmp_path / "db"
    with pytest.raises(DatasetError, match=r"do not match the pinned checksums \(first: alpha/01.png\)"):
        fetch(target, manifest, server.url)
    assert not target.exists()
    staging = tmp_path / ".db.download"
    assert not (staging / "archive.part").exists()  # a bad archive is not resumed later
    assert not (staging / "extract").exists()


def test_archive_missing_files_is_refused(tmp_path, tiny_files, serve):
    partial = {k: v for k, v in tiny_files.items() if k != "beta/00.png"}
    server = serve(tar_gz(partial))
    with pytest.raises(DatasetError, match=r"lacks 1 of the 5 dataset files \(first: beta/00.png\)"):
        fetch(tmp_path / "db", manifest_of(tiny_files), server.url)
    assert not (tmp_path / "db").exists()


def _link(name: str, target: str, symbolic: bool = True) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE if symbolic else tarfile.LNKTYPE
    info.linkname = target
    return info


def _regular(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 4
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (lambda tmp: _regular(PREFIX + "../../evil.txt"), "climbs out"),
        (lambda tmp: _regular(str(tmp / "evil.txt")), "absolute"),
        (lambda tmp: _link(PREFIX + "alpha/link", "../../../../evil.txt"), "symlink pointing outside"),
        (lambda tmp: _link(PREFIX + "alpha/link", str(tmp / "evil.txt")), "symlink to the absolute"),
        (lambda tmp: _link(PREFIX + "alpha/hard", "../../evil.txt", symbolic=False), "hard link"),
        (lambda tmp: _device(PREFIX + "alpha/null"), "device file"),
    ],
    ids=["dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "device"],
)
def test_unsafe_archive_entries_are_refused(tmp_path, tiny_files, serve, entry, reason):
    server = serve(tar_gz(tiny_files, extra=[entry(tmp_path)]))
    target = tmp_path / "inner" / "db"
    with pytest.raises(DatasetError, match=f"is unsafe to extract: .*{reason}"):
        fetch(target, manifest_of(tiny_files), server.url)
    assert not target.exists()
    assert not any(p.name in ("evil.txt", "link", "hard", "null") for p in tmp_path.rglob("*"))


def test_unsafe_zip_symlink_is_refused(tmp_path, tiny_files, serve):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in tiny_files.items():
            archive.writestr(PREFIX + name, data)
        link = zipfile.ZipInfo(PREFIX + "alpha/link")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "../../../../outside")
    server = serve(buffer.getvalue())
    with pytest.raises(DatasetError, match="symlink pointing outside"):
        fetch(tmp_path / "db", manifest_of(tiny_files), server.url)


def test_damaged_archive_is_refused_and_deleted(tmp_path, tiny_files, serve):
    whole = tar_gz(tiny_files)
    server = serve(whole[: len(whole) // 2])  # complete HTTP body, truncated gzip stream
    with pytest.raises(DatasetError, match="truncated or damaged"):
        fetch(tmp_path / "db", manifest_of(tiny_files), server.url)
    assert not (tmp_path / ".db.download" / "archive.part").exists()


def test_error_page_instead_of_archive(tmp_path, tiny_files, serve):
    server = serve(b"<html>rate limited</html>", content_type="text/html")
    with pytest.raises(DatasetError, match="neither a tar.*nor a zip.*check the URL"):
        fetch(tmp_path / "db", manifest_of(tiny_files), server.url)


def test_existing_unverified_folder_is_kept_unless_forced(tmp_path, tiny_files, serve):
    server = serve(tar_gz(tiny_files))
    target = tmp_path / "db"
    (target / "alpha").mkdir(parents=True)
    (target / "alpha" / "00.png").write_bytes(b"not the original")
    with pytest.raises(DatasetError, match=f"{target} exists but is not the verified dataset"):
        fetch(target, manifest_of(tiny_files), server.url)
    assert server.requests == []
    fetch(target, manifest_of(tiny_files), server.url, force=True)
    assert verify_dataset(target, manifest_of(tiny_files)).ok
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("db.old-")]
    assert len(kept) == 1 and (kept[0] / "alpha" / "00.png").read_bytes() == b"not the original"


# ----------------------------------------------------------------------------- interruption


def test_dropped_connection_resumes_with_range(tmp_path, tiny_files, serve):
    payload = tar_gz(tiny_files)
    half = len(payload) // 2
    server = serve(payload, drop_after=half, drops=1)
    logs: list[str] = []
    fetch(tmp_path / "db", manifest_of(tiny_files), server.url, logs, retries=1)
    assert [r["range"] for r in server.requests] == [None, f"bytes={half}-"]
    assert server.requests[1]["if_range"] == '"v1"'
    assert any("resuming the download at byte" in line for line in logs)
    assert verify_dataset(tmp_path / "db", manifest_of(tiny_files)).ok


def test_dropped_connection_restarts_when_server_ignores_range(tmp_path, tiny_files, serve):
    payload = tar_gz(tiny_files)
    server = serve(payload, ranges=False, drop_after=len(payload) // 3, drops=1)
    logs: list[str] = []
    fetch(tmp_path / "db", manifest_of(tiny_files), server.url, logs, retries=1)
    assert len(server.requests) == 2 and server.requests[1]["range"]
    assert any("restarting from zero" in line for line in logs)
    assert verify_dataset(tmp_path / "db", manifest_of(tiny_files)).ok


def test_interrupted_download_is_resumed_by_the_next_run(tmp_path, tiny_files, serve):
    payload = tar_gz(tiny_files)
    cut = len(payload) // 2
    server = serve(payload, drop_after=cut, drops=1)
    target = tmp_path / "db"
    with pytest.raises(DatasetError, match=r"interrupted.*run the same command again to resume"):
        fetch(target, manifest_of(tiny_files), server.url, retries=0)
    assert not target.exists()
    assert (tmp_path / ".db.download" / "archive.part").stat().st_size == cut
    fetch(target, manifest_of(tiny_files), server.url, retries=0)
    assert server.requests[-1]["range"] == f"bytes={cut}-"
    assert verify_dataset(target, manifest_of(tiny_files)).ok


# ----------------------------------------------------------------------------- unreachable sources


def test_unreachable_url_fails_fast_with_the_fix(tmp_path, tiny_files):
    started = time.monotonic()
    url = closed_port_url()
    with pytest.raises(DatasetError, match=f"cannot reach {re.escape(url)}.*SUBJECTBENCH_DATASET_URL"):
        fetch(tmp_path / "db", manifest_of(tiny_files), url)
    assert time.monotonic() - started < 5


def test_http_404_is_not_retried(tmp_path, tiny_files):
    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/missing.tar.gz"
        with pytest.raises(DatasetError, match="HTTP 404"):
            fetch(tmp_path / "db", manifest_of(tiny_files), url, retry_wait=5)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "closed HF_ENDPOINT"])
def test_hub_offline_fails_fast(tmp_path, tiny_files, monkeypatch, how):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", closed_port_url().rsplit("/", 1)[0])
    started = time.monotonic()
    with pytest.raises(DatasetError, match="Hugging Face hub is unreachable.*--source github"):
        download_dataset(tmp_path / "db", source="hub", manifest=manifest_of(tiny_files))
    assert time.monotonic() - started < 10
    assert not (tmp_path / "db").exists()


def test_auto_falls_back_to_the_archive_when_the_hub_fails(tmp_path, tiny_files, serve, monkeypatch):
    server = serve(tar_gz(tiny_files))
    # The hub endpoint answers (a loopback server that is no hub): the snapshot fails, then the
    # archive is used. huggingface_hub itself stays offline (its constants were fixed at import).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url.split("/archive")[0])
    logs: list[str] = []
    result = download_dataset(tmp_path / "db", source="auto", manifest=manifest_of(tiny_files),
                              url=server.url, retry_wait=0, log=logs.append)
    assert result.source == "github"
    assert any("hub download of google/dreambooth" in line and "falling back" in line for line in logs)


# ----------------------------------------------------------------------------- CLI


def test_cli_download_errors_exit_2_without_traceback(tmp_path, capsys, monkeypatch):
    url = closed_port_url()
    code = main(["data", "download", "--dataset-dir", str(tmp_path / "db"), "--source", "github",
                 "--url", url])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: cannot reach {url}" in err and "Traceback" not in err

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["data", "download", "--dataset-dir", str(tmp_path / "db"), "--source", "hub"])
    err = capsys.readouterr().err
    assert code == 2 and "error: the Hugging Face hub is unreachable" in err


def test_cli_download_refuses_a_foreign_archive(tmp_path, tiny_files, serve, capsys):
    server = serve(tar_gz(tiny_files))  # has prompts_and_classes.txt, no real image
    code = main(["data", "download", "--dataset-dir", str(tmp_path / "db"), "--source", "github",
                 "--url", server.url])
    err = capsys.readouterr().err
    assert code == 2
    assert "lacks 158 of the 159 dataset files" in err and "Traceback" not in err
    assert not (tmp_path / "db").exists()


def test_cli_download_of_present_copy_is_a_no_op(dreambooth_dir, capsys, monkeypatch):
    monkeypatch.setenv("SUBJECTBENCH_DATASET_URL", closed_port_url())
    assert main(["data", "download", "--dataset-dir", str(dreambooth_dir), "--source", "github"]) == 0
    assert "already present and verified (159 files)" in capsys.readouterr().out


def test_unwritable_target_is_a_clear_error(tmp_path, tiny_files, serve):
    server = serve(tar_gz(tiny_files))
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DatasetError, match=r"cannot write the dataset at .*a-file/db .*writable --dataset-dir"):
        fetch(tmp_path / "a-file" / "db", manifest_of(tiny_files), server.url)
