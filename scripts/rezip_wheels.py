"""Re-zips every wheel in a folder without compression, for scripts/gather_device_files.sh: xz then finds what
deflate left, and each is still a wheel that pip installs. Two of Procgen's files are carried in a form xz packs
better, each decoding to what the wheel had, and the wheel's RECORD is given their new hashes and sizes:
libenv.so without its debug information, and the game art's PNGs with their pixel data stored.

    python3 scripts/rezip_wheels.py WHEEL_DIR     (standard library only: it runs with the system's python3)
"""

import base64
import csv
import glob
import hashlib
import io
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib

STRIPPED = "procgen/data/prebuilt/libenv.so"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MAX_CHUNK = 2**31 - 1  # the PNG specification's largest chunk length


class BadFile(Exception):
    """A file of a wheel that cannot be carried as this script means to."""


def without_debug_info(data: bytes) -> bytes:
    """The shared library stripped of its debug information (strip --strip-debug): its code and symbols untouched."""
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "library.so")
        with open(path, "wb") as f:
            f.write(data)
        subprocess.run(["strip", "--strip-debug", path], check=True)
        with open(path, "rb") as f:
            return f.read()


def png_chunks(data: bytes) -> list:
    """(kind, whole chunk as in the file) for each chunk up to IEND; anything else is BadFile."""
    if not data.startswith(PNG_SIGNATURE):
        raise BadFile("not a PNG")
    chunks, pos = [], len(PNG_SIGNATURE)
    while not chunks or chunks[-1][0] != b"IEND":
        if pos + 12 > len(data):
            raise BadFile("ends inside a chunk, or before IEND")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        end = pos + 12 + length
        if length > PNG_MAX_CHUNK or end > len(data):
            raise BadFile(f"a chunk of {length} bytes at byte {pos} runs past the file")
        chunks.append((data[pos + 4:pos + 8], data[pos:end]))
        pos = end
    if pos != len(data):
        raise BadFile(f"{len(data) - pos} bytes after IEND")
    return chunks


def with_stored_pixels(data: bytes) -> bytes:
    """The same PNG with its pixel data (the IDAT chunks, joined) deflated at level 0 into one IDAT chunk: every
    other chunk is kept byte for byte and the pixels decode to the same bytes, but xz now sees the pixels
    themselves, which it packs smaller than it packs deflate's output."""
    chunks = png_chunks(data)
    idat = [i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT"]
    if not idat or idat != list(range(idat[0], idat[-1] + 1)):  # the specification wants them consecutive
        raise BadFile("its IDAT chunks are missing or not consecutive")
    try:
        raw = zlib.decompress(b"".join(chunks[i][1][8:-4] for i in idat))
    except zlib.error as error:
        raise BadFile(f"its pixel data does not inflate ({error})") from None
    stored = zlib.compress(raw, 0)
    if len(stored) > PNG_MAX_CHUNK:
        raise BadFile("its pixels stored would not fit in one chunk")
    chunk = struct.pack(">I", len(stored)) + b"IDAT" + stored + struct.pack(">I", zlib.crc32(b"IDAT" + stored))
    return PNG_SIGNATURE + b"".join(whole for _, whole in chunks[:idat[0]]) + chunk + b"".join(
        whole for _, whole in chunks[idat[-1] + 1:])


def smaller_in_xz(name: str, data: bytes):
    """What is carried in place of a wheel's file, or None to carry it as it is."""
    if name == STRIPPED:
        return without_debug_info(data)
    if name.startswith("procgen/data/assets/") and data.startswith(PNG_SIGNATURE):
        return with_stored_pixels(data)
    return None


def record_with(record: bytes, changed: dict) -> bytes:
    """The wheel's RECORD (CSV: path, sha256=urlsafe-base64 digest, size) with the changed files' hashes and sizes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in csv.reader(io.StringIO(record.decode())):
        if row and row[0] in changed:
            digest = base64.urlsafe_b64encode(hashlib.sha256(changed[row[0]]).digest()).rstrip(b"=").decode()
            row = [row[0], f"sha256={digest}", str(len(changed[row[0]]))]
        writer.writerow(row)
    return out.getvalue().encode()


def rezip(wheel: str) -> None:
    """The wheel, in place, uncompressed, with smaller_in_xz's files and a RECORD that matches them."""
    with zipfile.ZipFile(wheel) as zin:
        contents = [(info, zin.read(info)) for info in zin.infolist()]
    changed = {}
    for info, data in contents:
        try:
            smaller = smaller_in_xz(info.filename, data)
        except BadFile as error:
            raise BadFile(f"{os.path.basename(wheel)}: {info.filename}: {error}") from None
        if smaller is not None:
            changed[info.filename] = smaller
    if os.path.basename(wheel).startswith("procgen_mirror-") and STRIPPED not in changed:
        raise BadFile(f"{os.path.basename(wheel)} has no {STRIPPED}")
    stored = wheel + ".stored"
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zout:
        for info, data in contents:
            data = changed.get(info.filename, data)
            if info.filename.endswith(".dist-info/RECORD") and changed:
                data = record_with(data, changed)
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
    os.replace(stored, wheel)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python3 scripts/rezip_wheels.py WHEEL_DIR (a folder of .whl files)")
    try:
        for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
            rezip(path)
    except BadFile as error:
        sys.exit(f"rezip_wheels.py: {error}")
