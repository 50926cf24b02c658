#!/usr/bin/env bash
# Gathers what scripts/gpu_slice.sh needs on a GPU machine that has no network, into device-files/ at the
# repository root (ignored by git; carry that one folder to the GPU machine):
#
#   device-files/bundle.tar.xz   wheels/: the Python packages the slice imports that a GPU image with torch
#                                lacks, for CPython 3.12 on manylinux x86_64; lib/: the system libraries
#                                Procgen links (OpenGL, GLib, X11), from Debian/Ubuntu packages, used only
#                                where the GPU machine lacks them
#   device-files/MANIFEST.txt    what is in the bundle, what the GPU image must already have, what is left out
#
# Run it on a Linux x86_64 machine with network (PyPI and the machine's apt sources), from anywhere:
#   scripts/gather_device_files.sh
# It needs python3 (3.11 or later, with pip), apt-get, dpkg-deb, ldd, tar and xz; it prints the bundle's
# size beside the working tree's, which travel to the GPU machine together (64 MiB at most there).
#
# Why a bundle and not a folder of wheels: the transfer allows 64 MiB for the working tree and the carried
# files together, and Procgen's wheel alone is 45 MiB. Wheels re-zipped without compression and packed with
# xz take about 9 MiB less than the wheels as PyPI serves them; pip installs such wheels unchanged. Two of
# Procgen's files are carried in a form xz packs better, each decoding to what the wheel had, and the wheel's
# RECORD is given their new hashes and sizes (scripts/rezip_wheels.py): libenv.so without its debug
# information (16 of its 17 MB, 3.3 MiB of the bundle; strip --strip-debug, its code and symbols untouched),
# and the game art's PNGs with their pixel data deflated at level 0 (stored), the same pixels and every other
# chunk byte for byte: xz packs the raw pixels about 6 MiB smaller than it packs deflate's output. Procgen
# loads every game's art at startup, so no game's art can be left out instead.
set -euo pipefail

fail() { echo "gather_device_files.sh: $*" >&2; exit 1; }

# The packages carried, by their pip names: what ppo.py, mdpo.py, sweep.py, export.py and the test suite's
# collection import, minus what the GPU image already has (FROM_IMAGE). Their versions are uv.lock's for
# Python 3.12, the versions the CPU test suite runs with.
CARRY="procgen-mirror gym3 gym gym-notices cffi pycparser cloudpickle gymnasium farama-notifications kornia
kornia-rs tyro docstring-parser typeguard typing-extensions"
# Built here from their source distributions: PyPI has no wheel of them (gym is pure Python).
FROM_SDIST="gym"
# Imported by the slice but not carried: the GPU image has them (torch with its CUDA libraries; numpy 2,
# which the slices in results/ ran with: numpy<2, which procgen-mirror and gym3 declare, takes 18 MB
# that the transfer does not have). gpu_slice.sh stops in one line if one of them does not import.
FROM_IMAGE="torch numpy matplotlib tensorboard tqdm pytest pillow imageio filelock packaging"
# Declared by requirements.txt or by a carried package, never imported on the GPU machine: gym3's video
# writer and window (imageio-ffmpeg alone is 22 MB), and the statistics, t-SNE and Slurm launcher that
# plot.py, tsne.py and sweep.py's Slurm path import (plot.py runs on the CPU machine, over results/).
LEFT_OUT="imageio-ffmpeg glfw moderngl scikit-learn scipy rliable pandas submitit procgen"

# Debian/Ubuntu packages of the libraries Procgen's libenv.so and its bundled Qt link from the system
# (`ldd` of it), and those libraries' file names. Checked below: with lib/ first on the library path,
# every library libenv.so needs is in lib/, in the wheel, or in the C and C++ runtimes every Linux has.
# A|B: A where the apt sources know it (Ubuntu 24.04 and Debian 13 renamed GLib's package), else B.
DEB_PACKAGES="libgl1 libglx0 libglvnd0 libx11-6 libxcb1 libxau6 libxdmcp6 libbsd0 libmd0
libglib2.0-0t64|libglib2.0-0 libpcre2-8-0"
SONAMES="libGL.so.1 libGLX.so.0 libGLdispatch.so.0 libX11.so.6 libxcb.so.1 libXau.so.6 libXdmcp.so.6 libbsd.so.0
libmd.so.0 libglib-2.0.so.0 libgthread-2.0.so.0 libpcre2-8.so.0"
RUNTIME_LIBS='^(linux-vdso\.so|ld-linux-x86-64\.so|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libresolv\.so|libstdc\+\+\.so|libgcc_s\.so|libz\.so)'
LIMIT_MIB=64

[ $# -eq 0 ] || fail "takes no arguments (got: $*)"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
[ -f uv.lock ] && [ -f requirements.txt ] || fail "no uv.lock or requirements.txt in $root"
for tool in python3 apt-get apt-cache dpkg dpkg-deb ldd tar xz git strip; do
    command -v "$tool" >/dev/null || fail "needs $tool"
done
python3 -c 'import sys, tomllib' 2>/dev/null || fail "needs python3 3.11 or later (tomllib reads uv.lock)"
python3 -m pip --version >/dev/null 2>&1 || fail "needs pip for python3"
[ "$(uname -m)" = x86_64 ] || fail "run it on x86_64: ldd checks the GPU machine's (x86_64) libraries here"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bundle/wheels" "$stage/bundle/lib" "$stage/debs" "$stage/root"

echo "== versions from uv.lock (Python 3.12)"
# Also checks the lists against requirements.txt and the carried wheels' metadata below, so that a
# requirement added later is carried, expected from the image or left out on purpose, never forgotten.
CARRY="$CARRY" FROM_IMAGE="$FROM_IMAGE" LEFT_OUT="$LEFT_OUT" python3 - "$stage/pins.txt" <<'EOF' || exit 1
import os, re, sys, tomllib
from pip._vendor.packaging.markers import Marker  # pip's own copy: the script needs nothing beyond pip

def norm(name): return re.sub(r"[-_.]+", "-", name).lower()

env = {"python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
carry, image, left_out = ({norm(n) for n in os.environ[k].split()} for k in ("CARRY", "FROM_IMAGE", "LEFT_OUT"))
known = carry | image | left_out
for line in open("requirements.txt"):
    name = re.match(r"\s*([A-Za-z0-9._-]*)", line).group(1)
    if name and norm(name) not in known:
        sys.exit(f"gather_device_files.sh: requirements.txt's {name} is in none of CARRY, FROM_IMAGE, LEFT_OUT")
pins = {}
for package in tomllib.load(open("uv.lock", "rb"))["package"]:
    markers = package.get("resolution-markers")
    if norm(package["name"]) in carry and (not markers or any(Marker(m).evaluate(env) for m in markers)):
        pins[norm(package["name"])] = package["version"]
missing = sorted(carry - pins.keys())
if missing:
    sys.exit(f"gather_device_files.sh: uv.lock has no Python 3.12 version of {', '.join(missing)}")
with open(sys.argv[1], "w") as out:
    out.writelines(f"{name}=={pins[name]}\n" for name in sorted(pins))
print(" ".join(f"{name}=={pins[name]}" for name in sorted(pins)))
EOF

echo "== wheels"
binary_pins=$(grep -v -E "^($(echo $FROM_SDIST | tr ' ' '|'))==" "$stage/pins.txt")
# The GPU machine's glibc is 2.39 (Ubuntu 24.04); pip matches each manylinux tag exactly, so name them all.
platforms=""
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux2010_x86_64 manylinux1_x86_64; do platforms="$platforms --platform $tag"; done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d "$stage/bundle/wheels" $binary_pins || fail "pip download failed (network, or a version without a wheel)"
for name in $FROM_SDIST; do
    python3 -m pip wheel -q --no-deps -w "$stage/bundle/wheels" "$(grep "^$name==" "$stage/pins.txt")" \
        || fail "could not build $name's wheel from its source"
done
for wheel in "$stage"/bundle/wheels/*.whl; do
    case $wheel in *-py3-none-any.whl|*-cp312-*manylinux*x86_64*.whl|*-abi3-*manylinux*x86_64*.whl) ;;
        *) fail "$(basename "$wheel") is not for CPython 3.12 on Linux x86_64" ;; esac
done
CARRY="$CARRY" FROM_IMAGE="$FROM_IMAGE" LEFT_OUT="$LEFT_OUT" python3 - "$stage/bundle/wheels" <<'EOF' || exit 1
import glob, os, re, sys, zipfile
from pip._vendor.packaging.requirements import Requirement

def norm(name): return re.sub(r"[-_.]+", "-", name).lower()

env = {"python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": "",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
known = {norm(n) for k in ("CARRY", "FROM_IMAGE", "LEFT_OUT") for n in os.environ[k].split()}
for wheel in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if (req.marker is None or req.marker.evaluate(env)) and norm(req.name) not in known:
                sys.exit(f"gather_device_files.sh: {os.path.basename(wheel)} needs {req.name}, "
                         "which is in none of CARRY, FROM_IMAGE, LEFT_OUT")
EOF

echo "== system libraries for Procgen"
[ "$(dpkg --print-architecture)" = amd64 ] || fail "the libraries come from this machine's apt sources: needs amd64"
packages=""
for choice in $DEB_PACKAGES; do
    found=""
    for name in ${choice//|/ }; do
        if apt-cache show "$name" >/dev/null 2>&1; then found=$name; break; fi
    done
    [ -n "$found" ] || fail "the apt sources know none of ${choice//|/, } (run apt-get update as root?)"
    packages="$packages $found"
done
# shellcheck disable=SC2086
(cd "$stage/debs" && apt-get download -q=2 $packages 2> >(grep -v "unsandboxed" >&2)) \
    || fail "apt-get download failed for:$packages (run apt-get update as root?)"
for deb in "$stage"/debs/*.deb; do dpkg-deb -x "$deb" "$stage/root"; done
for soname in $SONAMES; do
    file=$(find "$stage/root" -name "$soname" | head -n 1)
    [ -n "$file" ] || fail "no $soname in the packages$packages"
    cp -L "$file" "$stage/bundle/lib/$soname"  # plain files: links may not survive the transfer
done
python3 - "$stage/bundle/wheels"/procgen_mirror-*.whl "$stage/procgen" <<'EOF'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
EOF
libenv="$stage/procgen/procgen/data/prebuilt/libenv.so"
[ -f "$libenv" ] || fail "procgen-mirror's wheel has no procgen/data/prebuilt/libenv.so"
ldd_out=$(LD_LIBRARY_PATH="$stage/bundle/lib" ldd "$libenv")
if grep -q "not found" <<<"$ldd_out"; then fail "libenv.so still lacks: $(grep "not found" <<<"$ldd_out" | awk '{print $1}' | xargs)"; fi
# Each line as "name path": "name => path (address)", or "path (address)" for the loader and the vDSO.
outside=$(awk '$2 == "=>" {print $1, $3; next} {n = split($1, p, "/"); print p[n], $1}' <<<"$ldd_out" \
    | grep -v -e " $stage/bundle/lib/" -e " $stage/procgen/" | awk '{print $1}' | grep -v -E "$RUNTIME_LIBS" || true)
[ -z "$outside" ] || fail "libenv.so also links $(echo $outside), not gathered: add its package to DEB_PACKAGES"

echo "== bundle"
# Wheels re-zipped without compression (xz then finds what deflate left), Procgen's libenv.so stripped and its
# PNGs' pixels stored: each is still a wheel, with a RECORD that matches it.
python3 scripts/rezip_wheels.py "$stage/bundle/wheels" || exit 1
{
    echo "What scripts/gather_device_files.sh put in bundle.tar.xz, for CPython 3.12 on Linux x86_64."
    echo
    echo "wheels/ (installed by gpu_slice.sh with pip --no-index --no-deps):"
    (cd "$stage/bundle/wheels" && ls -1 *.whl | sed 's/^/  /')
    echo
    echo "lib/ (on LD_LIBRARY_PATH only where Procgen does not load without it), from:"
    for deb in "$stage"/debs/*.deb; do
        echo "  $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)"
    done
    echo
    echo "expected on the GPU machine, not carried: $(echo $FROM_IMAGE)"
    echo "left out (never imported there): $(echo $LEFT_OUT)"
} >"$stage/MANIFEST.txt"
rm -rf device-files
mkdir device-files
tar -C "$stage/bundle" -cf - wheels lib | xz -T0 -6 >device-files/bundle.tar.xz
cp "$stage/MANIFEST.txt" device-files/

mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
bundle_bytes=$(du -cb device-files/* | tail -n 1 | cut -f 1)
# What travels besides the carried folder: tracked files and untracked ones git does not ignore.
# (A tracked file deleted from the tree has no size: stat's complaint about it is dropped.)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | { xargs -0 stat -c %s 2>/dev/null || true; } \
    | awk '{s += $1} END {print s + 0}')
total=$((bundle_bytes + tree_bytes))
echo "device-files: $(mib "$bundle_bytes") ($(ls "$stage/bundle/wheels" | wc -l) wheels, $(ls "$stage/bundle/lib" | wc -l) libraries);" \
     "working tree: $(mib "$tree_bytes"); together $(mib "$total") of the ${LIMIT_MIB} MiB a GPU call carries"
[ "$total" -le $((LIMIT_MIB * 1048576)) ] || fail "over the ${LIMIT_MIB} MiB that travel to the GPU machine"
