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
RUN_DIR=$(python - "$CONFIG" "${EXTRA[@]}" "$@" <<'PY'
import sys
from pathlib import Path
from passk_rl.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    print(Path(cfg.run.output_dir).expanduser().resolve() / cfg.run.name)
except ConfigError as e:
    sys.exit(f"config error: {e}")
PY
) || exit 2
RUN_NAME=$(basename "$RUN_DIR")
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
JOB_ID="passk_rl_${RUN_NAME}_$(date +%s)"
ADDR="http://127.0.0.1:$DASH_PORT"
rm -f "$RUN_DIR/exit_status.json"
for attempt in $(seq 1 30); do
  set +e
  ray job submit --address "$ADDR" --working-dir . --submission-id "$JOB_ID" --no-wait \
    --runtime-env-json '{"excludes": [".venv", "runs", ".git"], "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "300"}}' \
    -- python -m passk_rl.launch --config "$CONFIG" "${EXTRA[@]}" "$@" > "$TMP/submit.log" 2>&1
  rc=$?
  set -e
  # On a loaded machine the head's job agent can come up after the job API answers; nothing was submitted then.
  if [ "$rc" -ne 0 ] && grep -q "No available agent to submit job" "$TMP/submit.log"; then sleep 2; continue; fi
  break
done
[ "$rc" -eq 0 ] || { cat "$TMP/submit.log"; echo "[run] the job could not be submitted (exit $rc)"; exit "$rc"; }
# What Ray's own "ray job stop" hint lacks on this private cluster: the token (in a file only this user can read).
STOP_CMD="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TMP/auth_token $ROOT/.venv/bin/ray job stop --address $ADDR $JOB_ID"
echo "[run] job $JOB_ID submitted. Ctrl-C stops it after the current step with a checkpoint; so does, from another shell:"
echo "[run]   $STOP_CMD"
# The job's own output; the CLI's connection chatter (INFO/SUCC/WARN lines of cli.py, sdk.py: the script says itself how the job ended) is left out.
ray job logs --address "$ADDR" --follow "$JOB_ID" 2>&1 \
  | grep --line-buffered -v -E '^[0-9-]+ [0-9:,]+[[:space:]]+(INFO|SUCC|WARN) (cli|sdk)\.py:' &
FOLLOW=$!
STOPPING=0
stop_job() {
  # Ctrl-C: the job (not in this terminal's process group) finishes its step, checkpoints and exits with code 5,
  # as under `ray job stop`; this script waits for it, so the cluster outlives the job's last step.
  if [ "$STOPPING" -eq 1 ]; then echo "[run] already stopping; waiting for the job's checkpoint"; return; fi
  STOPPING=1
  echo "[run] stopping the job after its current step (a checkpoint is written)..."
  ray job stop --address "$ADDR" --no-wait "$JOB_ID" > "$TMP/stop.log" 2>&1 || cat "$TMP/stop.log"
}
trap stop_job INT TERM
# `wait` returns early when a trapped signal arrives: wait again until the log stream ends with the job.
while kill -0 "$FOLLOW" 2>/dev/null; do wait "$FOLLOW" || true; done
trap - INT TERM
read -r rc LAST_STEP < <(python - "$RUN_DIR/exit_status.json" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print(s["code"], s["last_step"])
except (OSError, ValueError, KeyError):
    print(1, 0)  # the job ended before the run could say how (e.g. killed): a failure
PY
)
if [ "$rc" -eq 5 ]; then
  echo "[run] stopped at step $LAST_STEP; continue with \`bash scripts/run.sh${*:+ $*} run.resume=true\`"
  exit 5
fi
[ "$rc" -eq 0 ] || { echo "[run] the job failed (exit $rc; \`ray job logs $JOB_ID\` and $RUN_DIR/worker.log have the details)"; exit "$rc"; }
echo "[run] metrics: $RUN_DIR/metrics.jsonl   summary: $RUN_DIR/summary.json"
if [ -f "$RUN_DIR/pass_at_k.png" ]; then echo "[run] plot: $RUN_DIR/pass_at_k.png"; fi
