#!/usr/bin/env bash
# Builds the syncplane container image without a daemon (buildah, vfs storage) on a Debian base made by
# debootstrap, and writes it as an OCI layout with its SBOM (SPDX JSON, by syft) into build/image/:
#   build/image/ref               the image's name in buildah's storage (localhost/syncplane:<inputs hash>)
#   build/image/oci/              the image as an OCI layout (what a registry would receive)
#   build/image/sbom.spdx.json    its SBOM
# Each part is rebuilt only when its inputs change (a second run prints "cached" for each):
#   - the base rootfs: ~/.cache/syncplane/debian-<release>-<recipe hash>.tar (the recipe is the function below);
#   - syft: built from the Go module proxy into ~/.cache/syncplane/syft-<version>/bin (as the cluster binaries);
#   - the image: tagged by a hash of the base and of every build input (Dockerfile, lock file, sources).
# Run as root (debootstrap, buildah's chroot isolation). The tier tests/image runs this first.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${SYNCPLANE_CACHE:-$HOME/.cache/syncplane}"
DEBIAN_RELEASE="${DEBIAN_RELEASE:-bookworm}"   # bookworm's python3 is CPython 3.11, as the default base's
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SYFT_VERSION="${SYFT_VERSION:-v1.57.1}"
IMAGE="${IMAGE:-localhost/syncplane}"
KEEP_IMAGES=3            # older localhost/syncplane tags are removed (a vfs image is a full copy per layer)
OUT="$ROOT/build/image"
export STORAGE_DRIVER=vfs  # no overlay inside a container; vfs works anywhere as root
log() { echo "[build-image] $*" >&2; }
bah() { buildah --storage-driver vfs "$@"; }

for tool in buildah debootstrap go; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing (make apt installs buildah and debootstrap)" >&2; exit 1; }
done
mkdir -p "$CACHE" "$OUT"

# The base: Debian minbase with python3 and its venv module, without apt's lists and caches, manuals and
# translations (the copyright files stay). Changing this function changes the cache key.
debootstrap_base() {
  local rootfs="$1"
  debootstrap --variant=minbase --include=python3,python3-venv "$DEBIAN_RELEASE" "$rootfs" "$DEBIAN_MIRROR" >&2
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
         "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
         "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
  find "$rootfs"/usr/share/doc -type f ! -name copyright -delete
  find "$rootfs"/usr/share/doc -depth -type d -empty -delete
}

build_base() {
  local recipe; recipe="$(declare -f debootstrap_base | sha256sum | cut -c1-12)"
  BASE_IMAGE="localhost/syncplane-base:$DEBIAN_RELEASE-$recipe"
  local tarball="$CACHE/debian-$DEBIAN_RELEASE-$recipe.tar"
  if [[ -f "$tarball" ]]; then
    log "cached $tarball"
  else
    log "debootstrap $DEBIAN_RELEASE from $DEBIAN_MIRROR (about a minute or more)"
    local t0=$SECONDS tmp
    tmp="$(mktemp -d "$CACHE/debootstrap.XXXXXX")"
    debootstrap_base "$tmp/rootfs"
    tar -C "$tmp/rootfs" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$tmp"
    log "built $tarball in $((SECONDS - t0))s"
  fi
  if bah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    log "cached $BASE_IMAGE"
    return
  fi
  local ctr mnt
  ctr="$(bah from --quiet scratch)"
  mnt="$(bah mount "$ctr")"
  tar -C "$mnt" --numeric-owner -xpf "$tarball"
  bah umount "$ctr" >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --label "org.opencontainers.image.description=Debian $DEBIAN_RELEASE minbase + python3" "$ctr"
  bah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  log "imported $BASE_IMAGE"
}

build_syft() {
  SYFT="$CACHE/syft-$SYFT_VERSION/bin/syft"
  if [[ -x "$SYFT" ]]; then log "cached $SYFT"; return; fi
  log "building syft $SYFT_VERSION from the Go module proxy (slow on a cold cache)"
  local t0=$SECONDS
  mkdir -p "$(dirname "$SYFT")"
  GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 \
    GOBIN="$(dirname "$SYFT")" go install -trimpath -ldflags "-s -w" "github.com/anchore/syft/cmd/syft@$SYFT_VERSION"
  log "built syft in $((SECONDS - t0))s"
}

# Everything that goes into the image, and the base it goes on.
inputs_hash() {
  (cd "$ROOT" && {
    bah inspect --type image --format '{{.FromImageID}}' "$BASE_IMAGE"
    find Dockerfile .dockerignore requirements.lock pyproject.toml server operator -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16)
}

build_image() {
  REF="$IMAGE:$(inputs_hash)"
  if bah inspect --type image "$REF" >/dev/null 2>&1; then log "cached $REF"; return; fi
  log "buildah bud $REF on $BASE_IMAGE"
  local t0=$SECONDS args=()
  # The build reaches the package index through the builder's network: trust what the host trusts.
  local bundle="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
  if [[ -f "$bundle" ]]; then
    args+=(--volume "$bundle:/etc/ssl/certs/ca-certificates.crt:ro" --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
  fi
  if [[ -n "${PIP_INDEX_URL:-}" ]]; then args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"); fi
  bah bud --isolation chroot --build-arg "BASE=$BASE_IMAGE" "${args[@]}" -f "$ROOT/Dockerfile" -t "$REF" "$ROOT" >&2
  log "built $REF in $((SECONDS - t0))s"
  # Older builds of this image go (the newest few stay for worktrees that still use them).
  bah images --noheading --format '{{.CreatedAtRaw}}|{{.Name}}:{{.Tag}}' | grep -F "|$IMAGE:" | sort \
    | cut -d'|' -f2 | grep -vxF "$REF" | head -n -$((KEEP_IMAGES - 1)) \
    | xargs -r buildah --storage-driver vfs rmi >/dev/null 2>&1 || true
}

export_image() {
  if [[ "$(cat "$OUT/ref" 2>/dev/null)" == "$REF" && -f "$OUT/oci/index.json" && -f "$OUT/sbom.spdx.json" ]]; then
    log "cached $OUT/oci, $OUT/sbom.spdx.json"
    return
  fi
  local t0=$SECONDS
  rm -rf "$OUT/oci" "$OUT/sbom.spdx.json" "$OUT/ref"
  bah push --quiet "$REF" "oci:$OUT/oci:${REF##*:}" >/dev/null
  SYFT_CHECK_FOR_APP_UPDATE=false "$SYFT" scan --quiet "oci-dir:$OUT/oci" -o "spdx-json=$OUT/sbom.spdx.json.tmp"
  mv "$OUT/sbom.spdx.json.tmp" "$OUT/sbom.spdx.json"
  echo "$REF" > "$OUT/ref"
  log "wrote $OUT/oci and $OUT/sbom.spdx.json in $((SECONDS - t0))s"
}

build_base
build_image
build_syft
export_image
bah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$REF" | sed 's/^/[build-image] /' >&2
echo "$REF"
