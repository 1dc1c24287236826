#!/usr/bin/env bash
# Assembles the agent image of cross/Dockerfile (FROM scratch, /uplink,
# USER 65532:65532) for linux/amd64 and linux/arm64 as one OCI image layout
# tarball, without a container engine, deterministically: the same binaries
# and commit give the same bytes.
#
#   cross/image.sh [--out FILE] [--verify]
#
# Run cross/build.sh first (it builds target/TRIPLE/release/uplink).
# Output: dist/uplink-image-VERSION.oci.tar (an OCI layout: oci-layout,
# index.json, blobs/sha256/...). index.json names the multi-arch index
# VERSION (org.opencontainers.image.ref.name) and
# ghcr.io/uplink/uplink:VERSION (io.containerd.image.name). Load it with
#   skopeo copy oci-archive:dist/uplink-image-VERSION.oci.tar:VERSION docker://REGISTRY/uplink:VERSION
#   ctr image import --all-platforms dist/uplink-image-VERSION.oci.tar
#   docker load -i dist/uplink-image-VERSION.oci.tar   (Docker 25+, or the containerd image store)
#
# --verify assembles the image twice and compares the bytes, inspects it
# with skopeo (or umoci) when installed, and unpacks each layer to check it
# holds exactly the static binary /uplink.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT=""
VERIFY=0
while (($#)); do
    case "$1" in
    --out)
        OUT="${2:?--out needs a path}"
        shift 2
        ;;
    --verify) VERIFY=1 && shift ;;
    *)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
    esac
done

VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
REPOSITORY="ghcr.io/uplink/uplink"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ -n "$OUT" ]] || OUT="$ROOT/dist/uplink-image-$VERSION.oci.tar"
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)"
fi
CREATED="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"

die() {
    printf 'cross/image.sh: %s\n' "$*" >&2
    exit 1
}

triple_of() {
    case "$1" in
    amd64) echo x86_64-unknown-linux-musl ;;
    arm64) echo aarch64-unknown-linux-musl ;;
    esac
}

# Deterministic tar: sorted, root-owned, every mtime the commit time, plain
# ustar (no pax records that could carry times or names of this machine).
det_tar() {
    tar --sort=name --format=ustar --mtime="@$SOURCE_DATE_EPOCH" \
        --owner=0 --group=0 --numeric-owner "$@"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# Moves file $1 into the layout's blob store; prints "sha256:HEX SIZE".
put_blob() {
    local digest
    digest="$(sha "$1")"
    printf '%s %s\n' "sha256:$digest" "$(size "$1")"
    mv "$1" "$layout/blobs/sha256/$digest"
}

# assemble OUTFILE: builds the layout in a temporary directory and packs it.
assemble() {
    local out="$1" work arch triple bin desc
    work="$(mktemp -d)"
    layout="$work/layout"
    mkdir -p "$layout/blobs/sha256"
    local entries=()
    for arch in amd64 arm64; do
        triple="$(triple_of "$arch")"
        bin="$TARGET_DIR/$triple/release/uplink"
        [[ -x "$bin" ]] || die "$bin is missing: run cross/build.sh first"
        desc="$(file -b "$bin")"
        [[ "$desc" == *"statically linked"* || "$desc" == *"static-pie linked"* ]] ||
            die "$bin is not statically linked: $desc"

        mkdir -p "$work/rootfs-$arch"
        install -m 0755 "$bin" "$work/rootfs-$arch/uplink"
        det_tar -C "$work/rootfs-$arch" -cf "$work/layer.tar" uplink
        local diff_id layer config manifest variant=""
        diff_id="sha256:$(sha "$work/layer.tar")"
        gzip -9n <"$work/layer.tar" >"$work/layer.tar.gz"
        rm "$work/layer.tar"
        read -r -a layer <<<"$(put_blob "$work/layer.tar.gz")"

        [[ "$arch" == arm64 ]] && variant=',"variant":"v8"'
        # The image config of cross/Dockerfile: USER, ENTRYPOINT, CMD.
        printf '%s' \
            '{"architecture":"'"$arch"'","config":{"Cmd":["run"],"Entrypoint":["/uplink"],' \
            '"Env":["PATH=/"],"Labels":{"org.opencontainers.image.licenses":"Apache-2.0",' \
            '"org.opencontainers.image.title":"uplink","org.opencontainers.image.version":"'"$VERSION"'"},' \
            '"User":"65532:65532","WorkingDir":"/"},"created":"'"$CREATED"'",' \
            '"history":[{"created":"'"$CREATED"'","created_by":"COPY uplink /uplink"}],' \
            '"os":"linux","rootfs":{"diff_ids":["'"$diff_id"'"],"type":"layers"}'"$variant"'}' \
            >"$work/config.json"
        read -r -a config <<<"$(put_blob "$work/config.json")"

        printf '%s' \
            '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",' \
            '"config":{"mediaType":"application/vnd.oci.image.config.v1+json",' \
            '"digest":"'"${config[0]}"'","size":'"${config[1]}"'},' \
            '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip",' \
            '"digest":"'"${layer[0]}"'","size":'"${layer[1]}"'}],' \
            '"annotations":{"org.opencontainers.image.created":"'"$CREATED"'",' \
            '"org.opencontainers.image.version":"'"$VERSION"'"}}' \
            >"$work/manifest.json"
        read -r -a manifest <<<"$(put_blob "$work/manifest.json")"
        entries+=('{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"'"${manifest[0]}"'","size":'"${manifest[1]}"',"platform":{"architecture":"'"$arch"'","os":"linux"'"$variant"'}}')
    done

    local joined index
    joined="$(
        IFS=,
        echo "${entries[*]}"
    )"
    printf '%s' \
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",' \
        '"manifests":['"$joined"']}' >"$work/index.json"
    read -r -a index <<<"$(put_blob "$work/index.json")"
    printf '%s' \
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[' \
        '{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"'"${index[0]}"'",' \
        '"size":'"${index[1]}"',"annotations":{"io.containerd.image.name":"'"$REPOSITORY:$VERSION"'",' \
        '"org.opencontainers.image.ref.name":"'"$VERSION"'"}}]}' >"$layout/index.json"
    printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

    mkdir -p "$(dirname "$out")"
    (cd "$layout" && det_tar -cf - oci-layout index.json blobs) >"$out"
    rm -rf "$work"
    echo "${index[0]}"
}

digest="$(assemble "$OUT")"
echo "image $REPOSITORY:$VERSION (index $digest)"
echo "$(sha "$OUT")  $OUT"

((VERIFY)) || exit 0

# 1. Determinism: a second assembly gives the same bytes.
second="$(mktemp --suffix=.oci.tar)"
check="$(mktemp -d)"
trap 'rm -rf "$second" "$check"' EXIT
assemble "$second" >/dev/null
cmp -s "$OUT" "$second" || die "not reproducible: a second assembly differs"
echo "reproducible: second assembly identical"

# 2. Every layer holds exactly /uplink: the static binary of its platform,
#    byte for byte, mode 0755, owned by root.
tar -C "$check" -xf "$OUT"
jq_free_get() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
for arch in amd64 arm64; do
    triple="$(triple_of "$arch")"
    idx="$(jq_free_get digest <"$check/index.json")"
    # The platform's manifest digest, then its (single) layer digest.
    man="$(grep -o "\"digest\":\"[^\"]*\",\"size\":[0-9]*,\"platform\":{\"architecture\":\"$arch\"" \
        "$check/blobs/sha256/${idx#sha256:}" | jq_free_get digest)"
    [[ -n "$man" ]] || die "no $arch manifest in the index"
    layer_digest="$(grep -o '"layers":\[{[^]]*' "$check/blobs/sha256/${man#sha256:}" | jq_free_get digest)"
    listing="$(tar -tvzf "$check/blobs/sha256/${layer_digest#sha256:}")"
    [[ "$(wc -l <<<"$listing")" == 1 && "$listing" == "-rwxr-xr-x 0/0 "*" uplink" ]] ||
        die "$arch layer is not just /uplink: $listing"
    tar -C "$check" -xzf "$check/blobs/sha256/${layer_digest#sha256:}" uplink
    cmp -s "$check/uplink" "$TARGET_DIR/$triple/release/uplink" || die "$arch layer's /uplink differs from the build"
    rm "$check/uplink"
    echo "layer $arch: exactly /uplink (0755 root), identical to $triple/release/uplink"
done

# 3. A real OCI tool reads it.
if command -v skopeo >/dev/null; then
    for arch in amd64 arm64; do
        out="$(skopeo --override-os linux --override-arch "$arch" inspect --config "oci-archive:$OUT:$VERSION")"
        grep -q '"User": "65532:65532"' <<<"$out" || die "skopeo: $arch config has no USER 65532:65532"
        grep -q '"/uplink"' <<<"$out" || die "skopeo: $arch config has no ENTRYPOINT /uplink"
        # A copy reads every blob and checks it against its digest.
        skopeo --override-os linux --override-arch "$arch" copy --quiet \
            "oci-archive:$OUT:$VERSION" "dir:$check/copy-$arch" || die "skopeo copy ($arch) failed"
        echo "skopeo inspect + copy ($arch): ok, digests verified, user 65532:65532, entrypoint /uplink"
    done
elif command -v umoci >/dev/null; then
    mkdir -p "$check/umoci"
    tar -C "$check/umoci" -xf "$OUT"
    umoci ls --layout "$check/umoci" | grep -qx "$VERSION" || die "umoci does not list $VERSION"
    echo "umoci ls: ok"
else
    echo "skopeo and umoci not installed: skipped the OCI tool check (apt-get install skopeo)"
fi
