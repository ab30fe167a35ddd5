#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system packages, the virtualenv, pinned requirements.
# Prints each thing it does; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
say() { printf '[bootstrap] %s\n' "$*"; }
# pip install, quiet, without the warnings some machines' pip configuration prints for every
# package (find-links folders that do not exist); pip's own exit status is kept.
pipq() {
  set +e
  .venv/bin/python -m pip install -q "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory"
  local status=${PIPESTATUS[0]}
  set -e
  return "$status"
}

need_apt=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi
if ! command -v redis-server >/dev/null 2>&1; then
  need_apt+=(redis-server)
fi
if ! command -v runuser >/dev/null 2>&1; then
  need_apt+=(util-linux)
fi
# `bootstrap.sh --test` (what `make test` runs) also brings what the tests drive: a real browser
# for the Airflow UI page and a real terminal for the REPL.
if [ "${1:-}" = "--test" ] || [ "${FLEETMEDIC_BROWSER:-0}" = "1" ]; then
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then
    say "installing system packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
    # The Debian packages start their own server instances; fleetmedic runs its own on chosen ports.
    for svc in redis-server postgresql; do
      if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
    done
  else
    say "missing system packages: ${need_apt[*]}"
    say "install them with: sudo apt-get install -y ${need_apt[*]}"
    exit 1
  fi
else
  say "system packages present"
fi

# PostgreSQL refuses to run as root: when we are root, its binaries run as an unprivileged user.
if [ "$(id -u)" = "0" ]; then
  PGUSER_OS=${FLEETMEDIC_PG_OS_USER:-postgres}
  if ! id "$PGUSER_OS" >/dev/null 2>&1; then
    say "creating system user $PGUSER_OS for PostgreSQL"
    useradd --system --no-create-home --shell /usr/sbin/nologin "$PGUSER_OS"
  fi
fi

if ! command -v "$PY" >/dev/null 2>&1; then
  say "$PY not found; fleetmedic needs Python 3.11 (apt-get install python3.11 python3.11-venv)"
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  say "creating virtualenv .venv with $PY"
  "$PY" -m venv .venv
fi

stamp=.venv/.requirements.sha
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing pinned requirements into .venv (first time takes a few minutes)"
  pipq --upgrade pip wheel
  pipq -r requirements.txt
  pipq --no-deps -e .
  echo "$want" > "$stamp"
else
  say "virtualenv up to date"
fi
