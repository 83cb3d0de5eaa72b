#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests of the PostgreSQL experiment store.
#
# Installs Debian's postgresql package if no server binaries are found, creates a
# cluster in its own data directory (not Debian's 'main' cluster) on first use,
# starts it listening on 127.0.0.1 only, and makes sure the test role and database
# exist. Safe to run again: whatever is already there is kept. Exports nothing;
# prints the URL (the only line on stdout) for ARCHSERVE_TEST_POSTGRES_URL, which
# the tests default to anyway. Progress goes to stderr.
#
#   ARCHSERVE_PG_PORT  port on 127.0.0.1               (default 55432)
#   ARCHSERVE_PG_DIR   data directory, socket and log  (default /var/tmp/archserve-postgres)
#
# The server is for tests only: fsync is off, so a machine crash can lose its data.
#
#   bash .ci/postgres.sh [start]   set up and start, as above (the default)
#   bash .ci/postgres.sh stop      stop it (fast: open transactions are rolled back); start brings it back as before
set -euo pipefail

ACTION="${1:-start}"
[[ "$ACTION" == start || "$ACTION" == stop ]] || { echo "usage: $0 [start|stop]" >&2; exit 2; }

PORT="${ARCHSERVE_PG_PORT:-55432}"
BASE="${ARCHSERVE_PG_DIR:-/var/tmp/archserve-postgres}"
DATA="$BASE/data"
SOCK="$BASE/socket"
LOG="$BASE/server.log"
DB_USER=archserve
DB_PASSWORD=archserve
DB_NAME=archserve_test

say() { echo "postgres.sh: $*" >&2; }
die() { say "$*"; exit 1; }

find_bindir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$dir" && -x "$dir/initdb" ]]; then
        echo "$dir"
    elif command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    fi
}

BIN="$(find_bindir)"
[[ -n "$BIN" || "$ACTION" == start ]] || die "PostgreSQL is not installed: nothing to stop"
if [[ -z "$BIN" ]]; then
    [[ $EUID -eq 0 ]] || die "PostgreSQL is not installed and this is not root; run: sudo apt-get install -y postgresql"
    say "installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    BIN="$(find_bindir)"
    [[ -n "$BIN" ]] || die "apt-get installed postgresql, but no initdb was found under /usr/lib/postgresql/*/bin"
fi

# The server refuses to run as root: as root, run it as the postgres user (the package creates it).
if [[ $EUID -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || die "no 'postgres' user to run the server as; reinstall the postgresql package"
    as_owner() { runuser -u postgres -- "$@"; }
    mkdir -p "$BASE"
    chown postgres: "$BASE"
else
    as_owner() { "$@"; }
    mkdir -p "$BASE"
    [[ -O "$BASE" ]] || die "$BASE belongs to $(stat -c %U "$BASE"), not $(id -un): run this as root or as its owner"
fi
chmod 700 "$BASE"

if [[ "$ACTION" == start && ! -s "$DATA/PG_VERSION" ]]; then
    say "creating a cluster in $DATA"
    rm -rf "$DATA"
    # Local (socket) connections: trust, for this script's setup; TCP: passwords only.
    as_owner "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >"$BASE/initdb.log" 2>&1 \
        || { cat "$BASE/initdb.log" >&2; die "initdb failed (log above)"; }
fi
as_owner mkdir -p "$SOCK"

# Ours answers on its own socket directory; anything else on the port is someone else's server.
ours_ready() { as_owner "$BIN/pg_isready" -q -h "$SOCK" -p "$PORT" -t 1; }
# The pid file of a server that died without cleaning up (killed, or its machine reset): the process
# is gone, or a zombie nobody reaps (a container without an init), or the pid now belongs to another program.
stale_pidfile() {
    local pid state
    [[ -f "$DATA/postmaster.pid" ]] || return 1
    pid="$(head -n 1 "$DATA/postmaster.pid")"
    [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/stat" ]] || return 0
    state="$(sed 's/.*) //' "/proc/$pid/stat" | cut -d ' ' -f 1)"
    [[ "$state" == Z ]] && return 0
    ! grep -q postgres "/proc/$pid/comm" 2>/dev/null
}

if [[ "$ACTION" == stop ]]; then
    if [[ ! -f "$DATA/postmaster.pid" ]] || stale_pidfile; then
        say "not running ($DATA)"
        exit 0
    fi
    as_owner "$BIN/pg_ctl" -D "$DATA" -w -t 60 stop -m fast >&2 || die "pg_ctl could not stop the server in $DATA"
    say "stopped"
    exit 0
fi

if ours_ready; then
    say "already running ($DATA)"
else
    if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 2; then
        die "another server already listens on 127.0.0.1:$PORT; stop it or set ARCHSERVE_PG_PORT"
    fi
    for attempt in 1 2 3 4 5; do
        if stale_pidfile; then
            say "removing the pid file of a server that is gone"
            rm -f "$DATA/postmaster.pid"
        fi
        say "starting on 127.0.0.1:$PORT (log: $LOG)"
        if as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start -o \
            "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCK -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200 -c shared_buffers=64MB" >&2; then
            break
        fi
        ours_ready && break  # started by a concurrent run of this script
        # Leftover processes of a killed server may still hold its shared memory for a moment.
        [[ $attempt -lt 5 ]] || { tail -n 30 "$LOG" >&2 || true; die "the server did not start (log above)"; }
        sleep 2
    done
fi

psql_admin() {
    as_owner "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres -d postgres "$@"
}
# Idempotent: create the role and the database if missing; (re)set the password.
psql_admin <<SQL >&2
SELECT format('CREATE ROLE %I LOGIN', '$DB_USER') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER')
\gexec
ALTER ROLE $DB_USER LOGIN PASSWORD '$DB_PASSWORD';
SELECT format('CREATE DATABASE %I OWNER %I', '$DB_NAME', '$DB_USER')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB_NAME')
\gexec
SQL

URL="postgresql://$DB_USER:$DB_PASSWORD@127.0.0.1:$PORT/$DB_NAME"
PGPASSWORD="$DB_PASSWORD" "$BIN/psql" -X -q -At -h 127.0.0.1 -p "$PORT" -U "$DB_USER" -d "$DB_NAME" \
    -c "SELECT 1" >/dev/null || die "the server runs, but $DB_USER cannot log in to $DB_NAME over TCP"
say "ready"
echo "$URL"
