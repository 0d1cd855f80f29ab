# Sourced by the scripts/device_*.sh passes: the environment of one device call.
# The GPU machine reaches no registry, so wheels it lacks (torchao, expecttest) travel in .whl/
# (carry=[".whl"]) and are unpacked into /tmp/site; the package runs from the checkout.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
if ls .whl/*.whl >/dev/null 2>&1; then
  # once per machine: two passes started together on two GPUs must not reinstall over each other
  [ -f /tmp/site/.installed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.installed
  export PYTHONPATH=/tmp/site:.
fi
