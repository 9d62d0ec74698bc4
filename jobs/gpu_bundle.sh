#!/usr/bin/env bash
# Everything jobs/gpu_check.sh needs on the offline GPU machine (Python 3.12, torch + CUDA, no
# Ray, no DeepSpeed, no internet), in one folder small enough to be carried to it (a device call
# carries at most 64 MiB). Run HERE, on a machine with a package index, from the repository root:
#
#   bash jobs/gpu_bundle.sh [DIR]              # default .gpu-bundle; prints the size, fails over LIMIT_MIB
#   bash jobs/gpu_bundle.sh slim ROOT OUT      # only the slimming step (see slim_ray below)
#   bash jobs/gpu_bundle.sh min FULL MIN       # from bundle FULL, a bundle MIN of only what the GPU
#                                              # tests and benchmarks need (no Ray, no DeepSpeed;
#                                              # < 1 MiB): PHASES="env tests eager plain compile"
#                                              # BUNDLE=MIN bash jobs/gpu_check.sh
#
# DIR is not tracked by git; keep it out of `git status` once per checkout (not in .gitignore):
#   echo /.gpu-bundle/ >> .git/info/exclude
#
# What DIR holds (gpu_check.sh installs all of it into a private folder on PYTHONPATH):
#   ray-<version>-slim.tar.xz  Ray's wheel for that Python, unpacked, without ray/jars (Java),
#                              ray/rllib, ray/serve, ray/llm and the dashboard's source maps, xz'd
#                              (79 MB wheel -> ~30 MB); untar it into a folder on PYTHONPATH
#   wheels/*.whl               the packages the Ray Train/Tune path, DeepSpeed and this project
#                              need that the GPU machine lacks (list below), and a wheel of
#                              DeepSpeed built here (it is an sdist; no ops compiled: they are
#                              JIT-built there, where nvcc is)
#   wheels/dashboard/*.whl     what Ray's full dashboard adds (optional there, see below)
#   PYTHON                     the Python version it was made for (gpu_check.sh refuses others)
#   MANIFEST.txt               file sizes and sha256 sums
#
# Knobs (environment): PYVER (3.12: the GPU machine's Python), LIMIT_MIB (60), RAY_VERSION
# (2.60.0), DEEPSPEED_VERSION (0.19.7, see below), PYTHON (.venv/bin/python when there, else
# python3: runs pip and builds the DeepSpeed wheel, so it needs torch and setuptools), XZ_LEVEL (6).
# Re-running reuses what is there (Ray's archive, downloaded wheels) and removes what is stale.
set -uo pipefail

PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PYVER=${PYVER:-3.12}
LIMIT_MIB=${LIMIT_MIB:-60}
RAY_VERSION=${RAY_VERSION:-2.60.0}
# Not 0.19.8: its engine broadcasts every parameter as `p.data.view(torch.uint8)`, which raises
# "self.stride(-1) must be 1 to view Float as Byte" for channels_last conv weights (this project's
# default) in deepspeed.initialize, even with one worker. 0.19.7 is what the test suite runs.
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.7}
XZ_LEVEL=${XZ_LEVEL:-6}

# Parts of Ray this project never imports (Train/Tune/Core/dashboard stay). Java jars alone are 34 MB.
RAY_DROP_DIRS="jars rllib serve llm"

# The GPU machine lacks these. It has torch, torchvision, numpy, Pillow, pandas, pyarrow, fsspec,
# pyyaml, requests, click, filelock, msgpack, packaging, protobuf, aiohttp, grpcio, tensorboard,
# pytest, rich: none of those is shipped, so none is shadowed, except typing_extensions and attrs
# (and six below), which may be there in versions too old for pydantic/jsonschema: the shipped
# ones come first on PYTHONPATH. Versions: the ones this project's CPU venv runs its test suite
# with (`pip check` clean with Ray 2.60 and DeepSpeed 0.19).
WHEELS=(
    # Ray core: jsonschema and what it needs (attrs >= 22.2; typing_extensions new enough for pydantic)
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    attrs==26.1.0 typing_extensions==4.16.0
    # Ray Train / Tune (and DeepSpeed's config): pydantic 2, tensorboardX
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 tensorboardX==2.6.5
    # DeepSpeed's requirements (pydantic above; ninja and py-cpuinfo for its JIT-built ops)
    einops==0.8.2 hjson==3.1.0 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0 tqdm==4.70.1
    # this project (tyro: every command line; it needs docstring-parser and typeguard)
    webdataset==1.0.2 braceexpand==0.1.7 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
)
# Ray's full dashboard (wheels/dashboard/, optional): ray.init starts it when these import, and
# the State API that Ray Train's placement-group cleaner polls lives there. Exactly what its
# modules import (opencensus needs six and, for google.rpc, googleapis-common-protos; not
# google-api-core/google-auth). If any of them fails there (a dashboard that starts and then
# dies takes ray.init down with it), gpu_check.sh leaves this folder out: Ray's minimal dashboard.
DASHBOARD_WHEELS=(
    aiohttp-cors==0.8.1 prometheus-client==0.26.0 opencensus==0.11.4 opencensus-context==0.1.3 six==1.17.0
    googleapis-common-protos==1.76.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
    opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2
)

# what the core (tests, benchmarks) needs beyond the machine's torch: `min` copies these
# (tensorboardx: a run with a run folder writes TensorBoard events, mtl/tracking.py)
MIN_NAMES="webdataset braceexpand tyro docstring-parser typeguard typing_extensions tensorboardx"

die() { echo "gpu_bundle: $*" >&2; exit 1; }

make_min() {  # make_min FULL MIN: MIN gets FULL's wheels of MIN_NAMES and its PYTHON file
    local full=$1 min=$2 name f
    [ -s "$full/PYTHON" ] || die "$full is not a bundle (no PYTHON file): run bash jobs/gpu_bundle.sh $full first"
    rm -rf "$min" && mkdir -p "$min/wheels" || die "cannot create $min"
    for name in $MIN_NAMES; do
        f=$(compgen -G "$full/wheels/${name//-/_}-*.whl" | head -1)
        [ -n "$f" ] || die "$full/wheels holds no wheel of $name"
        cp "$f" "$min/wheels/" || die "cannot copy $f"
    done
    cp "$full/PYTHON" "$min/"
    echo "== $min: $(ls "$min/wheels" | wc -l) wheels, $(du -sh "$min" | cut -f1)"
}

slim_ray() {  # slim_ray ROOT OUT.tar.xz
    # ROOT is an unpacked Ray wheel (it holds ray/ and ray-*.dist-info/); it is slimmed IN PLACE
    # (work on a copy), then packed so that untarring it into a folder on PYTHONPATH installs Ray.
    local root=$1 out=$2 d
    [ -d "$root/ray" ] || { echo "slim: $root holds no ray/ package folder" >&2; return 2; }
    for d in $RAY_DROP_DIRS; do
        rm -rf "${root:?}/ray/$d"
    done
    # source maps of the dashboard's web client (*.js.map, *.css.map): tens of MB nobody reads there
    [ -d "$root/ray/dashboard" ] && find "$root/ray/dashboard" -type f -name '*.map' -delete
    find "$root" -type d -name __pycache__ -prune -exec rm -rf {} +  # bytecode of another Python
    local top=(ray)
    local info
    for info in "$root"/*.dist-info; do
        [ -d "$info" ] && top+=("$(basename "$info")")
    done
    mkdir -p "$(dirname "$out")"
    # permissions travel (raylet, gcs_server are executables); owner does not
    tar -C "$root" --owner=0 --group=0 -cf - "${top[@]}" | xz "-$XZ_LEVEL" -T0 >"$out.part" || { rm -f "$out.part"; return 1; }
    mv "$out.part" "$out"
}

if [ "${1:-}" = min ]; then
    [ $# -eq 3 ] || die "usage: $0 min FULL_BUNDLE MIN_BUNDLE"
    make_min "$2" "$3"
    exit 0
fi
if [ "${1:-}" = slim ]; then
    [ $# -eq 3 ] || die "usage: $0 slim ROOT OUT.tar.xz"
    slim_ray "$2" "$3"
    exit $?
fi

DIR=${1:-.gpu-bundle}
TAG=cp${PYVER/./}
mkdir -p "$DIR/wheels" || die "cannot create $DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bundle.XXXXXX") || die "no temp folder"
trap 'rm -rf "$WORK"' EXIT
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
download() {  # download DEST SPEC...: binary wheels for the GPU machine's Python and platform, no dependencies
    local dest=$1
    shift
    # (grep: pip's harmless "Location ... is ignored" warnings about this machine's index config)
    "$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
        --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" -d "$dest" "$@" 2>&1 | grep -v "^WARNING: Location '"
    return "${PIPESTATUS[0]}"
}

# 1. Ray, slimmed (skipped when the archive is there already)
RAY_TAR="$DIR/ray-$RAY_VERSION-$TAG-slim.tar.xz"
if [ ! -s "$RAY_TAR" ]; then
    echo "== ray $RAY_VERSION ($TAG): download, unpack, slim, xz -$XZ_LEVEL"
    download "$WORK/ray-whl" "ray==$RAY_VERSION" || die "could not download ray==$RAY_VERSION for $TAG"
    unzip -q "$WORK"/ray-whl/ray-*.whl -d "$WORK/ray-root" || die "could not unpack Ray's wheel"
    slim_ray "$WORK/ray-root" "$RAY_TAR" || die "slimming Ray failed"
    rm -rf "$WORK/ray-root" "$WORK/ray-whl"
fi
rm -f "$DIR"/ray-*-slim.tar.xz.part
for f in "$DIR"/ray-*-slim.tar.xz; do  # an archive of another version or Python left from an earlier run
    [ "$f" = "$RAY_TAR" ] || rm -f "$f"
done

# 2. the missing packages as wheels (pip skips the ones already downloaded)
echo "== ${#WHEELS[@]} + ${#DASHBOARD_WHEELS[@]} (dashboard) wheels for $TAG manylinux x86_64"
mkdir -p "$DIR/wheels/dashboard"
download "$DIR/wheels" "${WHEELS[@]}" || die "could not download the wheels"
download "$DIR/wheels/dashboard" "${DASHBOARD_WHEELS[@]}" || die "could not download the dashboard's wheels"

# 3. DeepSpeed: an sdist on PyPI; build a pure-Python wheel here (no ops: DS_BUILD_OPS=0)
if ! compgen -G "$DIR/wheels/deepspeed-$DEEPSPEED_VERSION-*.whl" >/dev/null; then
    echo "== deepspeed $DEEPSPEED_VERSION: wheel from the sdist (needs torch in $PY)"
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
        -w "$WORK/ds" "deepspeed==$DEEPSPEED_VERSION" 2>&1 | grep -v "^WARNING: Location '"
    [ "${PIPESTATUS[0]}" -eq 0 ] || die "building the DeepSpeed wheel failed"
    ds=$(ls "$WORK"/ds/deepspeed-*.whl)
    case $ds in *-py3-none-any.whl) ;; *) die "DeepSpeed's wheel is not pure Python: $ds" ;; esac
    cp "$ds" "$DIR/wheels/" || die "cannot copy $ds"
fi

# 4. nothing stale: only the listed wheels and this DeepSpeed stay
prune() {  # prune FOLDER SPEC...: delete wheels in FOLDER that no SPEC (name==version) names
    local folder=$1 f key keep
    shift
    keep=$(printf '%s\n' "$@" | sed 's/==/-/; s/[-_.]\+/_/g' | tr 'A-Z' 'a-z')
    for f in "$folder"/*.whl; do
        [ -e "$f" ] || continue
        key=$(basename "$f" | cut -d- -f1-2 | sed 's/[-_.]\+/_/g' | tr 'A-Z' 'a-z')
        grep -qxF "$key" <<<"$keep" || { echo "   (removing stale $(basename "$f"))"; rm -f "$f"; }
    done
}
prune "$DIR/wheels" "${WHEELS[@]}" "deepspeed==$DEEPSPEED_VERSION"
prune "$DIR/wheels/dashboard" "${DASHBOARD_WHEELS[@]}"
n=$(find "$DIR/wheels" -maxdepth 1 -name '*.whl' | wc -l)
[ "$n" -eq $((${#WHEELS[@]} + 1)) ] || die "expected $((${#WHEELS[@]} + 1)) wheels in $DIR/wheels, found $n"
nd=$(find "$DIR/wheels/dashboard" -name '*.whl' | wc -l)
[ "$nd" -eq ${#DASHBOARD_WHEELS[@]} ] || die "expected ${#DASHBOARD_WHEELS[@]} wheels in $DIR/wheels/dashboard, found $nd"

echo "$PYVER" >"$DIR/PYTHON"
(cd "$DIR" && find . -type f ! -name MANIFEST.txt | sort | xargs sha256sum | while read -r sum f; do
    printf '%10d  %s  %s\n' "$(stat -c %s "$f")" "$sum" "$f"; done) >"$DIR/MANIFEST.txt"

total=$(du -sb "$DIR" | cut -f1)
mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "== $DIR: $mib MiB ($(du -sb "$RAY_TAR" | awk '{ printf "%.1f", $1 / 1048576 }') MiB Ray, $n + $nd wheels) for Python $PYVER; limit $LIMIT_MIB MiB"
[ "$total" -le $((LIMIT_MIB * 1048576)) ] || die "$DIR is $mib MiB, over the limit of $LIMIT_MIB MiB"
