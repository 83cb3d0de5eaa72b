#!/usr/bin/env bash
# promtool (Debian's prometheus package) for tests/deploy: Prometheus config, alert rules, dashboard PromQL.
set -euo pipefail
command -v promtool >/dev/null && exit 0
[[ $EUID -eq 0 ]] || { echo "promtool.sh: promtool is missing; run: sudo apt-get install prometheus" >&2; exit 1; }
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
