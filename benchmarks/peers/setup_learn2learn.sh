#!/usr/bin/env bash
# Set up learn2learn 0.2.0 as a *peer* of metalearn, in its own virtual environment.
#
# learn2learn is not a dependency of metalearn: it lives in a separate venv (default
# benchmarks/peers/.venv-l2l, or $L2L_VENV) together with an editable install of this
# repository, so that both libraries import in one process for the parity checks
# (benchmarks/peers/l2l_parity.py).
#
# Why it is not a plain `pip install learn2learn`:
#   * learn2learn 0.2.0 ships Cython-generated C (Cython 0.29) that does not compile on
#     Python 3.11 (`longintrepr.h` is gone); we regenerate the C from the .pyx files with
#     Cython 3 and build the wheel from that.
#   * learn2learn imports torchvision at import time, and torchvision needs the registry's
#     torch build, not the local `+cpu` wheel that this machine's pip configuration prefers
#     (`2.13.0+cpu` sorts above `2.13.0`). Every pip call therefore runs with `--isolated`,
#     which ignores the machine's pip config and PIP_* environment variables. The registry
#     torch is a CUDA build of several GB; it runs fine on CPU.
#
# Idempotent: a finished setup is marked by $VENV/.l2l-setup-complete (written last, by
# rename, after a verification run). A re-run with that marker only re-verifies; a venv
# without it is an unfinished setup and is completed in place. L2L_FRESH=1 rebuilds the
# venv from scratch.
#
# Usage:  bash benchmarks/peers/setup_learn2learn.sh
# Env:    L2L_VENV    venv location (default: benchmarks/peers/.venv-l2l)
#         L2L_PYTHON  base interpreter for the venv (default: python3)
#         L2L_FRESH=1 delete an existing venv first

set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${L2L_VENV:-$HERE/.venv-l2l}"
BASE_PYTHON="${L2L_PYTHON:-python3}"
STAMP="$VENV/.l2l-setup-complete"

# Everything the venv gets, pinned. Bump RECIPE when this list changes so an old venv
# is not taken as complete.
RECIPE="l2l-peer-v1"
TORCH_PINS=(torch==2.13.0 torchvision==0.28.0)
DEP_PINS=(
    numpy==2.4.6 cython==3.3.1 scipy==1.17.1 gym==0.26.2 requests==2.34.2 tqdm==4.70.1
    pillow==13.0.0 setuptools==84.2.1 wheel==0.48.0
)
L2L_VERSION=0.2.0
L2L_SDIST_SHA256=69f1d7cb0d0a6be7a2c6ad8e83e2ebbe70fb05e51d61e45e63078b40c75ea419

STEP="start"
T_START=$SECONDS
TMP=""

say() { printf '==> %s\n' "$*"; }
die() {
    printf '\nsetup_learn2learn.sh: ERROR: %s\n' "$*" >&2
    exit 1
}
on_error() {
    local rc=$?
    printf '\nsetup_learn2learn.sh: FAILED (exit %s) during step: %s\n' "$rc" "$STEP" >&2
    printf 'The venv at %s is NOT marked complete; fix the cause and re-run.\n' "$VENV" >&2
    exit "$rc"
}
cleanup() { [[ -n "$TMP" && -d "$TMP" ]] && rm -rf "$TMP"; return 0; }
trap on_error ERR
trap cleanup EXIT

step() {
    STEP="$1"
    say "[$(date +%H:%M:%S), +$((SECONDS - T_START))s] $1"
}

# pip of the venv, never reading this machine's pip config (see the header).
vpip() { "$VENV/bin/python" -m pip --isolated --disable-pip-version-check "$@"; }

verify() {
    # Imports both libraries in one process and runs the pieces the parity check needs.
    REPO="$REPO" L2L_VERSION="$L2L_VERSION" "$VENV/bin/python" - <<'EOF'
import os, sys
from pathlib import Path
import torch, torchvision, learn2learn as l2l, metalearn
from learn2learn.data import task_dataset

repo = Path(os.environ["REPO"]).resolve()
problems = []
if torch.__version__.split("+")[0] != "2.13.0" or "+cpu" in torch.__version__:
    problems.append(f"torch is {torch.__version__}, expected the registry's 2.13.0")
if not torchvision.__version__.startswith("0.28.0"):
    problems.append(f"torchvision is {torchvision.__version__}, expected 0.28.0")
if l2l.__version__ != os.environ["L2L_VERSION"]:
    problems.append(f"learn2learn is {l2l.__version__}")
if not task_dataset.__file__.endswith(".so"):
    problems.append(f"learn2learn.data.task_dataset is not compiled: {task_dataset.__file__}")
if repo not in Path(metalearn.__file__).resolve().parents:
    problems.append(f"metalearn imported from {metalearn.__file__}, not from {repo}")
if problems:
    sys.exit("verification failed:\n  " + "\n  ".join(problems))

# A tiny MAML step of each library, and a TaskDataset episode.
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
learner = l2l.algorithms.MAML(net, lr=0.01).clone()
x = torch.randn(10, 1)
learner.adapt(((learner(x) - x) ** 2).mean())
((learner(x) - x) ** 2).mean().backward()
assert all(p.grad is not None for p in net.parameters())
ds = l2l.data.MetaDataset(torch.utils.data.TensorDataset(torch.randn(40, 3),
                                                         torch.arange(40) % 4))
tasks = l2l.data.TaskDataset(ds, [l2l.data.transforms.NWays(ds, 2),
                                  l2l.data.transforms.KShots(ds, 2),
                                  l2l.data.transforms.LoadData(ds)], num_tasks=3)
xb, yb = tasks.sample()
assert xb.shape == (4, 3), xb.shape
metalearn.MAML(net, inner_lr=0.01, inner_steps=1).step(
    metalearn.data.SineTasks(seed=0, shots=5).sample(2))
print(f"verified: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, learn2learn {l2l.__version__} "
      f"(compiled {Path(task_dataset.__file__).name}), metalearn from {Path(metalearn.__file__).parent}")
EOF
}

# --- 0. preconditions ------------------------------------------------------------------
step "checking preconditions"
if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" ]]; then
    die "$VENV exists but is not a venv; move it away or set L2L_VENV"
fi
[[ -d "$(dirname "$VENV")" ]] || die "the parent folder of $VENV does not exist"
exec 9>"$VENV.lock" || die "cannot create the lock file $VENV.lock"
flock -n 9 || die "another setup_learn2learn.sh is running on $VENV (lock $VENV.lock)"
command -v "$BASE_PYTHON" >/dev/null || die "base interpreter '$BASE_PYTHON' not found (set L2L_PYTHON)"
"$BASE_PYTHON" - <<'EOF' || die "the base interpreter cannot build C extensions (see above)"
import sys, sysconfig, os, shutil
if sys.version_info < (3, 10):
    sys.exit(f"python >= 3.10 needed, got {sys.version.split()[0]}")
inc = sysconfig.get_paths()["include"]
if not os.path.exists(os.path.join(inc, "Python.h")):
    sys.exit(f"Python.h missing in {inc}: install the Python development headers")
if not (shutil.which("cc") or shutil.which("gcc")):
    sys.exit("no C compiler (cc/gcc) on PATH")
EOF
say "base interpreter: $(command -v "$BASE_PYTHON") ($("$BASE_PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
say "venv: $VENV"

if [[ "${L2L_FRESH:-0}" == 1 && -e "$VENV" ]]; then
    [[ -f "$VENV/pyvenv.cfg" ]] || die "L2L_FRESH=1 but $VENV is not a venv; not deleting it"
    step "L2L_FRESH=1: deleting the existing venv"
    rm -rf "$VENV"
fi

if [[ -f "$STAMP" ]]; then
    if [[ "$(head -n1 "$STAMP")" == "$RECIPE" ]]; then
        step "venv is marked complete ($RECIPE); re-verifying"
        if verify; then
            say "nothing to do: learn2learn peer venv already set up ($((SECONDS - T_START))s)"
            say "python: $VENV/bin/python"
            exit 0
        fi
        say "verification of the existing venv FAILED; repairing it"
    else
        say "venv was set up by another recipe ($(head -n1 "$STAMP")); updating it to $RECIPE"
    fi
    rm -f "$STAMP"
fi

# --- 1. venv ---------------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]]; then
    step "reusing the unfinished venv at $VENV (completing it)"
else
    step "creating the venv"
    "$BASE_PYTHON" -m venv "$VENV"
fi
TMP="$(mktemp -d "${TMPDIR:-/tmp}/l2l-setup.XXXXXX")"

# --- 2. torch + torchvision (registry builds) and the other dependencies ----------------
step "installing ${TORCH_PINS[*]} (registry builds, CUDA wheels run on CPU) and ${DEP_PINS[*]}"
vpip install --progress-bar off "${TORCH_PINS[@]}" "${DEP_PINS[@]}"

# --- 3. learn2learn sdist ----------------------------------------------------------------
step "downloading the learn2learn==$L2L_VERSION sdist"
# --no-build-isolation: the venv's Cython satisfies setup_requires; without it pip builds
# an old Cython from source just to read the metadata (minutes).
vpip download --no-deps --no-binary :all: --no-build-isolation --progress-bar off \
    -d "$TMP/sdist" "learn2learn==$L2L_VERSION"
SDIST="$TMP/sdist/learn2learn-$L2L_VERSION.tar.gz"
[[ -f "$SDIST" ]] || die "pip download did not produce $SDIST"
GOT_SHA="$(sha256sum "$SDIST" | cut -d' ' -f1)"
[[ "$GOT_SHA" == "$L2L_SDIST_SHA256" ]] ||
    die "sdist sha256 is $GOT_SHA, expected $L2L_SDIST_SHA256"
say "sdist sha256 OK ($GOT_SHA)"

# --- 4. regenerate the Cython C ----------------------------------------------------------
step "regenerating the C sources from the .pyx files with Cython 3"
tar -xzf "$SDIST" -C "$TMP"
SRC="$TMP/learn2learn-$L2L_VERSION"
(
    cd "$SRC"
    # Same directives as learn2learn's setup.py uses when it cythonizes itself.
    "$VENV/bin/python" - <<'EOF'
import glob, Cython
from Cython.Build import cythonize
pyx = sorted(glob.glob("learn2learn/**/*.pyx", recursive=True))
if not pyx:
    raise SystemExit("no .pyx files found in the sdist")
cythonize(pyx, compiler_directives={"language_level": 3, "embedsignature": True}, force=True)
for p in pyx:
    c = p[:-4] + ".c"
    first = open(c).readline().strip()
    if "Cython 3" not in first:
        raise SystemExit(f"{c} was not regenerated: {first}")
    print(f"  {p} -> {c}: {first}")
print(f"  Cython {Cython.__version__}")
EOF
)

# --- 5. build and install learn2learn ----------------------------------------------------
step "building the learn2learn wheel"
vpip wheel --no-deps --no-build-isolation --progress-bar off -w "$TMP/wheel" "$SRC"
WHEEL=("$TMP"/wheel/learn2learn-"$L2L_VERSION"-*.whl)
[[ -f "${WHEEL[0]}" ]] || die "no learn2learn wheel was built in $TMP/wheel"
say "built $(basename "${WHEEL[0]}")"
step "installing learn2learn (--no-deps: its dependencies are installed above; gsutil and"\
" qpth, which it lists but does not import at import time, are left out)"
vpip install --no-deps --force-reinstall --progress-bar off "${WHEEL[0]}"

# --- 6. metalearn, editable --------------------------------------------------------------
step "installing metalearn from $REPO (editable, --no-deps)"
vpip install --no-deps --no-build-isolation --progress-bar off -e "$REPO"

# --- 7. verify, then mark complete -------------------------------------------------------
step "verifying"
verify
{
    echo "$RECIPE"
    echo "completed $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - T_START))s"
    echo "sdist sha256 $L2L_SDIST_SHA256"
    vpip list --format=freeze --exclude-editable
} >"$STAMP.tmp.$$"
mv -f "$STAMP.tmp.$$" "$STAMP"
STEP="done"
say "done in $((SECONDS - T_START))s: learn2learn $L2L_VERSION + metalearn in $VENV"
say "run the parity check with: $VENV/bin/python $HERE/l2l_parity.py"
