# shellcheck shell=bash
#
# Local services needed by the agentbus test suites (Redis, NATS+JetStream,
# PostgreSQL, RabbitMQ).
#
# Usage:
#   source scripts/services.sh
#   ensure_services                  # all of them
#   ensure_services redis nats       # a subset
#   ensure_redis / ensure_nats / ensure_postgres / ensure_rabbitmq
#
# or run it directly:  bash scripts/services.sh [redis|nats|postgres|rabbitmq ...]
#
# Every ensure_* function is idempotent: it checks the service, starts it only
# if it is down, then waits (bounded) until it accepts connections. Missing
# binaries are installed with apt-get (apt-get update runs at most once, and
# only if something is missing). The functions return non-zero with a message
# saying how to start the service by hand; they never `exit`, so the file is
# safe to source from any script.
#
# Tunables (environment):
#   AGENTBUS_SERVICES          services ensure_services checks when called
#                              without arguments (default: all four)
#   AGENTBUS_REDIS_TIMEOUT     seconds to wait for Redis      (default 60)
#   AGENTBUS_NATS_TIMEOUT      seconds to wait for NATS       (default 60)
#   AGENTBUS_POSTGRES_TIMEOUT  seconds to wait for PostgreSQL (default 60)
#   AGENTBUS_RABBITMQ_TIMEOUT  seconds to wait for RabbitMQ   (default 90)

# sbin dirs are often missing from PATH in non-login / CI shells, and
# nats-server, rabbitmq-server and start-stop-daemon live there.
for _svc_dir in /usr/local/sbin /usr/sbin /sbin; do
    case ":${PATH}:" in
        *":${_svc_dir}:"*) ;;
        *) PATH="${PATH}:${_svc_dir}" ;;
    esac
done
unset _svc_dir
export PATH

_SVC_APT_UPDATED="${_SVC_APT_UPDATED:-0}"

_svc_info() { printf '[services] %s\n' "$*" >&2; }
_svc_err() { printf '[services] ERROR: %s\n' "$*" >&2; }

# Run a command with root privileges (plain if already root, else sudo -n).
_svc_root() {
    if [[ ${EUID:-$(id -u)} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        _svc_err "need root for: $* (not root and no sudo)"
        return 1
    fi
}

# _svc_require_cmd CMD DEBIAN_PACKAGE
# Install DEBIAN_PACKAGE with apt-get if CMD is not on PATH.
_svc_require_cmd() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0

    _svc_info "'$cmd' not found; installing Debian package '$pkg'"
    if ! command -v apt-get >/dev/null 2>&1; then
        _svc_err "'$cmd' is missing and apt-get is not available; install '$pkg' by hand"
        return 1
    fi
    if [[ $_SVC_APT_UPDATED != 1 ]]; then
        if ! _svc_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >&2; then
            _svc_err "apt-get update failed"
            return 1
        fi
        _SVC_APT_UPDATED=1
    fi
    if ! _svc_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" </dev/null >&2; then
        _svc_err "apt-get install -y $pkg failed"
        return 1
    fi
    hash -r
    if ! command -v "$cmd" >/dev/null 2>&1; then
        _svc_err "installed '$pkg' but '$cmd' is still not on PATH"
        return 1
    fi
}

# _svc_tcp_open HOST PORT  -- true if a TCP connection succeeds (2 s cap).
_svc_tcp_open() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" >/dev/null 2>&1
}

# _svc_wait NAME TIMEOUT CHECK_FN [ARGS...]
# Poll CHECK_FN once a second until it succeeds or TIMEOUT seconds pass.
_svc_wait() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    while ((SECONDS - start < limit)); do
        if "$@"; then
            _svc_info "$name is up (waited $((SECONDS - start))s)"
            return 0
        fi
        sleep 1
    done
    "$@" && { _svc_info "$name is up (waited $((SECONDS - start))s)"; return 0; }
    return 1
}

# _svc_start_and_wait NAME TIMEOUT LOGFILE MANUAL_CMD CHECK_FN START_CMD...
# Run START_CMD, then wait for CHECK_FN. If the start command itself fails we
# still wait a little (someone else may be starting the service concurrently),
# but not the full timeout.
_svc_start_and_wait() {
    local name=$1 limit=$2 log=$3 manual=$4 check=$5
    shift 5
    local rc=0 shown=("$@")
    [[ ${shown[0]} == _svc_root ]] && shown=("${shown[@]:1}")
    _svc_info "$name is down; starting: $(printf '%q ' "${shown[@]}")"
    "$@" </dev/null >&2 || rc=$?
    if ((rc != 0)); then
        _svc_err "start command for $name exited with status $rc"
        ((limit > 15)) && limit=15
    fi
    if _svc_wait "$name" "$limit" "$check"; then
        return 0
    fi
    _svc_err "$name did not come up within ${limit}s."
    _svc_err "start it by hand with:  $manual"
    if [[ -n $log && -r $log ]]; then
        _svc_err "last lines of $log:"
        tail -n 20 "$log" >&2 || true
    fi
    return 1
}

# --------------------------------------------------------------------------
# Redis 127.0.0.1:6379
# --------------------------------------------------------------------------

REDIS_HOST=127.0.0.1
REDIS_PORT=6379
REDIS_LOG=/var/log/redis/ci.log

_redis_check() {
    [[ $(timeout 5 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

ensure_redis() {
    _svc_require_cmd redis-server redis-server || return 1
    _svc_require_cmd redis-cli redis-tools || return 1
    _redis_check && { _svc_info "redis is up ($REDIS_HOST:$REDIS_PORT)"; return 0; }

    local manual="mkdir -p /var/lib/redis /var/log/redis && redis-server --daemonize yes --bind 127.0.0.1 -::1 --port $REDIS_PORT --save \"\" --appendonly no --dir /var/lib/redis --logfile $REDIS_LOG"
    _svc_root mkdir -p /var/lib/redis /var/log/redis || return 1
    _svc_start_and_wait redis "${AGENTBUS_REDIS_TIMEOUT:-60}" "$REDIS_LOG" "$manual" _redis_check \
        _svc_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile "$REDIS_LOG"
}

# --------------------------------------------------------------------------
# NATS with JetStream 127.0.0.1:4222
# --------------------------------------------------------------------------

NATS_HOST=127.0.0.1
NATS_PORT=4222
NATS_LOG=/var/log/nats-server.log

# Prints the server's INFO line (sent by the server right after connect).
_nats_info() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        IFS= read -r -t 2 line <&3 || exit 1
        printf "%s\n" "$line"
    ' _ "$NATS_HOST" "$NATS_PORT" 2>/dev/null
}

_nats_check() {
    _svc_tcp_open "$NATS_HOST" "$NATS_PORT"
}

# After the port is open: make sure JetStream is enabled. If the INFO line
# cannot be read we accept the plain TCP check.
_nats_check_jetstream() {
    local info
    if ! info=$(_nats_info) || [[ $info != INFO* ]]; then
        _svc_info "nats: could not read INFO line; assuming JetStream is on (TCP check only)"
        return 0
    fi
    if [[ $info == *'"jetstream":true'* ]]; then
        return 0
    fi
    _svc_err "a NATS server is listening on $NATS_HOST:$NATS_PORT but JetStream is NOT enabled."
    _svc_err "restart it with -js, e.g.:  nats-server -a $NATS_HOST -p $NATS_PORT -js -sd /var/lib/nats-server"
    return 1
}

ensure_nats() {
    _svc_require_cmd nats-server nats-server || return 1
    if _nats_check; then
        _svc_info "nats is up ($NATS_HOST:$NATS_PORT)"
        _nats_check_jetstream
        return
    fi
    _svc_require_cmd start-stop-daemon dpkg || return 1

    local exe
    exe=$(command -v nats-server)
    local manual="start-stop-daemon --start --oknodo --background --exec $exe -- -a $NATS_HOST -p $NATS_PORT -js -sd /var/lib/nats-server -l $NATS_LOG"
    _svc_root mkdir -p /var/lib/nats-server || return 1
    _svc_start_and_wait nats "${AGENTBUS_NATS_TIMEOUT:-60}" "$NATS_LOG" "$manual" _nats_check \
        _svc_root start-stop-daemon --start --oknodo --background --exec "$exe" -- \
        -a "$NATS_HOST" -p "$NATS_PORT" -js -sd /var/lib/nats-server -l "$NATS_LOG" || return 1
    _nats_check_jetstream
}

# --------------------------------------------------------------------------
# PostgreSQL 127.0.0.1:5432
# --------------------------------------------------------------------------

PG_HOST=127.0.0.1
PG_PORT=5432

_pg_check() {
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3 >/dev/null 2>&1
}

# Newest installed cluster version that has a "main" cluster.
_pg_version() {
    local d versions=()
    for d in /etc/postgresql/*/main; do
        [[ -d $d ]] || continue
        d=${d%/main}
        versions+=("${d##*/}")
    done
    ((${#versions[@]})) || return 1
    printf '%s\n' "${versions[@]}" | sort -V | tail -n 1
}

ensure_postgres() {
    _svc_require_cmd pg_isready postgresql || return 1
    _svc_require_cmd pg_ctlcluster postgresql || return 1
    _pg_check && { _svc_info "postgres is up ($PG_HOST:$PG_PORT)"; return 0; }

    local ver
    if ! ver=$(_pg_version); then
        _svc_err "postgres is down and no cluster found under /etc/postgresql/*/main."
        _svc_err "create and start one by hand, e.g.:  pg_createcluster --start <version> main"
        return 1
    fi
    local manual="pg_ctlcluster --skip-systemctl-redirect $ver main start"
    _svc_start_and_wait postgres "${AGENTBUS_POSTGRES_TIMEOUT:-60}" \
        "/var/log/postgresql/postgresql-$ver-main.log" "$manual" _pg_check \
        _svc_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
}

# --------------------------------------------------------------------------
# RabbitMQ 127.0.0.1:5672
# --------------------------------------------------------------------------

RABBITMQ_HOST=127.0.0.1
RABBITMQ_PORT=5672

_rabbitmq_check() {
    _svc_tcp_open "$RABBITMQ_HOST" "$RABBITMQ_PORT"
}

ensure_rabbitmq() {
    _svc_require_cmd rabbitmq-server rabbitmq-server || return 1
    _rabbitmq_check && { _svc_info "rabbitmq is up ($RABBITMQ_HOST:$RABBITMQ_PORT)"; return 0; }

    local limit=${AGENTBUS_RABBITMQ_TIMEOUT:-90}
    local manual="rabbitmq-server -detached"
    local log
    log=$(find /var/log/rabbitmq -maxdepth 1 -name 'rabbit@*.log' ! -name '*upgrade*' 2>/dev/null | head -n 1)

    # The node takes a while to open its port; if it is already booting
    # (e.g. started by a previous run that timed out), don't start it twice.
    if command -v pgrep >/dev/null 2>&1 && pgrep -f 'beam.*-s rabbit' >/dev/null 2>&1; then
        _svc_info "rabbitmq node is already booting; waiting for $RABBITMQ_HOST:$RABBITMQ_PORT"
        if _svc_wait rabbitmq "$limit" _rabbitmq_check; then
            return 0
        fi
        _svc_err "rabbitmq did not come up within ${limit}s."
        _svc_err "start it by hand with:  $manual   (check: rabbitmq-diagnostics status)"
        [[ -n $log && -r $log ]] && { _svc_err "last lines of $log:"; tail -n 20 "$log" >&2 || true; }
        return 1
    fi

    _svc_start_and_wait rabbitmq "$limit" "$log" "$manual" _rabbitmq_check \
        _svc_root rabbitmq-server -detached
}

# --------------------------------------------------------------------------

AGENTBUS_ALL_SERVICES=(redis nats postgres rabbitmq)

# ensure_services [NAME...]  -- ensure each named service (default: all, or
# $AGENTBUS_SERVICES). Checks every service, then fails if any is not up.
ensure_services() {
    local names=("$@")
    if ((${#names[@]} == 0)); then
        if [[ -n ${AGENTBUS_SERVICES:-} ]]; then
            read -r -a names <<<"${AGENTBUS_SERVICES//,/ }"
        else
            names=("${AGENTBUS_ALL_SERVICES[@]}")
        fi
    fi
    local name failed=()
    for name in "${names[@]}"; do
        case $name in
            redis | nats | postgres | rabbitmq) ;;
            *)
                _svc_err "unknown service '$name' (known: ${AGENTBUS_ALL_SERVICES[*]})"
                failed+=("$name")
                continue
                ;;
        esac
        "ensure_$name" || failed+=("$name")
    done
    if ((${#failed[@]})); then
        _svc_err "service(s) not available: ${failed[*]}"
        return 1
    fi
    return 0
}

# Executed directly (not sourced): ensure the services named on the command line.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    ensure_services "$@"
fi
