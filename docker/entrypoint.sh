#!/bin/sh
# The image's commands (docker-compose.yml uses the first three):
#   api       the API behind uvicorn, wired to Celery (job queue, broker and live-worker readiness checks)
#   worker    a Celery worker; queues and concurrency follow the machine (gpu,cpu with CUDA, else cpu)
#   migrate   upgrade the database to the latest schema, once, before api and workers start
#   serve     the embedded service in one container (SQLite, filesystem broker, a worker child process)
# Anything else runs as a command (e.g. `bash`).
set -e
command="${1:-api}"
[ "$#" -gt 0 ] && shift
case "$command" in
  api)
    exec uvicorn --factory app.embedded:create_service_app --host 0.0.0.0 --port "${INFLUENCE_PORT:-8000}" \
      --proxy-headers "$@" ;;
  worker)
    exec python -m worker --hostname "worker@%h" "$@" ;;
  migrate)
    exec python -m app.migrate "$@" ;;
  serve)
    exec python -m app.embedded serve --host 0.0.0.0 "$@" ;;
  *)
    exec "$command" "$@" ;;
esac
