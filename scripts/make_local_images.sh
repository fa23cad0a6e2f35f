#!/usr/bin/env bash
# Local base images for hosts that reach no image registry (docs/DEPLOYMENT.md, "Without registry
# access"). Needs root, debootstrap, Docker and Debian's package mirror (apt's, not a registry).
#
#   scripts/make_local_images.sh base    deqguard/debian-base:bookworm  (python3 + venv, for the image)
#   scripts/make_local_images.sh ops     deqguard/nginx:bookworm and deqguard/prometheus:bookworm
#                                        (Debian's nginx-light and prometheus packages, for compose)
#   scripts/make_local_images.sh all     both
#
# An image that exists already is kept (FORCE=1 rebuilds). The root file systems are made under
# $WORK (default /var/tmp/deqguard-rootfs) and removed afterwards.
set -euo pipefail

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
WORK=${WORK:-/var/tmp/deqguard-rootfs}
BASE_TAG=${BASE_TAG:-deqguard/debian-base:$SUITE}
NGINX_TAG=${NGINX_TAG:-deqguard/nginx:$SUITE}
PROM_TAG=${PROM_TAG:-deqguard/prometheus:$SUITE}
FORCE=${FORCE:-0}

have() { [[ $FORCE != 1 ]] && docker image inspect "$1" >/dev/null 2>&1; }

rootfs() {  # a minimal Debian with python3 (python3-venv: the Dockerfile makes a venv)
    local dir=$WORK/base
    if [[ ! -x $dir/usr/bin/python3 ]]; then
        rm -rf "$dir" && mkdir -p "$dir"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$dir" "$MIRROR"
        # as in Debian's official images: no services start in a container, no apt caches kept
        printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
        chmod +x "$dir/usr/sbin/policy-rc.d"
        chroot "$dir" apt-get clean
        rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin
    fi
}

import_rootfs() {  # import DIR TAG [docker import --change ...]
    local dir=$1 tag=$2
    shift 2
    tar -C "$dir" --numeric-owner -c . | docker import "$@" - "$tag" >/dev/null
    echo "imported $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)"
}

with_packages() {  # with_packages NAME PKG... : a copy of the base rootfs with Debian packages added
    local name=$1
    shift
    local dir=$WORK/$name
    rm -rf "$dir" && cp -a "$WORK/base" "$dir"
    cp /etc/resolv.conf "$dir/etc/resolv.conf"
    chroot "$dir" apt-get update -qq
    chroot "$dir" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    chroot "$dir" apt-get clean
    rm -rf "$dir"/var/lib/apt/lists/*
    : >"$dir/etc/resolv.conf"
}

base() {
    if have "$BASE_TAG"; then echo "$BASE_TAG exists"; return; fi
    rootfs
    import_rootfs "$WORK/base" "$BASE_TAG" --change 'CMD ["/bin/bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
}

ops() {
    if ! have "$NGINX_TAG"; then
        rootfs
        with_packages nginx nginx-light
        # logs to the container's stdout/stderr, as in the official nginx image
        ln -sf /dev/stdout "$WORK/nginx/var/log/nginx/access.log"
        ln -sf /dev/stderr "$WORK/nginx/var/log/nginx/error.log"
        import_rootfs "$WORK/nginx" "$NGINX_TAG" \
            --change 'CMD ["nginx", "-g", "daemon off;"]'
        rm -rf "$WORK/nginx"
    else
        echo "$NGINX_TAG exists"
    fi
    if ! have "$PROM_TAG"; then
        rootfs
        with_packages prometheus prometheus
        mkdir -p "$WORK/prometheus/prometheus"
        chown -R "$(chroot "$WORK/prometheus" id -u prometheus):$(chroot "$WORK/prometheus" id -g prometheus)" \
            "$WORK/prometheus/prometheus"
        import_rootfs "$WORK/prometheus" "$PROM_TAG" --change 'USER prometheus' \
            --change 'WORKDIR /prometheus' --change 'EXPOSE 9090' \
            --change 'ENTRYPOINT ["/usr/bin/prometheus"]' \
            --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
        rm -rf "$WORK/prometheus"
    else
        echo "$PROM_TAG exists"
    fi
}

case ${1:-all} in
base) base ;;
ops) ops ;;
all) base && ops ;;
*) echo "usage: $0 base|ops|all" >&2 && exit 2 ;;
esac
if [[ ${KEEP_ROOTFS:-0} != 1 ]]; then rm -rf "$WORK"; fi
