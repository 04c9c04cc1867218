#!/usr/bin/env bash
# Install the Debian packages the test suite needs (SLURM one-node cluster, munge,
# iproute2 for network namespaces). Idempotent, non-interactive, quiet; fast when
# everything is already installed. Run as root (CI calls it before the tests).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PKGS=(slurmctld slurmd slurm-client munge iproute2)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install_system_deps: need root to install: ${missing[*]}" >&2; exit 1; fi
fi

echo "install_system_deps: installing ${missing[*]}" >&2
# Package maintainer scripts try to start services; there is no init system in CI
# containers, so forbid service starts during install (tests start the daemons themselves).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

log=$(mktemp)
if ! { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "install_system_deps: apt-get failed" >&2
    exit 1
fi
rm -f "$log"
echo "install_system_deps: done" >&2
