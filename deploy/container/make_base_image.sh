#!/bin/sh
# Makes the local base image that stands in for python:3.11-slim where no container registry can be
# reached (the project's CI machines): Debian 12 minbase from Debian's mirror (its python3 is 3.11,
# the version bentofile.yaml pins) and Python's venv + pip, which BentoML's Dockerfile uses. Idempotent:
# nothing happens when the image exists.
#
#   deploy/container/make_base_image.sh [IMAGE]        # default localhost/imgclf-base:bookworm
#
# Why each step: BentoML's template runs `pip install uv` into the system Python, so Debian's
# EXTERNALLY-MANAGED marker goes; pip and uv inside the build verify TLS against the host's CA bundle,
# copied in (SSL_CERT_FILE, PIP_CERT, REQUESTS_CA_BUNDLE, UV_NATIVE_TLS). apt's caches and lists are
# removed: they would otherwise be a third of the base.
set -eu
IMAGE=${1:-localhost/imgclf-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if podman image exists "$IMAGE"; then
  echo "base image $IMAGE exists"
  exit 0
fi
for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install podman runc debootstrap" >&2; exit 1; }
done
root=$(mktemp -d /var/tmp/imgclf-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$MIRROR" >/dev/null
rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED
cp /etc/ssl/certs/ca-certificates.crt "$root"/etc/ssl/certs/host-ca.crt
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
CA=/etc/ssl/certs/host-ca.crt
tar -C "$root" -c . | podman import \
  --change "ENV SSL_CERT_FILE=$CA" --change "ENV PIP_CERT=$CA" --change "ENV REQUESTS_CA_BUNDLE=$CA" \
  --change "ENV UV_NATIVE_TLS=1" --change "ENV LANG=C.UTF-8" --change 'CMD ["python3"]' \
  - "$IMAGE" >/dev/null
echo "made base image $IMAGE: $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"
