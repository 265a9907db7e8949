#!/bin/sh
# Runs as root while the serving image is built (bentofile.yaml: docker.setup_script).
# The service runs as the image's non-root user `bentoml` on a read-only root filesystem
# (docker-compose.yml: read_only: true). Its one writable place is /var/lib/imgclf, a volume:
# BentoML's run-time state (BENTOML_HOME: task results, Prometheus files) and temporary upload
# files (TMPDIR). Made here and owned by `bentoml`, so a new volume mounted there starts with
# that ownership. Nothing else in the image is writable by the service. The image's template
# (deploy/container/Dockerfile.j2) points BENTOML_HOME and TMPDIR here and declares it a VOLUME, so a
# plain `--read-only` run works too (the engine mounts an anonymous volume).
set -eu
mkdir -p /var/lib/imgclf/bentoml /var/lib/imgclf/tmp
chown -R bentoml:bentoml /var/lib/imgclf
chmod 0750 /var/lib/imgclf
