#!/usr/bin/env bash
# Wait for a remote tmux session on a rented box: exit 0 completed, 1 crashed, 3 host unreachable,
# 4 stopped with `ablate remote stop`, 2 bad usage (or no such session in that work dir).
#   VAST_HOST=ssh4.vast.ai VAST_PORT=31234 REMOTE_SESSION=stage3b COMPLETE_FILE=runs/.complete-stage3b \
#     scripts/local/wait_or_crash.sh
# Optional: REMOTE_WORKDIR (the box's work dir, default ~/ablate), VAST_USER (root), SSH_KEY,
# ABLATE_KNOWN_HOSTS (.ablate/known_hosts), POLL_SECONDS (first interval, 30), MAX_POLL_SECONDS (600),
# GRACE_SECONDS (900). COMPLETE_FILE is a path on the box, absolute or relative to the work dir.
# A thin wrapper: `ablate remote watch` reads the same variables; extra arguments are passed on.
set -u
for var in VAST_HOST VAST_PORT REMOTE_SESSION; do
  if [ -z "${!var:-}" ]; then echo "wait_or_crash.sh: $var is not set" >&2; exit 2; fi
done
here=$(cd "$(dirname "$0")/../.." && pwd)
if [ -x "$here/.venv/bin/ablate" ]; then ABLATE="$here/.venv/bin/ablate"; else ABLATE=ablate; fi
exec "$ABLATE" remote watch "$@"
