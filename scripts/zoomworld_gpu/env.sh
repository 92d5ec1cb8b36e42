# Sourced by the device scripts (run from the repository root of the device's copy of the working tree):
# - with .zw/src.tar (`git archive HEAD` made here before the call), work in that committed snapshot under
#   /tmp/src, so edits in progress in the checkout never reach a device run;
# - install the wheels in .whl/ that the device image lacks (pydantic and its needs);
# - make the one `qzoom_adapters` namespace importable without installing the checkout: the installed layout
#   maps backbones/, recipes/ and benchmarks/ to qzoom_adapters.* (pyproject's package-dir); links do it here.
if [ -f .zw/src.tar ]; then
  rm -rf /tmp/src && mkdir -p /tmp/src && tar -C /tmp/src -xf .zw/src.tar
  cp -r .zw /tmp/src/ && { [ -d .whl ] && cp -r .whl /tmp/src/ || true; }
  cd /tmp/src
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
for d in backbones recipes benchmarks; do [ -e "qzoom_adapters/$d" ] || ln -s "../$d" "qzoom_adapters/$d"; done
export PYTHONUNBUFFERED=1
