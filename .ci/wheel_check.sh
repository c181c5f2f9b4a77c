#!/usr/bin/env bash
# The package as a user gets it: build the wheel from a clean copy of the source, install it into a
# fresh venv outside the checkout (dependencies from the index, no system site-packages, no
# PYTHONPATH), then run `tiergate check`, `tiergate serve --demo` with one request, and
# `tiergate db init` + `routes list` in a schema of its own in the test database.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout="$PWD"
base_url="${TIERGATE_TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/test}"

work="$(mktemp -d)"
schema="tg_wheel_$$_$RANDOM"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  psql "$base_url" -qAtc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "wheel check: $*" >&2; exit 1; }

# A clean copy: a stale build/ directory in the checkout could otherwise supply a file the source lacks.
mkdir -p "$work/src"
cp -r pyproject.toml README.md proxy "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
step() { echo "wheel check: $* ($(date +%T))"; }
quietly() { "$@" >"$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; fail "$* failed"; }; }
step "building the wheel"
quietly python3 -m pip wheel --no-deps -w "$work/dist" "$work/src"
step "installing it and its dependencies into a fresh venv"
python3 -m venv "$work/venv"
quietly "$work/venv/bin/python" -m pip install --disable-pip-version-check "$work"/dist/tiergate-*.whl
step "running it"

cd "$work"   # outside the checkout: nothing can be imported from it
unset PYTHONPATH
export PATH="$work/venv/bin:$PATH"
where="$(python -c 'import proxy; print(proxy.__file__)')"
case "$where" in "$work/venv/"*) ;; *) fail "proxy imported from $where, not the venv";; esac
unset TIERGATE_CONFIG DATABASE_URL   # the shipped tables, as a fresh install has them

tiergate check >"$work/check.out" || fail "tiergate check failed: $(cat "$work/check.out")"
grep -q "OK, " "$work/check.out" || fail "tiergate check: $(cat "$work/check.out")"
tiergate check --demo >/dev/null || fail "tiergate check --demo failed"

port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
tiergate serve --demo --port "$port" 2>"$work/serve.err" &
server_pid=$!
python - "$port" <<'EOF' || { cat "$work/serve.err" >&2; fail "tiergate serve --demo did not answer"; }
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 30
while True:
    try:
        urllib.request.urlopen(base + "/health", timeout=2).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
request = urllib.request.Request(
    base + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
    data=json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}).encode())
with urllib.request.urlopen(request, timeout=10) as resp:
    answer = json.load(resp)
assert answer["choices"][0]["message"]["content"] == "Mock answer from gpt-4o-mini: hello", answer
EOF
kill "$server_pid"; wait "$server_pid" || true; server_pid=""
grep -q '"request_id"' "$work/serve.err" || fail "tiergate serve wrote no request log line on stderr"

psql "$base_url" -qAtc "CREATE SCHEMA $schema" >/dev/null
case "$base_url" in *\?*) sep="&";; *) sep="?";; esac
export DATABASE_URL="${base_url}${sep}search_path=${schema}"
tiergate db init >"$work/init.out" || fail "tiergate db init failed: $(cat "$work/init.out")"
grep -q "applied migration(s) 1" "$work/init.out" || fail "db init applied no migration: $(cat "$work/init.out")"
grep -q "seeded" "$work/init.out" || fail "db init seeded nothing: $(cat "$work/init.out")"
tiergate routes list >"$work/routes.out" || fail "tiergate routes list failed"
grep -q "code_generation:premium" "$work/routes.out" || fail "routes list shows no route: $(cat "$work/routes.out")"
echo "wheel check: OK ($(basename "$work"/dist/tiergate-*.whl): check, serve --demo, db init)"
cd "$checkout"
