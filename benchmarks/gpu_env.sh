# Sourced by the GPU scripts (gpu_check.sh, gpu_e2e.sh): step runner and installer.
# step NAME TIMEOUT_S CMD...  runs one step, prints PASS/FAIL NAME, never aborts the script;
# finish                      lists the failed steps, exit status 1 if any;
# gpu_install                 on a machine without internet (Python 3.12, torch with CUDA
#                             preinstalled): the wheels carried in .whl/ (megatron-core, see
#                             docs/GPU.md) into /tmp/site, then this package with its C++
#                             extension; prints the versions. Uses PY; non-zero on failure.
T0=$(date +%s)
FAILED=()
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
step() {
  local name=$1 limit=$2; shift 2
  stamp "$name"
  timeout "$limit" "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then
    echo "PASS $name"
  else
    FAILED+=("$name (rc $rc)")
    echo "FAIL $name (rc $rc$([ $rc -eq 124 ] && echo ", timed out after $limit s"))"
  fi
  return $rc
}
finish() {
  stamp "done"
  if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
  fi
  echo "all steps passed"
  exit 0
}
gpu_install() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "installing the carried wheels failed"; return 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # Our package and its pybind11 extension (pybind11, setuptools and wheel are on the image).
  if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
    echo "pip install -e . failed; building the extension in place instead" >&2
    "$PY" setup.py -q build_ext --inplace || { echo "building the C++ extension failed"; return 1; }
    export PYTHONPATH=$PWD:$PYTHONPATH
  fi
  "$PY" - <<'PYEOF' || return 1
import torch, megatron.core, transformers
import megatron_amopo._planner  # the C++ extension must import
from megatron_amopo.model.provider import transformer_engine_available
print(f"torch {torch.__version__} cuda {torch.version.cuda}; megatron-core {megatron.core.__version__}; "
      f"transformers {transformers.__version__}; device {torch.cuda.get_device_name()}; "
      f"transformer-engine {'yes' if transformer_engine_available() else 'no (local spec + SDPA)'}")
PYEOF
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
}
