# Sourced by .ci/run: a throwaway PostgreSQL server for the shared-study tests.
#
#   start_postgres   installs the server if missing, starts it on 127.0.0.1 only and exports
#                    DETR_TRAIN_TEST_POSTGRES_URL and DETR_TRAIN_REQUIRE_POSTGRES=1
#   stop_postgres    stops it and removes its data directory (safe to call twice)
#
# The cluster lives in its own temp directory rather than Debian's packaged cluster, so it
# never touches /etc/postgresql, a port already in use, or a server someone else runs.

PG_TMP=""
PG_BIN=""

_pg_bindir() {
    # Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/<major>/bin.
    if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
}

_pg_install() {
    echo "ci: installing PostgreSQL (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
}

_pg_as_owner() {
    # initdb and postgres refuse to run as root: run them as the `postgres` user the package creates.
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

_pg_free_port() {
    python - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

start_postgres() {
    PG_BIN=$(_pg_bindir) || true
    if [ -z "$PG_BIN" ]; then
        _pg_install
        PG_BIN=$(_pg_bindir)
    fi
    PG_TMP=$(mktemp -d /tmp/detr_train_pg.XXXXXX)
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$PG_TMP"
    fi
    local port user=detr_train password=detr_train db=detr_train_test
    port=$(_pg_free_port)
    _pg_as_owner "$PG_BIN/initdb" -D "$PG_TMP/data" -U postgres --auth=trust --no-sync >/dev/null
    # TCP on 127.0.0.1 only; the Unix socket sits in the temp dir, not /var/run/postgresql.
    _pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_TMP -c fsync=off" start >/dev/null
    "$PG_BIN/psql" -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c "CREATE ROLE $user LOGIN PASSWORD '$password'" \
        -c "CREATE DATABASE $db OWNER $user" >/dev/null
    export DETR_TRAIN_TEST_POSTGRES_URL="postgresql://$user:$password@127.0.0.1:$port/$db"
    export DETR_TRAIN_REQUIRE_POSTGRES=1
    echo "ci: PostgreSQL on 127.0.0.1:$port (data in $PG_TMP)" >&2
}

stop_postgres() {
    if [ -n "$PG_TMP" ] && [ -d "$PG_TMP/data" ]; then
        _pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [ -n "$PG_TMP" ]; then
        rm -rf "$PG_TMP"
    fi
    PG_TMP=""
}
