#!/usr/bin/env bash
# Run a command with a Docker engine at hand (make image-test, make compose-test).
#
#   scripts/with_docker.sh [--compose] CMD [ARGS...]
#
# Installs what is missing with apt (Debian's docker.io and debootstrap; root only), starts
# dockerd when none answers, runs CMD, and afterwards stops the dockerd it started (and only
# that one: an engine that was already running is left alone). With --compose it also makes sure
# `docker compose` is Compose v2.24 or newer (the CPU override uses `!reset`): Debian 12 packages
# only Compose v1, so the plugin is taken from Debian 13's docker-compose package, fetched with
# apt into a private list (the system's apt sources are not changed) and installed as a CLI plugin
# under /usr/local/lib/docker/cli-plugins.
set -euo pipefail

compose=0
if [[ ${1:-} == --compose ]]; then
    compose=1
    shift
fi
[[ $# -gt 0 ]] || { echo "usage: $0 [--compose] CMD [ARGS...]" >&2; exit 2; }

need_root() {
    if [[ $(id -u) != 0 ]]; then
        echo "$0: $1 needs root (run as root, or install it yourself)" >&2
        exit 1
    fi
}

apt_updated=0
apt_install() {
    need_root "apt-get install $*"
    if [[ $apt_updated == 0 ]]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "installing ${missing[*]} (apt)"
    apt_install "${missing[@]}"
fi

compose_ok() {
    local v
    v=$(docker compose version --short 2>/dev/null) || return 1
    v=${v#v}
    local major=${v%%.*} rest=${v#*.}
    local minor=${rest%%.*}
    [[ $major -gt 2 || ($major -eq 2 && ${minor%%[!0-9]*} -ge 24) ]]
}

if [[ $compose == 1 ]] && ! compose_ok; then
    need_root "installing Compose v2"
    echo "installing Compose v2 (Debian 13's docker-compose package) as a docker CLI plugin"
    tmp=$(mktemp -d)
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${DEBIAN13_MIRROR:-http://deb.debian.org/debian} trixie main" >"$tmp/sources.list"
    opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1
        -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq
    (cd "$tmp" && apt-get "${opts[@]}" download -qq docker-compose)
    dpkg-deb -x "$tmp"/docker-compose_*.deb "$tmp/x"
    mkdir -p /usr/local/lib/docker/cli-plugins
    install -m 755 "$tmp/x/usr/libexec/docker/cli-plugins/docker-compose" \
        /usr/local/lib/docker/cli-plugins/docker-compose
    rm -rf "$tmp"
    compose_ok || { echo "$0: docker compose is still not v2.24+" >&2; exit 1; }
fi

started=""
stop_dockerd() {
    if [[ -n $started ]] && kill -0 "$started" 2>/dev/null; then
        echo "stopping the dockerd this run started (pid $started)"
        kill -TERM "$started"
        for _ in $(seq 60); do kill -0 "$started" 2>/dev/null || break; sleep 1; done
    fi
}

if ! docker info >/dev/null 2>&1; then
    need_root "starting dockerd"
    log=${DOCKERD_LOG:-/tmp/deqguard-dockerd.log}
    echo "no Docker engine answers: starting dockerd (log: $log)"
    # niced: this machine shares its cores with long jobs; containers inherit it
    nice -n "${DOCKERD_NICE:-10}" setsid dockerd >"$log" 2>&1 &
    started=$!
    trap stop_dockerd EXIT
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "$0: dockerd did not come up; see $log" >&2; exit 1; }
fi

"$@"
