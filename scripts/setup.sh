#!/usr/bin/env bash
# Idempotent set-up: a virtual environment with the pinned stack, and the Fashion-MNIST files.
# Usage: scripts/setup.sh [test]   ("test" adds the test-only packages)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
EXTRA=${1:-}

# `uv pip install` with pip's configured indexes, find-links and constraints (pip resolves over all its
# indexes at once, hence uv's unsafe-best-match), into this venv, editable as pip would make it. It is
# not byte-compiled here (all of site-packages: ~45 s on 2 cores): Python writes the .pyc of what it
# imports (the Makefile lets it, see there), and the set-up imports the CLI once to write its own.
uv_install() {
  local args=(--python "$VENV/bin/python" --index-strategy unsafe-best-match --config-settings editable_mode=compat)
  local key value v
  while IFS='=' read -r key value; do
    value=${value#\'}; value=${value%\'}
    for v in $value; do
      case "${key##*.}" in
        index-url) args+=(--index-url "$v") ;;
        extra-index-url) args+=(--extra-index-url "$v") ;;
        find-links) args+=(--find-links "$v") ;;
        constraint) args+=(--constraint "$v") ;;
      esac
    done
  done < <("$VENV/bin/pip" config list 2>/dev/null | sort -u)
  "$VENV/bin/uv" pip install -q "${args[@]}" "$@"
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi

# Reinstall only when the dependency list changed (a stamp keyed by pyproject.toml and this script).
stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)${EXTRA:+-$EXTRA}"
if [ ! -f "$stamp" ]; then
  # The pinned torch is a CUDA build: the whole stack takes ~6.4 GB. Say so before pip runs out of disk
  # halfway through with a bare OSError (what is installed already counts).
  have_kb=$(du -sk "$VENV" | cut -f1)
  free_kb=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
  short_kb=$((6600 * 1024 - have_kb - free_kb))
  if [ "$short_kb" -gt 0 ]; then
    echo "setup: $VENV needs about 6.5 GB of disk for torch and the rest of the stack;" \
         "free $((short_kb / 1024 + 1)) MB more on that disk and run this again." >&2
    exit 2
  fi
  echo "setup: installing dependencies into $VENV (a minute or two: torch is large)" >&2
  # uv installs the same requirements several times faster than pip (wheels unpacked in parallel); it
  # is given the index settings pip is configured with here, and pip does the install if uv cannot.
  if [ "$EXTRA" = "test" ]; then target=".[test]"; else target="."; fi
  "$VENV/bin/pip" install -qq uv 2>/dev/null || true
  if ! { [ -x "$VENV/bin/uv" ] && uv_install -e "$target"; }; then
    [ -x "$VENV/bin/uv" ] && echo "setup: uv could not install the stack; installing with pip instead" >&2
    # -qq: errors only (a machine's index settings can print hundreds of lines of warnings);
    # editable_mode=compat: the work tree on sys.path through a .pth file, so edits to mmcoa/ and stages/
    # take effect at once, as DVC's dependency tracking of those folders assumes.
    "$VENV/bin/pip" install -qq --config-settings editable_mode=compat -e "$target"
  fi
  # clip-benchmark ships the field's class names and prompt templates; only its JSON files are used.
  # torchattacks is a test oracle; its pinned requests would downgrade what dvc needs: both --no-deps.
  nodeps=("clip-benchmark==1.6.2")
  if [ "$EXTRA" = "test" ]; then nodeps+=("torchattacks==3.5.1"); fi
  if ! { [ -x "$VENV/bin/uv" ] && uv_install --no-deps "${nodeps[@]}"; }; then
    "$VENV/bin/pip" install -qq --no-deps "${nodeps[@]}"
  fi
  # One import of every command writes the .pyc files of the stack it uses, so that `mmcoa` run by hand
  # starts fast even where Python is told not to write them (PYTHONDONTWRITEBYTECODE).
  PYTHONDONTWRITEBYTECODE= "$VENV/bin/python" -c "from stages.cli import build_app; build_app()"
  touch "$stamp"
fi

# Fashion-MNIST: Debian's package where it can be installed; otherwise say how to get it.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ ! -f data/raw/FashionMNIST/raw/train-images-idx3-ubyte ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing dataset-fashion-mnist" >&2
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)
  else
    echo "setup: Fashion-MNIST not found. Install the Debian package dataset-fashion-mnist," >&2
    echo "       or set data.download: true in params.yaml to let torchvision download it." >&2
  fi
fi

# WordNet 3.0 (synonym candidates of the word attack): Debian's wordnet-base and wordnet-sense-index.
if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/wordnet/index.sense ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing wordnet-base wordnet-sense-index" >&2
    (apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null 2>&1) || (apt-get update -qq && apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null)
  else
    echo "setup: WordNet not found. Install the Debian packages wordnet-base and wordnet-sense-index" >&2
    echo "       (needed only by the word attack's wordnet candidates)." >&2
  fi
fi
