#!/usr/bin/env bash
# Static, reproducible release builds of uplink (agent) and uplink-hub for
# x86_64 and aarch64 Linux (musl), packed as release tarballs.
#
#   cross/build.sh [--target TRIPLE]... [--agent-only TRIPLE]... [--opt-level z|s|3]
#                  [--no-install] [--no-pack] [--no-e2e] [--verify-reproducible]
#
# Output (dist/ at the repository top, git-ignored):
#   dist/uplink-VERSION-TRIPLE/           the staged tree of each tarball
#   dist/uplink-VERSION-TRIPLE.tar.gz     binaries, systemd units, config, README, LICENSE
#   dist/SHA256SUMS                       sha256 of every tarball
#
# --agent-only TRIPLE builds, checks and packs only the agent for that target
# (CI uses it to save the hub's build for aarch64; releases build everything).
#
# Toolchain choice: rustup's musl targets ship their own musl libc.a and
# start files, so only a C compiler is needed for the C inside ring and
# rusqlite's bundled SQLite. We use Debian's gcc (native for x86_64,
# gcc-aarch64-linux-gnu for aarch64) with the musl-gcc specs file of
# Debian's musl-dev for that architecture, so the C code is compiled against
# musl's headers, not glibc's. (Plain glibc headers are not enough: SQLite
# then calls open64/fstat64/..., which the static musl of Rust does not
# export.) cargo-zigbuild would do the same job but needs zig, which is not a
# Debian package; this way everything comes from apt and rustup.
#
# Reproducibility: the same commit gives the same bytes. Paths are remapped
# (--remap-path-prefix for rustc, -ffile-prefix-map for gcc) so the checkout
# and cargo home locations do not leak into the binaries; SOURCE_DATE_EPOCH is
# the commit time; tarballs are packed sorted, with fixed owner and mtime, and
# gzip -n. --verify-reproducible builds a second time from a copy of the tree
# at another path with a fresh target directory and compares every sha256.
#
# Checks after each build: `file` must say statically linked; the agent must
# not contain SQLite (hub-only code); sizes against cross/size-budget; each
# binary is run (aarch64 under qemu-aarch64-static) as a smoke test; then the
# static agent of each target goes through a real lifecycle (tests/e2e_cross.rs:
# register on a real hub, activate, a request as alice through the hub to the
# stand-in API server, deregister, exit 4), aarch64 under qemu-aarch64-static.
# The hub and the test itself are this machine's debug build (`cargo test`,
# already built when CI gets here). --no-e2e skips that.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TARGETS=()
AGENT_ONLY=()
OPT_LEVEL=""
INSTALL=1
PACK=1
VERIFY=0
E2E=1

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

while (($#)); do
    case "$1" in
    --target)
        TARGETS+=("${2:?--target needs a triple}")
        shift 2
        ;;
    --agent-only)
        AGENT_ONLY+=("${2:?--agent-only needs a triple}")
        shift 2
        ;;
    --opt-level)
        OPT_LEVEL="${2:?--opt-level needs a value}"
        shift 2
        ;;
    --no-install) INSTALL=0 && shift ;;
    --no-pack) PACK=0 && shift ;;
    --no-e2e) E2E=0 && shift ;;
    --verify-reproducible) VERIFY=1 && shift ;;
    -h | --help) usage ;;
    *)
        echo "unknown argument: $1" >&2
        usage
        ;;
    esac
done
((${#TARGETS[@]})) || TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)

# The binaries built for target $1.
bins_for() {
    local a
    for a in "${AGENT_ONLY[@]}"; do
        [[ "$a" != "$1" ]] || {
            echo uplink
            return
        }
    done
    echo uplink uplink-hub
}

log() { printf '\n=== %s\n' "$*" >&2; }
die() {
    printf 'cross/build.sh: %s\n' "$*" >&2
    exit 1
}

VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
[[ -n "$VERSION" ]] || die "cannot read the package version from Cargo.toml"

# The commit time makes every timestamp (tar entries, anything a build script
# stamps) a function of the commit. Outside git, fall back to a fixed epoch.
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)"
fi
export SOURCE_DATE_EPOCH

# --- toolchain ---------------------------------------------------------------

# Debian multiarch directory of each target (for musl-dev's specs file).
musl_dir() {
    case "$1" in
    x86_64-unknown-linux-musl) echo x86_64-linux-musl ;;
    aarch64-unknown-linux-musl) echo aarch64-linux-musl ;;
    *) die "unsupported target $1 (x86_64-unknown-linux-musl, aarch64-unknown-linux-musl)" ;;
    esac
}

gcc_for() {
    case "$1" in
    x86_64-unknown-linux-musl) echo x86_64-linux-gnu-gcc ;;
    aarch64-unknown-linux-musl) echo aarch64-linux-gnu-gcc ;;
    esac
}

deb_arch() {
    case "$1" in
    x86_64-unknown-linux-musl) echo amd64 ;;
    aarch64-unknown-linux-musl) echo arm64 ;;
    esac
}

install_toolchain() {
    local t apt_pkgs=() arch
    local installed
    installed="$(rustup target list --installed)"
    for t in "${TARGETS[@]}"; do
        grep -qx "$t" <<<"$installed" || rustup target add "$t"
        arch="$(deb_arch "$t")"
        if ! command -v "$(gcc_for "$t")" >/dev/null; then
            # The native compiler comes with `gcc`; a cross one has its own package.
            if [[ "$t" == "$(uname -m)"-* ]]; then
                apt_pkgs+=(gcc)
            else
                apt_pkgs+=("gcc-$(gcc_for "$t" | sed 's/-gcc$//; s/_/-/g')")
            fi
        fi
        if [[ ! -f "/usr/lib/$(musl_dir "$t")/musl-gcc.specs" ]]; then
            if [[ "$arch" != "$(dpkg --print-architecture)" ]] &&
                ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
                dpkg --add-architecture "$arch"
            fi
            apt_pkgs+=("musl-dev:$arch")
        fi
        if [[ "$t" == aarch64-* && "$(uname -m)" != aarch64 ]]; then
            command -v qemu-aarch64-static >/dev/null || apt_pkgs+=(qemu-user-static)
        fi
    done
    command -v file >/dev/null || apt_pkgs+=(file)
    if ((${#apt_pkgs[@]})); then
        log "apt-get install ${apt_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
    fi
}

# --- build -------------------------------------------------------------------

# Environment for one cargo invocation for target $1. Everything is passed
# through the environment so the repository needs no .cargo/config.toml.
cargo_env() {
    local t="$1" up cargo_home rustup_home target_dir
    up="$(tr '[:lower:]-' '[:upper:]_' <<<"$t")"
    cargo_home="${CARGO_HOME:-$HOME/.cargo}"
    rustup_home="${RUSTUP_HOME:-$HOME/.rustup}"
    target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
    local remap=(
        "--remap-path-prefix=$ROOT=/build/uplink"
        "--remap-path-prefix=$target_dir=/build/target"
        "--remap-path-prefix=$cargo_home=/cargo"
        "--remap-path-prefix=$rustup_home=/rustup"
    )
    local cmap="-ffile-prefix-map=$ROOT=/build/uplink -ffile-prefix-map=$target_dir=/build/target"
    cmap+=" -ffile-prefix-map=$cargo_home=/cargo"
    printf '%s\n' \
        "CC_${t//-/_}=$(gcc_for "$t")" \
        "CFLAGS_${t//-/_}=-specs=/usr/lib/$(musl_dir "$t")/musl-gcc.specs $cmap" \
        "CARGO_TARGET_${up}_LINKER=$(gcc_for "$t")" \
        "CARGO_TARGET_${up}_RUSTFLAGS=-C target-feature=+crt-static ${remap[*]}"
    [[ -z "$OPT_LEVEL" ]] || echo "CARGO_PROFILE_RELEASE_OPT_LEVEL=$OPT_LEVEL"
}

build_target() {
    local t="$1" envs=()
    mapfile -t envs < <(cargo_env "$t")
    # RUSTFLAGS would silently override the per-target flags above.
    log "build uplink (agent, --no-default-features) for $t"
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS "${envs[@]}" \
        cargo build --release --locked --target "$t" --no-default-features --bin uplink
    [[ "$(bins_for "$t")" == *uplink-hub* ]] || return 0
    log "build uplink-hub for $t"
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS "${envs[@]}" \
        cargo build --release --locked --target "$t" --bin uplink-hub
}

bin_dir() { echo "${CARGO_TARGET_DIR:-$ROOT/target}/$1/release"; }

# --- checks ------------------------------------------------------------------

budget_for() {
    awk -v n="$1" '$1 == n { print $2 }' "$ROOT/cross/size-budget"
}

run_bin() {
    local t="$1"
    shift
    if [[ "$t" == "$(uname -m)"-* ]]; then
        "$@"
    elif [[ "$t" == aarch64-* ]]; then
        qemu-aarch64-static "$@"
    else
        die "no way to run a $t binary on $(uname -m)"
    fi
}

check_target() {
    local t="$1" dir b size budget desc out
    dir="$(bin_dir "$t")"
    for b in $(bins_for "$t"); do
        [[ -x "$dir/$b" ]] || die "$dir/$b was not built"
        desc="$(file -b "$dir/$b")"
        [[ "$desc" == *"statically linked"* || "$desc" == *"static-pie linked"* ]] ||
            die "$t/$b is not statically linked: $desc"
        size="$(stat -c %s "$dir/$b")"
        budget="$(budget_for "$b")"
        [[ -n "$budget" ]] || die "no budget for $b in cross/size-budget"
        printf '%-28s %-11s %9d bytes (budget %d)  %s\n' "$t" "$b" "$size" "$budget" \
            "$(sha256sum "$dir/$b" | cut -c1-16)" >&2
        ((size <= budget)) || die "$t/$b is $size bytes, over its budget of $budget (cross/size-budget)"
    done
    # The agent must not link what only the hub needs (DESIGN.md).
    if grep -qa "SQLite format 3" "$dir/uplink"; then
        die "$t/uplink contains SQLite: hub-only code leaked into the agent"
    fi
    out="$(run_bin "$t" "$dir/uplink" version)" || die "$t/uplink version failed"
    [[ "$out" == *"$VERSION"* ]] || die "$t/uplink version printed '$out', not $VERSION"
    if [[ "$(bins_for "$t")" == *uplink-hub* ]]; then
        run_bin "$t" "$dir/uplink-hub" --help >/dev/null || die "$t/uplink-hub --help failed"
    fi
    printf '%-28s smoke test ok: %s\n' "$t" "$out" >&2
}

# --- end to end --------------------------------------------------------------

# tests/e2e_cross.rs with the static agent of target $1 (see the header).
e2e_target() {
    local t="$1" runner="" start=$SECONDS
    if [[ "$t" != "$(uname -m)"-* ]]; then
        [[ "$t" == aarch64-* ]] || die "no way to run a $t binary on $(uname -m)"
        runner=qemu-aarch64-static
    fi
    # The native build of the hub and the test, as `cargo test` makes it: none
    # of the release or cross settings above.
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u SOURCE_DATE_EPOCH \
        UPLINK_AGENT_BIN="$(bin_dir "$t")/uplink" UPLINK_AGENT_RUNNER="$runner" \
        UPLINK_AGENT_ARCH="${t%%-*}" \
        cargo test --locked --test e2e_cross -- --nocapture ||
        die "$t/uplink failed the end-to-end test (tests/e2e_cross.rs)"
    printf '%-28s e2e ok in %ds: activation, request as alice, deregistration (exit 4)%s\n' \
        "$t" $((SECONDS - start)) "${runner:+ under $runner}" >&2
}

# --- pack --------------------------------------------------------------------

pack_target() {
    local t="$1" name stage dir
    name="uplink-$VERSION-$t"
    stage="$ROOT/dist/$name"
    dir="$(bin_dir "$t")"
    rm -rf "$stage"
    mkdir -p "$stage/systemd" "$stage/config"
    for b in $(bins_for "$t"); do
        install -m 0755 "$dir/$b" "$stage/"
    done
    install -m 0644 "$ROOT"/systemd/*.service "$ROOT"/systemd/*.socket "$stage/systemd/"
    install -m 0644 "$ROOT"/config/* "$stage/config/"
    install -m 0644 "$ROOT/README.md" "$ROOT/LICENSE" "$stage/"
    chmod 0755 "$stage" "$stage/systemd" "$stage/config"
    # Deterministic archive: sorted names, numeric root owner, the commit time
    # as every mtime, no atime/ctime pax records, gzip without name or time.
    tar --sort=name --format=posix \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
        -C "$ROOT/dist" -cf - "$name" | gzip -9n >"$ROOT/dist/$name.tar.gz"
    echo "$name.tar.gz"
}

# --- main --------------------------------------------------------------------

((INSTALL)) && install_toolchain

for t in "${TARGETS[@]}"; do
    musl_dir "$t" >/dev/null
    build_target "$t"
done

log "checks"
for t in "${TARGETS[@]}"; do
    check_target "$t"
done

if ((E2E)); then
    for t in "${TARGETS[@]}"; do
        log "end to end: the static agent for $t"
        e2e_target "$t"
    done
fi

if ((PACK)); then
    log "pack"
    mkdir -p "$ROOT/dist"
    tarballs=()
    for t in "${TARGETS[@]}"; do
        tarballs+=("$(pack_target "$t")")
    done
    (cd "$ROOT/dist" && sha256sum "${tarballs[@]}" >SHA256SUMS)
    cat "$ROOT/dist/SHA256SUMS" >&2
fi

if ((VERIFY)); then
    log "reproducibility: second build from a copy of the tree at another path"
    copy="$(mktemp -d /tmp/uplink-repro.XXXXXX)"
    trap 'rm -rf "$copy"' EXIT
    # Only what the build reads: the sources as they are now (committed or not).
    tar -C "$ROOT" --exclude=./target --exclude=./dist --exclude=./.git -cf - . | tar -C "$copy" -xf -
    targs=(--no-e2e)
    for t in "${TARGETS[@]}"; do targs+=(--target "$t"); done
    for t in "${AGENT_ONLY[@]}"; do targs+=(--agent-only "$t"); done
    [[ -z "$OPT_LEVEL" ]] || targs+=(--opt-level "$OPT_LEVEL")
    ((PACK)) || targs+=(--no-pack)
    CARGO_TARGET_DIR="$copy/target" SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" \
        bash "$copy/cross/build.sh" --no-install "${targs[@]}"
    fail=0
    for t in "${TARGETS[@]}"; do
        for b in $(bins_for "$t"); do
            a="$(sha256sum <"$(bin_dir "$t")/$b")"
            c="$(sha256sum <"$copy/target/$t/release/$b")"
            if [[ "$a" == "$c" ]]; then
                echo "reproducible: $t/$b ${a%% *}" >&2
            else
                echo "NOT reproducible: $t/$b ${a%% *} != ${c%% *}" >&2
                fail=1
            fi
        done
    done
    if ((PACK)); then
        if cmp -s "$ROOT/dist/SHA256SUMS" "$copy/dist/SHA256SUMS"; then
            echo "reproducible: tarballs (SHA256SUMS identical)" >&2
        else
            diff "$ROOT/dist/SHA256SUMS" "$copy/dist/SHA256SUMS" >&2 || true
            fail=1
        fi
    fi
    ((fail == 0)) || die "the second build differs"
fi
