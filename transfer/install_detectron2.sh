#!/usr/bin/env bash
# Install detectron2 into the Python environment of PYTHON (default: python3). Idempotent: when
# `import detectron2` (with its model zoo and R-CNN modules) already works, it installs nothing.
#
#   transfer/install_detectron2.sh .venv/bin/python
#
# Two paths (docs/transfer.md):
#  * default, any machine: the PyPI wheel sal-detectron2==0.7.2, a pure-Python build of upstream
#    detectron2 (commit a59f0563, April 2024) tagged for CPython 3.10. Its compiled _C is for 3.10 and
#    cannot load on other Pythons, so we install the Python sources only (no deps), drop the stray
#    top-level `tools` package and the _C extension, and install its real dependencies by name.
#    Without _C, ROIAlign/NMS come from torchvision; C4/FPN Faster/Mask R-CNN train and evaluate;
#    rotated boxes, deformable conv and the fast COCO evaluator are unavailable.
#  * DETECTRON2_SRC=<git URL or source dir>: build upstream detectron2 from source (GPU clusters, with
#    CUDA and a compiler), e.g. DETECTRON2_SRC=git+https://github.com/facebookresearch/detectron2.git
#
# No `pip check` on purpose: the wheel declares numpy<2, yet numpy 2 works.
set -euo pipefail

PY="${1:-python3}"
WHEEL_SPEC="sal-detectron2==0.7.2"
DEPS=(
    "pycocotools"
    "fvcore>=0.1.5,<0.1.6"
    "iopath>=0.1.7,<0.1.10"
    "yacs" "termcolor" "tabulate" "tqdm" "cloudpickle"
    "omegaconf>=2.1,<2.4"
    "hydra-core"
    "matplotlib" "tensorboard" "Pillow"
    # the dense-prediction evaluators (docs/transfer.md): LVIS and Cityscapes APIs and what they import;
    # OpenCV also for MMSeg's PhotoMetricDistortion. Headless OpenCV: no libGL needed on servers
    "opencv-python-headless" "shapely" "appdirs" "pyquaternion" "coloredlogs" "requests"
)
# installed without their declared dependencies: lvis asks for opencv-python (needs libGL) and Cython, and
# cityscapesscripts for the `typing` backport; everything they import is in DEPS
NODEPS=("lvis==0.5.3" "cityscapesscripts==2.3.0")

probe() {  # quick: detectron2 imports and every dependency is present; prints its version
    "$PY" - <<'EOF' 2>/dev/null
import importlib.util, sys
import detectron2, pkg_resources
mods = ("pycocotools", "fvcore", "iopath", "yacs", "termcolor", "tabulate", "cloudpickle", "omegaconf", "hydra",
        "tensorboard", "detectron2.model_zoo", "detectron2.engine", "cv2", "shapely", "lvis", "cityscapesscripts")
missing = [m for m in mods if importlib.util.find_spec(m) is None]
print(detectron2.__version__)
sys.exit(1 if missing else 0)
EOF
}

check() {  # thorough: what the runner imports
    "$PY" -c 'import detectron2.model_zoo, detectron2.engine, detectron2.evaluation, pycocotools.coco, cv2, lvis
from cityscapesscripts.helpers.labels import name2label
from detectron2.modeling.roi_heads import Res5ROIHeads'
}

if ! "$PY" -c 'import sys' 2>/dev/null; then
    echo "install_detectron2: cannot run Python interpreter '$PY'" >&2
    exit 2
fi
if version=$(probe); then
    echo "install_detectron2: detectron2 $version already importable with $PY; nothing to do"
    exit 0
fi

start=$(date +%s)
pip_install() { "$PY" -m pip install --disable-pip-version-check --no-input "$@"; }

echo "install_detectron2: installing dependencies: ${DEPS[*]}"
pip_install "${DEPS[@]}"
pip_install --no-deps "${NODEPS[@]}"
# detectron2.model_zoo imports pkg_resources, which setuptools>=81 no longer ships.
if ! "$PY" -c 'import pkg_resources' 2>/dev/null; then
    echo "install_detectron2: providing pkg_resources (setuptools<81)"
    pip_install "setuptools<81"
fi

if [[ -n "${DETECTRON2_SRC:-}" ]]; then
    echo "install_detectron2: building detectron2 from source: $DETECTRON2_SRC"
    pip_install --no-build-isolation "$DETECTRON2_SRC"
else
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "install_detectron2: fetching $WHEEL_SPEC (pure-Python sources of a cp310 wheel)"
    pip_install --no-deps --only-binary=:all: --python-version 3.10 --target "$tmp/t" "$WHEEL_SPEC"
    # keep only the detectron2 package and its metadata; the wheel also ships a top-level `tools`
    rm -rf "$tmp/t/tools" "$tmp/t"/detectron2/_C.cpython-*.so
    rm -rf "$site/detectron2" "$site"/sal_detectron2-*.dist-info
    mv "$tmp/t/detectron2" "$site/"
    mv "$tmp/t"/sal_detectron2-*.dist-info "$site/"
fi

if ! check 2>/dev/null; then
    echo "install_detectron2: detectron2 installed but does not import; details:" >&2
    check >&2 || true
    exit 1
fi
echo "install_detectron2: done in $(( $(date +%s) - start ))s ($("$PY" -c 'import detectron2; print(detectron2.__file__)'))"
