#!/usr/bin/env bash
# Start a Prefect server on 127.0.0.1:PORT (state under $PREFECT_HOME) and serve every task's flow
# as a deployment (train-<task>/default for every task in params.yaml). In another shell:
#   export PREFECT_API_URL=http://127.0.0.1:PORT/api
#   prefect deployment run train-detection/default --param epochs=1 --watch
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
mkdir -p "$PREFECT_HOME"
# own process group, so that stopping it also stops the web server it starts
setsid prefect server start --host 127.0.0.1 --port "$PORT" >"$PREFECT_HOME/server.log" 2>&1 &
SERVER=$!
trap 'kill -- -$SERVER 2>/dev/null || kill $SERVER 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 90); do
    if curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1 || python - <<PY 2>/dev/null
import urllib.request, sys; urllib.request.urlopen("$PREFECT_API_URL/health", timeout=1)
PY
    then break; fi
    kill -0 $SERVER 2>/dev/null || { cat "$PREFECT_HOME/server.log"; exit 1; }
    sleep 1
done
echo "Prefect server on http://127.0.0.1:${PORT} (UI); serving deployments. Run, in another shell:"
echo "  export PREFECT_API_URL=$PREFECT_API_URL"
echo "  prefect deployment run train-detection/default --param epochs=1 --watch"
echo "  prefect deployment run predict-detection/default --param input=photos/ --param out=predictions/ --watch"
echo "  (any task: train-<task>/default, predict-<task>/default; --param batch_size=4, --param seed=1, --params '{\"overrides\": {...}}')"
python -m flows.serve
