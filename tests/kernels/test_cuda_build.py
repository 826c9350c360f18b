"""A CUDA build of cabattn._C carries machine code for every architecture it was built for.

Reads the extension's .nv_fatbin section (objcopy) and walks its fatbin entries: each has a
kind (2 = cubin, 1 = PTX) and an sm architecture. The expected architectures follow
TORCH_CUDA_ARCH_LIST as setup.py uses it (default "8.0;9.0+PTX"). Checks the in-place
extension, or the file named by CABATTN_EXTENSION (e.g. an out-of-place build).
"""
import glob
import os
import shutil
import struct
import subprocess

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # (pyproject.toml: markers)

FATBIN_MAGIC = 0xBA55ED50
CUBIN, PTX = 2, 1
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # setup.py's default


def expected_architectures(arch_list: str):
    """({sm numbers with machine code}, {sm numbers with PTX}) of a TORCH_CUDA_ARCH_LIST."""
    cubins, ptx = set(), set()
    for item in arch_list.replace(" ", ";").split(";"):
        if not item:
            continue
        arch = int(item.removesuffix("+PTX").replace(".", ""))
        cubins.add(arch)
        if item.endswith("+PTX"):
            ptx.add(arch)
    return cubins, ptx


def fatbin_entries(blob: bytes):
    """(kind, sm) of every entry of the fatbin containers in a .nv_fatbin section."""
    entries, pos = [], 0
    while pos + 16 <= len(blob):
        magic, _, header_size, body_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != FATBIN_MAGIC:  # padding between containers
            pos += 8
            continue
        entry, end = pos + header_size, pos + header_size + body_size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            (arch,) = struct.unpack_from("<I", blob, entry + 28)
            entries.append((kind, arch))
            entry += entry_header + payload
        pos = end
    return entries


def extension_path() -> str:
    path = os.environ.get("CABATTN_EXTENSION")
    if path:
        return path
    built = sorted(glob.glob(os.path.join(REPO, "cabattn", "_C*.so")))
    if not built:
        pytest.skip("cabattn._C is not built in place (python setup.py build_ext --inplace)")
    return built[0]


def test_fatbin_parser_reads_a_synthetic_container():
    def entry(kind, arch, payload):
        header = struct.pack("<HHIQ", kind, 0, 64, len(payload)) + bytes(12)
        header += struct.pack("<I", arch)
        return header + bytes(64 - len(header)) + payload

    body = entry(CUBIN, 80, b"x" * 40) + entry(PTX, 90, b"y" * 8)
    blob = struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body + bytes(8)
    assert fatbin_entries(blob) == [(CUBIN, 80), (PTX, 90)]
    assert expected_architectures("8.0;9.0+PTX") == ({80, 90}, {90})


def test_cuda_build_carries_code_for_each_architecture(tmp_path):
    if shutil.which("readelf") is None or shutil.which("objcopy") is None:
        pytest.skip("readelf/objcopy (binutils) not installed")
    path = extension_path()
    needed = subprocess.run(["readelf", "-d", path], capture_output=True, text=True,
                            check=True).stdout
    if "c10_cuda" not in needed:
        pytest.skip(f"{os.path.basename(path)} was built without CUDA (CABATTN_CPU_ONLY=1 or no "
                    "nvcc): it does not link c10_cuda")
    sections = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True,
                              check=True).stdout
    assert ".nv_fatbin" in sections, f"{path} links c10_cuda but has no .nv_fatbin section"
    section = tmp_path / "fatbin.bin"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", path, str(section)],
                   check=True)
    entries = fatbin_entries(section.read_bytes())
    cubins = {arch for kind, arch in entries if kind == CUBIN}
    ptx = {arch for kind, arch in entries if kind == PTX}
    want_cubins, want_ptx = expected_architectures(
        os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST))
    assert want_cubins <= cubins, f"machine code for sm {sorted(cubins)}, want {sorted(want_cubins)}"
    assert want_ptx <= ptx, f"PTX for sm {sorted(ptx)}, want {sorted(want_ptx)}"
