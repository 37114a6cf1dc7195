#!/usr/bin/env bash
# Fetch the real offline corpus used by the time-to-quality study (docs/data.md, "A real corpus") into DEST, without
# installing anything: Debian's dict-gcide (GCIDE, Webster's 1913 + additions), dict-wn (WordNet 3.0 glosses) and
# the CPython documentation sources (python3.X-doc, the version python3-doc depends on).
#   bash launch/fetch_corpus.sh [DEST=runs/corpus]
# Prints the --corpus arguments for launch/prepare_data.py. Packages come from the machine's apt sources
# (`apt-get download`, as any user; as root an `apt-get update` is run once if the lists are empty).
set -euo pipefail
dest=${1:-runs/corpus}
mkdir -p "$dest/debs" "$dest/root"
dest=$(cd "$dest" && pwd)
command -v apt-get >/dev/null || { echo "fetch_corpus: needs apt-get (Debian/Ubuntu)" >&2; exit 2; }
pydoc=$(apt-cache depends python3-doc 2>/dev/null | awk '/Depends: python3\.[0-9]+-doc/ {print $2; exit}')
if [ -z "$pydoc" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  pydoc=$(apt-cache depends python3-doc 2>/dev/null | awk '/Depends: python3\.[0-9]+-doc/ {print $2; exit}')
fi
[ -n "$pydoc" ] || { echo "fetch_corpus: apt knows no python3-doc; run 'apt-get update' (as root) first" >&2; exit 2; }
for pkg in dict-gcide dict-wn "$pydoc"; do
  if ! compgen -G "$dest/debs/${pkg}_*.deb" >/dev/null; then
    (cd "$dest/debs" && apt-get download "$pkg" 2>&1 | grep -v "unsandboxed" >&2 || true)
  fi
  deb=$(compgen -G "$dest/debs/${pkg}_*.deb" | head -n 1) || { echo "fetch_corpus: could not download $pkg" >&2; exit 2; }
  dpkg-deb -x "$deb" "$dest/root"
done
echo "--corpus $dest/root/usr/share/dictd/gcide.dict.dz --corpus $dest/root/usr/share/dictd/wn.dict.dz" \
     "--corpus '$dest/root/usr/share/doc/python3.*/html/_sources/**/*.rst.txt' --encoding_errors replace"
