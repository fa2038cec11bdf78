#!/usr/bin/env bash
# Starts the machine's PostgreSQL cluster (Debian's postgresql package) if it is down, and
# makes the role and database that the store's tests use:
#   postgres://ferry:ferry@127.0.0.1:5432/ferry_test   (the role may create databases: each
#   test works in a database of its own and drops it afterwards)
# Safe to run again. scripts/install-deps.sh runs it; .ci/run runs it again, since a machine's
# processes do not outlive its session. Tests read FERRY_TEST_POSTGRES_URL when it is set.
set -euo pipefail

fail() {
  echo "start-postgres: $*" >&2
  exit 1
}
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

command -v pg_lsclusters >/dev/null || fail "PostgreSQL is not installed: run scripts/install-deps.sh"
cluster=$(pg_lsclusters --no-header | awk 'NR == 1 {print $1, $2, $4}')
[ -n "$cluster" ] || fail "no PostgreSQL cluster exists: create one with pg_createcluster"
read -r version name status <<<"$cluster"
if [ "$status" != "online" ]; then
  echo "starting PostgreSQL $version/$name"
  as_root pg_ctlcluster "$version" "$name" start ||
    fail "could not start PostgreSQL $version/$name (see /var/log/postgresql/postgresql-$version-$name.log)"
fi
as_postgres psql -q -v ON_ERROR_STOP=1 -d postgres <<'SQL' >/dev/null
SELECT 'CREATE ROLE ferry LOGIN CREATEDB PASSWORD ''ferry'''
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ferry')\gexec
SELECT 'CREATE DATABASE ferry_test OWNER ferry'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'ferry_test')\gexec
SQL
echo "PostgreSQL ready: postgres://ferry:ferry@127.0.0.1:5432/ferry_test"
