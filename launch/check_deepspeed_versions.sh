#!/usr/bin/env bash
# Run ds_pld's core tests against each supported DeepSpeed release (the latest patch of 0.17, 0.18 and 0.19).
#
#   bash launch/check_deepspeed_versions.sh                 # all three
#   bash launch/check_deepspeed_versions.sh 0.18.x          # one series (0.18, 0.18.x) or an exact version (0.18.3)
#   bash launch/check_deepspeed_versions.sh --probe 0.17.x  # also print which private DeepSpeed names are there
#
# Each version gets its own virtual environment, ${DS_PLD_VENV_DIR:-~/.cache/ds_pld/ds-venvs}/deepspeed-<version>,
# made with --system-site-packages so torch, transformers, pydantic, pytest ... come from the Python running this
# script (PYTHON, default python3); only DeepSpeed itself (built with DS_BUILD_OPS=0) and any of its requirements
# that Python lacks go into the venv. A venv is reused once complete (its `.complete` file is written last). The
# version that Python already has installed (0.19.8 on the project's machine) runs on it directly, without a venv
# (DS_PLD_SYSTEM_DEEPSPEED=0 gives it a venv too).
# The tests are the lines of tests/deepspeed_versions.txt (DS_PLD_VERSION_TESTS overrides), run from this checkout.
# Prints per version: passed / failed / errors / skipped and seconds; exits 1 if any version failed.
set -euo pipefail
{  # parsed whole before it runs: editing this file during a run cannot break the run

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
SUPPORTED=(${DS_PLD_DEEPSPEED_VERSIONS:-0.17.6 0.18.9 0.19.8})   # the latest patch of each supported series
VENV_DIR=${DS_PLD_VENV_DIR:-$HOME/.cache/ds_pld/ds-venvs}
TEST_LIST=${DS_PLD_VERSION_TESTS:-$ROOT/tests/deepspeed_versions.txt}
LOG_DIR=${DS_PLD_VERSION_LOGS:-$ROOT/runs/deepspeed_versions}
TIMEOUT=${DS_PLD_VERSION_TIMEOUT:-1200}                         # seconds per pytest process
PROBE=0

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

versions=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --probe) PROBE=1 ;;
    -*) echo "check_deepspeed_versions: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) versions+=("$arg") ;;
  esac
done
[ ${#versions[@]} -gt 0 ] || versions=("${SUPPORTED[@]}")

# 0.18, 0.18.x -> the supported patch of that series; an exact X.Y.Z stays as it is.
resolve() {
  local want=$1 series v
  if [[ $want =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then echo "$want"; return; fi
  if [[ $want =~ ^([0-9]+\.[0-9]+)(\.x|\.\*)?$ ]]; then
    series=${BASH_REMATCH[1]}
    for v in "${SUPPORTED[@]}"; do
      if [[ $v == "$series".* ]]; then echo "$v"; return; fi
    done
  fi
  echo "check_deepspeed_versions: '$want' is not a version or a supported series (${SUPPORTED[*]})" >&2
  return 1
}

# The DeepSpeed version a Python imports ('' when none).
ds_version() { "$1" -c "import importlib.metadata as m; print(m.version('deepspeed'))" 2>/dev/null || true; }

# Build the venv of VERSION at VENV unless complete. Runs where `set -e` does not apply: every step is checked.
build_venv() {
  local version=$1 venv=$2 missing got
  [ -f "$venv/.complete" ] && return 0
  echo "[deepspeed $version] building $venv" >&2
  rm -rf "$venv" || return 1
  # No pip of its own: the venv's Python uses the system pip (and setuptools) through --system-site-packages.
  "$PYTHON" -m venv --system-site-packages --without-pip "$venv" || return 1
  if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    "$venv/bin/python" -m ensurepip --default-pip >&2 || return 1
  fi
  DS_BUILD_OPS=0 "$venv/bin/python" -m pip install -q --no-input --no-deps "deepspeed==$version" >&2 || return 1
  # DeepSpeed's own requirements that the system does not satisfy (none on the project's machine).
  missing=$("$venv/bin/python" - <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement
from packaging.version import Version
missing = []
for text in md.requires("deepspeed") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(str(req))
        continue
    if req.specifier and not req.specifier.contains(Version(have), prereleases=True):
        missing.append(str(req))
print(" ".join(missing))
EOF
  ) || return 1
  if [ -n "$missing" ]; then
    echo "[deepspeed $version] installing its requirements the system lacks: $missing" >&2
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --no-input $missing >&2 || return 1
  fi
  got=$(ds_version "$venv/bin/python")
  if [ "$got" != "$version" ]; then
    echo "[deepspeed $version] the venv imports deepspeed '$got'" >&2
    return 1
  fi
  if ! "$venv/bin/python" -c "import deepspeed.runtime.engine" >/dev/null 2>&1; then
    echo "[deepspeed $version] 'import deepspeed.runtime.engine' fails in $venv:" >&2
    "$venv/bin/python" -c "import deepspeed.runtime.engine" 2>&1 | tail -5 >&2
    return 1
  fi
  echo "$version" > "$venv/.complete"   # last: marks the venv complete
}

# Set PY (the Python to test VERSION with), EXT_DIR and SETUP_NOTE; build the venv if needed. EXT_DIR: where
# DeepSpeed JIT-builds its ops (the CPU shared-memory all-reduce, CPU Adam); each venv has its own, since versions
# sharing torch's default folder would rebuild each other's ops (a minute or two each time) and the system's.
PY=""
VENV_BIN=""
EXT_DIR=""
SETUP_NOTE=""
prepare_python() {
  local version=$1 venv start
  EXT_DIR=${TORCH_EXTENSIONS_DIR:-}
  VENV_BIN=""
  if [ "${DS_PLD_SYSTEM_DEEPSPEED:-1}" != 0 ] && [ "$(ds_version "$PYTHON")" = "$version" ]; then
    PY=$PYTHON
    SETUP_NOTE="system deepspeed, $(command -v "$PYTHON")"
    return 0
  fi
  venv=$VENV_DIR/deepspeed-$version
  PY=$venv/bin/python
  VENV_BIN=$venv/bin
  EXT_DIR=$venv/torch_extensions
  if [ -f "$venv/.complete" ]; then
    SETUP_NOTE="venv cached, $venv"
    return 0
  fi
  mkdir -p "$VENV_DIR" || return 1
  start=$(date +%s)
  # One builder at a time per version (two checkouts may share the cache).
  ( flock 9 && build_venv "$version" "$venv" ) 9>"$VENV_DIR/.deepspeed-$version.lock" || return 1
  SETUP_NOTE="venv built in $(( $(date +%s) - start )) s, $venv"
}

# Run a command with this checkout first on PYTHONPATH, and the venv's bin first on PATH and its EXT_DIR (if any).
with_env() {
  local vars=("PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}")
  [ -z "$VENV_BIN" ] || vars+=("PATH=$VENV_BIN:$PATH")
  [ -z "$EXT_DIR" ] || vars+=("TORCH_EXTENSIONS_DIR=$EXT_DIR")
  env "${vars[@]}" "$@"
}

# Run the test list with PY; writes the counts "passed failed errors skipped" to $2, the output to $3.
run_tests() {
  local py=$1 counts=$2 log=$3
  with_env "$py" - "$TEST_LIST" "$counts" "$TIMEOUT" >"$log" 2>&1 <<'EOF' || true
"""Read the list; run the bare node ids in one pytest process, each line with options in its own; sum the counts."""
import shlex
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

test_list, counts_file, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
plain, alone = [], []
for line in Path(test_list).read_text().splitlines():
    words = shlex.split(line, comments=True)
    if words:
        (alone.append(words) if any(w.startswith("-") for w in words[1:]) else plain.extend(words))
runs = ([plain] if plain else []) + alone
total = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
with tempfile.TemporaryDirectory() as tmp:
    for i, args in enumerate(runs):
        xml = Path(tmp) / f"{i}.xml"
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={xml}", *args]
        print("$ " + shlex.join(cmd[1:]), flush=True)
        try:
            code = subprocess.run(cmd, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            print(f"TIMEOUT after {timeout:.0f} s: {shlex.join(args)}", flush=True)
            code = -1
        if not xml.is_file():
            print(f"ERROR no results (exit {code}): {shlex.join(args)}", flush=True)
            total["errors"] += 1
            continue
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        total["passed"] += n - f - e - s
        total["failed"] += f
        total["errors"] += e
        total["skipped"] += s
        if n == 0 or code == 5:  # a line that selects nothing is a stale list, not a pass
            print(f"ERROR no tests collected: {shlex.join(args)}", flush=True)
            total["errors"] += 1
        elif code == -1 or (code != 0 and f + e == 0):
            print(f"ERROR pytest exit {code} without a failed test: {shlex.join(args)}", flush=True)
            total["errors"] += 1
Path(counts_file).write_text(" ".join(str(total[k]) for k in ("passed", "failed", "errors", "skipped")) + "\n")
EOF
}

mkdir -p "$LOG_DIR"
summary=()
status=0
for want in "${versions[@]}"; do
  version=$(resolve "$want") || { status=1; summary+=("$(printf '%-9s %s' "$want" "not a supported version")"); continue; }
  echo "=== deepspeed $version"
  start=$(date +%s)
  if ! prepare_python "$version"; then
    status=1
    summary+=("$(printf '%-9s %s' "$version" "SETUP FAILED (see above)")")
    continue
  fi
  py=$PY
  setup_s=$(( $(date +%s) - start ))
  echo "[deepspeed $version] python $py ($SETUP_NOTE)"
  if [ "$PROBE" = 1 ]; then
    if (cd "$ROOT" && with_env "$py" launch/deepspeed_api_probe.py >"$LOG_DIR/probe-$version.log" 2>&1); then
      sed -n 's/^DS_PLD_PROBE //p' "$LOG_DIR/probe-$version.log"
    else
      echo "[deepspeed $version] the probe failed:" >&2
      tail -5 "$LOG_DIR/probe-$version.log" >&2
    fi
  fi
  log=$LOG_DIR/deepspeed-$version.log
  counts=$(mktemp)
  test_start=$(date +%s)
  (cd "$ROOT" && run_tests "$py" "$counts" "$log")
  test_s=$(( $(date +%s) - test_start ))
  [ -s "$counts" ] || echo "0 0 1 0" > "$counts"   # the runner died before counting
  read -r passed failed errors skipped < "$counts" || true
  rm -f "$counts"
  grep -E '^(FAILED|ERROR|TIMEOUT)' "$log" | sed "s/^/[deepspeed $version] /" || true
  verdict=ok
  if [ "$failed" != 0 ] || [ "$errors" != 0 ] || [ "$passed" = 0 ]; then verdict=FAIL; status=1; fi
  line=$(printf '%-9s %-4s %3s passed %3s failed %3s errors %3s skipped  tests %4s s  setup %3s s (%s)' \
    "$version" "$verdict" "$passed" "$failed" "$errors" "$skipped" "$test_s" "$setup_s" "$SETUP_NOTE")
  echo "[deepspeed $version] $line; log $log"
  summary+=("$line")
done

echo "=== summary (tests: $TEST_LIST)"
printf '%s\n' "${summary[@]}"
exit "$status"
}
