#!/usr/bin/env bash
# Builds and tests the crate for aarch64 Linux from an x86_64 Debian/Ubuntu machine.
#
#   scripts/aarch64.sh test          # `cargo test --no-default-features` for aarch64, run
#                                    # under qemu-user (what `make test-aarch64` runs)
#   scripts/aarch64.sh wheel DIR     # the release abi3 wheel for aarch64 into DIR
#                                    # (what `make wheels` runs; needs VIRTUAL_ENV with maturin)
#   scripts/aarch64.sh import WHEEL  # import the aarch64 wheel's extension under qemu with
#                                    # Debian's aarch64 CPython 3.11 and open a checkpoint
#   scripts/aarch64.sh smoke [WHEEL] # leanstream.load of a tiny Llama at NF4 and int8 under qemu
#                                    # with aarch64 CPython 3.11, torch and bitsandbytes, checked
#                                    # bit for bit against bitsandbytes on the same emulated CPU
#                                    # (needs VIRTUAL_ENV with pip; about 3 GB of wheels, once)
#   scripts/aarch64.sh env           # print the environment these use, for doing it by hand
#
# It installs what it lacks, and nothing it has: the Debian cross linker and libc
# (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross), qemu-user-static (for `test`, `import`, `smoke`,
# only if no qemu-aarch64 is on PATH), and the rustup target. The cross settings are environment
# variables set here, not .cargo/config.toml, so that host builds are untouched.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

missing_debs() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' ||
            echo "$pkg"
    done
}

install_debs() {
    local missing sudo=()
    mapfile -t missing < <(missing_debs "$@")
    [ "${#missing[@]}" -gt 0 ] || return 0
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "aarch64.sh: installing ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

find_qemu() {
    command -v qemu-aarch64-static || command -v qemu-aarch64
}

# arm64_debs ROOT PKG...: Debian's arm64 packages PKG, fetched by apt-get download and
# unpacked once into ROOT (not installed; a `.complete` marker after the last one). Debian only.
arm64_debs() {
    local root="$1" deb sudo=()
    shift
    [ ! -f "$root/.complete" ] || return 0
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        "${sudo[@]}" dpkg --add-architecture arm64
        "${sudo[@]}" apt-get update -qq
    fi
    rm -rf "$root" && mkdir -p "$root/debs"
    (cd "$root/debs" && apt-get download -qq "${@/%/:arm64}")
    for deb in "$root"/debs/*.deb; do
        dpkg-deb -x "$deb" "$root"
    done
    rm -rf "$root/debs" && touch "$root/.complete"
}

setup() {
    local debs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    if [ "${1:-}" = qemu ] && ! find_qemu >/dev/null; then
        debs+=(qemu-user-static)
    fi
    install_debs "${debs[@]}"
    if ! rustup target list --installed | grep -qx "$target"; then
        rustup target add "$target"
    fi
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    # For any build script that compiles C with the cc crate (none today).
    export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
    export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
    if [ "${1:-}" = qemu ]; then
        local qemu
        qemu="$(find_qemu)" || { echo "aarch64.sh: no qemu-aarch64 after installing" >&2; exit 1; }
        export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu"
        # Where qemu finds the aarch64 dynamic loader and libc the test binaries ask for.
        export QEMU_LD_PREFIX="$sysroot"
    fi
}

case "${1:-test}" in
test)
    setup qemu
    # The byte-level core only, as `make test-rust`: the python feature would link libpython.
    cargo test --no-default-features --target "$target"
    ;;
wheel)
    out="${2:?usage: scripts/aarch64.sh wheel DIR}"
    : "${VIRTUAL_ENV:?set VIRTUAL_ENV to the environment with maturin}"
    setup
    # abi3: no aarch64 Python is needed to build. maturin's audit reads the .so's glibc
    # symbol versions and picks the manylinux tag from them, cross or not.
    "$VIRTUAL_ENV/bin/python" -m maturin build --release --quiet --target "$target" --out "$out"
    ;;
import)
    wheel="$(realpath "${2:?usage: scripts/aarch64.sh import WHEEL}")"
    setup qemu
    # Debian's own aarch64 python3.11-minimal (interpreter and the minimal stdlib, 3 MB of
    # .debs, fetched by apt-get download for the arm64 architecture and unpacked once into
    # the cache, not installed). Debian only.
    root="${LEANSTREAM_CACHE:-$HOME/.cache/leanstream}/aarch64-python3.11"
    arm64_debs "$root" python3.11-minimal libpython3.11-minimal zlib1g libexpat1
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # Unpacked by this machine's Python: the minimal stdlib's zipfile lacks shutil.
    so="$(python3 -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
so = next(n for n in z.namelist() if n.endswith(".so"))
print(z.extract(so, sys.argv[2]))' "$wheel" "$work")"
    LD_LIBRARY_PATH="$root/lib/aarch64-linux-gnu:$root/usr/lib/aarch64-linux-gnu" \
        PYTHONHOME="$root/usr" "$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER" \
        "$root/usr/bin/python3.11" -S - "$so" "$work" <<'PY'
import importlib.machinery, importlib.util, platform, sys

so, work = sys.argv[1:]
loader = importlib.machinery.ExtensionFileLoader("leanstream._core", so)
core = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
loader.exec_module(core)
header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
header += b" " * (-len(header) % 8)
with open(f"{work}/t.safetensors", "wb") as f:
    f.write(len(header).to_bytes(8, "little") + header + bytes(8))
assert core.Checkpoint(f"{work}/t.safetensors").keys() == ["a"]
name = so[len(work) + 1 :]
print(f"{name} imports on {platform.machine()} (CPython {platform.python_version()}, qemu)")
PY
    ;;
smoke)
    wheel="$(realpath "${2:-dist/leanstream-0.1.0-cp311-abi3-manylinux_2_34_aarch64.whl}")"
    [ -f "$wheel" ] || { echo "aarch64.sh: no $wheel (make wheels)" >&2; exit 1; }
    : "${VIRTUAL_ENV:?set VIRTUAL_ENV to an environment with pip (scripts/env.sh)}"
    setup qemu
    cache="${LEANSTREAM_CACHE:-$HOME/.cache/leanstream}"
    now() { date +%s.%N; }
    took() { awk -v a="$2" -v b="$(now)" -v what="$1" \
        'BEGIN { printf "aarch64.sh smoke: %-30s %7.1f s\n", what, b - a }' >&2; }
    # Debian's aarch64 CPython 3.11 with its whole stdlib (ctypes, ssl, bz2, lzma:
    # torch and transformers import them) and the C++ runtime torch's libraries link.
    t=$(now)
    root="$cache/aarch64-python3.11-full"
    arm64_debs "$root" python3.11-minimal libpython3.11-minimal libpython3.11-stdlib \
        zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 \
        libstdc++6 libgcc-s1
    took "python (apt-get download)" "$t"
    # The registry's aarch64 wheels, unpacked into one site-packages keyed by the pins.
    t=$(now)
    req=scripts/aarch64-smoke-requirements.txt
    site="$cache/aarch64-site-$(sha256sum "$req" | cut -c1-16)"
    if [ ! -f "$site/.complete" ]; then
        # an interrupted run's unpacked files go; its downloads stay (pip skips those)
        mkdir -p "$site/.wheels"
        find "$site" -mindepth 1 -maxdepth 1 ! -name .wheels -exec rm -rf {} +
        platforms=()
        for glibc in $(seq 17 36); do  # Debian 12's glibc is 2.36
            platforms+=(--platform "manylinux_2_${glibc}_aarch64")
        done
        "$VIRTUAL_ENV/bin/python" -m pip download -q --no-deps --only-binary=:all: \
            "${platforms[@]}" --platform manylinux2014_aarch64 --platform any \
            --python-version 3.11 --implementation cp -d "$site/.wheels" -r "$req"
        took "wheels (pip download)" "$t"
        t=$(now)
        for whl in "$site"/.wheels/*.whl; do
            python3 -m zipfile -e "$whl" "$site"
        done
        rm -rf "$site/.wheels" && touch "$site/.complete"
        took "wheels (unpack)" "$t"
    fi
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    python3 -m zipfile -e "$wheel" "$work/site"
    # qemu-user (7.2, Debian 12) shows the guest this machine's x86 /proc/cpuinfo, and torch's
    # cpuinfo crashes parsing it at `import torch` (SIGSEGV in torch._C's init). So the run
    # gets its own mount namespace with an aarch64 /proc/cpuinfo bound over the real one: two
    # Neoverse-N1 cores, the CPU qemu emulates here (QEMU_CPU), with that CPU's features.
    for cpu in 0 1; do
        printf '%s\t: %s\n' processor "$cpu" BogoMIPS 50.00 Features \
            "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs" \
            "CPU implementer" 0x41 "CPU architecture" 8 "CPU variant" 0x3 "CPU part" 0xd0c \
            "CPU revision" 1
        echo
    done >"$work/cpuinfo"
    unshare=(unshare --mount)
    [ "$(id -u)" -eq 0 ] || unshare+=(--map-root-user)
    # -S: no site module (it would look for this machine's paths); PYTHONPATH stands in.
    t=$(now)
    # shellcheck disable=SC2016  # the inner shell expands $1 and $@
    LD_LIBRARY_PATH="$root/lib/aarch64-linux-gnu:$root/usr/lib/aarch64-linux-gnu" \
        PYTHONHOME="$root/usr" PYTHONPATH="$work/site:$site" QEMU_CPU=neoverse-n1 \
        HF_HUB_OFFLINE=1 HOME="$work" "${unshare[@]}" sh -c \
        'mount --bind "$1" /proc/cpuinfo && shift && exec "$@"' sh "$work/cpuinfo" \
        "$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER" "$root/usr/bin/python3.11" -S \
        -X faulthandler scripts/aarch64_smoke.py "$work/model"
    took "smoke test under qemu (total)" "$t"
    ;;
env)
    setup qemu >&2
    env | grep -E '^(CARGO_TARGET_AARCH64|CC_aarch64|AR_aarch64|QEMU_LD_PREFIX)' |
        sed 's/^/export /'
    ;;
*)
    echo "usage: scripts/aarch64.sh [test | wheel DIR | import WHEEL | smoke [WHEEL] | env]" >&2
    exit 2
    ;;
esac
