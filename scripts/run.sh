#!/usr/bin/env bash
# The default run, end to end: installs everything (./.venv), starts a local Ray cluster with its dashboard, submits
# the training job with `ray job submit`, streams its progress, and stops the cluster it started. The run goes to
# runs/<run.name> (replacing an earlier one of that name unless run.resume=true). Extra arguments are config
# overrides, e.g. `bash scripts/run.sh run.steps=5`.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/tiny_cpu.yaml}
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
ROOT=$PWD
# The run replaces an earlier run of the same name in runs/ (run.overwrite) unless it is asked to continue it.
EXTRA=("run.output_dir=$ROOT/runs")
case " $* " in *" run.resume=true "*) ;; *) EXTRA+=("run.overwrite=true") ;; esac
# A bad config fails here, naming the key, before any cluster starts.
RUN_NAME=$(python - "$CONFIG" "${EXTRA[@]}" "$@" <<'PY'
import sys
from passk_rl.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).run.name)
except ConfigError as e:
    sys.exit(f"config error: {e}")
PY
) || exit 2
# Free ports picked now, so a cluster someone else runs on this machine is never touched.
# Ray's defaults for the dashboard agent (52365, which serves job submission) and the client server (10001) are
# fixed: with another Ray cluster on the machine (a run of the trainer, a test) the agent cannot bind and every
# `ray job submit` answers "No available agent", so they are picked free as well.
read -r GCS_PORT DASH_PORT AGENT_PORT CLIENT_PORT < <(python - <<'PY'
import socket
ports = []
socks = []
for _ in range(4):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); socks.append(s)
print(*ports)
PY
)
TMP=$(mktemp -d /tmp/passk_rl_ray.XXXX)
# Ray 2.60 turns token authentication on for a new cluster when ~/.ray/auth_token exists, and the job CLI then
# needs the token too: give this private cluster its own token, shared only with our own CLI calls and the job.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(python -c 'import secrets; print(secrets.token_hex(32))')"
( umask 077; printf '%s\n' "$RAY_AUTH_TOKEN" > "$TMP/auth_token" )
echo "[run] starting a local Ray cluster (dashboard http://127.0.0.1:$DASH_PORT)"
# --block keeps the head in one process group that we own: killing it stops exactly this cluster.
setsid ray start --head --block --port "$GCS_PORT" --include-dashboard true --dashboard-host 127.0.0.1 \
  --dashboard-port "$DASH_PORT" --dashboard-agent-listen-port "$AGENT_PORT" --ray-client-server-port "$CLIENT_PORT" \
  --num-cpus "${PASSK_RL_NUM_CPUS:-4}" --temp-dir "$TMP" --disable-usage-stats \
  > "$TMP/ray_head.log" 2>&1 &
HEAD_PID=$!
cleanup() {
  echo "[run] stopping the Ray cluster started by this script"
  kill -TERM -- "-$HEAD_PID" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$HEAD_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$HEAD_PID" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 120); do
  if ray job list --address "http://127.0.0.1:$DASH_PORT" >/dev/null 2>&1; then break; fi
  kill -0 "$HEAD_PID" 2>/dev/null || { echo "[run] Ray failed to start:"; cat "$TMP/ray_head.log"; exit 1; }
  sleep 1
done
echo "[run] dashboard: http://127.0.0.1:$DASH_PORT   (jobs, actors, logs; it asks for the token in $TMP/auth_token)"
# RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` sends SIGTERM, then SIGKILL after this long; the run needs the rest of
# a step plus a checkpoint to stop cleanly (it then continues with run.resume=true).
for attempt in $(seq 1 30); do
  set +e
  ray job submit --address "http://127.0.0.1:$DASH_PORT" --working-dir . \
    --runtime-env-json '{"excludes": [".venv", "runs", ".git"], "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "300"}}' \
    -- python -m passk_rl.launch --config "$CONFIG" "${EXTRA[@]}" "$@" 2>&1 | tee "$TMP/submit.log"
  rc=${PIPESTATUS[0]}
  set -e
  # On a loaded machine the head's job agent can come up after the job API answers; nothing was submitted then.
  if [ "$rc" -ne 0 ] && grep -q "No available agent to submit job" "$TMP/submit.log"; then sleep 2; continue; fi
  break
done
[ "$rc" -eq 0 ] || { echo "[run] the job failed (exit $rc)"; exit "$rc"; }
echo "[run] metrics: $ROOT/runs/$RUN_NAME/metrics.jsonl   summary: $ROOT/runs/$RUN_NAME/summary.json"
if [ -f "$ROOT/runs/$RUN_NAME/pass_at_k.png" ]; then echo "[run] plot: $ROOT/runs/$RUN_NAME/pass_at_k.png"; fi
