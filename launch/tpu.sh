#!/usr/bin/env bash
# Launch a cm3jax command on every worker of a Cloud TPU VM or pod slice.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu.sh --name=NAME --zone=ZONE --accelerator=TYPE [options] -- COMMAND [ARGS...]

Creates the TPU VM (or reuses it when it exists), ships the code, installs cm3jax with jax[tpu] on every worker,
runs COMMAND on all workers (--worker=all) and streams their logs. jax.distributed starts by itself on TPU pods.
Exits with the status gcloud reports for COMMAND on the workers. Without --repo the last commit of this checkout is
shipped (git archive HEAD): uncommitted changes are left out, with a warning.

  --name=NAME            TPU VM name (required)
  --zone=ZONE            e.g. us-central2-b (required)
  --accelerator=TYPE     e.g. v4-32, v5p-128 (required to create; ignored when reusing)
  --project=PROJECT      gcloud project (default: gcloud's configured project)
  --version=RUNTIME      TPU software version (default: tpu-ubuntu2204-base)
  --spot                 create a Spot VM
  --repo=URL             git clone/pull URL on the workers instead of copying this checkout
  --branch=BRANCH        branch to check out with --repo (default: main)
  --delete               delete the TPU VM when the command finishes
  --help                 this text

Environment: DRY_RUN=1 prints every command that would change something instead of running it (read-only
queries still run).

example:
  launch/tpu.sh --name=cm3leon --zone=us-central2-b --accelerator=v4-32 -- \
      cm3jax train --config=configs/cm3leon.py:350m --workdir=gs://BUCKET/cm3leon_350m
USAGE
}

NAME="" ZONE="" ACCELERATOR="" PROJECT="" VERSION="tpu-ubuntu2204-base" SPOT=0 REPO="" BRANCH="main" DELETE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --repo=*) REPO="${1#*=}" ;;
    --branch=*) BRANCH="${1#*=}" ;;
    --delete) DELETE=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$NAME" && -n "$ZONE" ]] || { echo "tpu.sh: --name and --zone are required (see --help)" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "tpu.sh: no command after -- (see --help)" >&2; exit 2; }

run() {  # run or, with DRY_RUN=1, print a command that changes something
  if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
SCOPE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && SCOPE+=(--project="$PROJECT")
SSH=("${GCLOUD[@]}" ssh "$NAME" "${SCOPE[@]}" --worker=all)
REMOTE_DIR='$HOME/cm3jax'
COMMAND=$(printf ' %q' "$@")

if "${GCLOUD[@]}" describe "$NAME" "${SCOPE[@]}" >/dev/null 2>&1; then
  echo "tpu.sh: reusing TPU VM $NAME" >&2
else
  [[ -n "$ACCELERATOR" ]] || { echo "tpu.sh: $NAME does not exist; --accelerator is needed to create it" >&2; exit 2; }
  CREATE=("${GCLOUD[@]}" create "$NAME" "${SCOPE[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
  [[ "$SPOT" == "1" ]] && CREATE+=(--spot)
  run "${CREATE[@]}"
fi

if [[ -n "$REPO" ]]; then
  # User values reach a remote shell: each is quoted for it, so `--branch='x; cmd'` is a branch name, not a command.
  Q_BRANCH=$(printf '%q' "$BRANCH") Q_REPO=$(printf '%q' "$REPO")
  run "${SSH[@]}" --command="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch origin && git -C $REMOTE_DIR checkout $Q_BRANCH && git -C $REMOTE_DIR pull --ff-only origin $Q_BRANCH; else git clone --branch $Q_BRANCH $Q_REPO $REMOTE_DIR; fi"
else
  CHECKOUT="$(dirname "$0")/.."
  if [[ -n "$(git -C "$CHECKOUT" status --porcelain 2>/dev/null)" ]]; then
    echo "tpu.sh: warning: the checkout has uncommitted changes; only the last commit (git archive HEAD) is shipped" >&2
  fi
  if [[ "${DRY_RUN:-0}" == "1" ]]; then  # a dry run creates nothing, not even a temporary folder
    ARCHIVE="${TMPDIR:-/tmp}/cm3jax-XXXXXX/cm3jax.tar.gz"
  else
    ARCHIVE_DIR="$(mktemp -d)"
    trap 'rm -rf "$ARCHIVE_DIR"' EXIT
    ARCHIVE="$ARCHIVE_DIR/cm3jax.tar.gz"
  fi
  run git -C "$CHECKOUT" archive --format=tar.gz -o "$ARCHIVE" HEAD
  run "${GCLOUD[@]}" scp "$ARCHIVE" "$NAME":cm3jax.tar.gz "${SCOPE[@]}" --worker=all
  run "${SSH[@]}" --command="mkdir -p $REMOTE_DIR && tar -xzf cm3jax.tar.gz -C $REMOTE_DIR"
fi

run "${SSH[@]}" --command="cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]'"
status=0
# pipefail: the status is the command's, not tee's.
run "${SSH[@]}" --command="set -o pipefail; cd $REMOTE_DIR && PATH=$REMOTE_DIR/.venv/bin:\$PATH$COMMAND 2>&1 | tee -a \$HOME/cm3jax.log" || status=$?

if [[ "$DELETE" == "1" ]]; then
  run "${GCLOUD[@]}" delete "$NAME" "${SCOPE[@]}" --quiet
fi
exit $status
